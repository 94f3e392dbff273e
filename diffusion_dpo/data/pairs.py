"""Preference pairs: load any supported source and normalise it to ``caption, image_w, image_l``.

Sources (see :func:`load_rows`): a Hugging Face hub dataset id, a local parquet file or folder of
parquet files, a folder written by ``datasets.save_to_disk``, or a JSONL / CSV file. Two schemas:

- Pick-a-Pic v2 (Kirstain et al. 2023): ``caption``, ``jpg_0``, ``jpg_1`` (encoded images),
  ``label_0`` (1: the first image won, 0: the second won, 0.5: a tie; ``label_1 = 1 - label_0``
  may be present and is not needed);
- ordered pairs: ``caption``, ``image_w`` (the preferred image), ``image_l`` (the other one).

In JSONL / CSV files image cells are paths, relative to the file's folder (or absolute).

Every source becomes rows ``{"caption": str, "image_w": ImageLike, "image_l": ImageLike, "bad":
str | None}`` with the winner first: Pick-a-Pic pairs with ``label_0 == 0`` are swapped, and ties
(``label_0 == 0.5``) carry no preference and are dropped by default (docs/objectives.md#diffusion-dpo; Wallace et al.
2023). Images stay encoded (bytes, a path, or a ``{"bytes", "path"}`` dict) until the transform
decodes them, so loading never rewrites image data, even for Pick-a-Pic v2's ~335 GB.

A ``label_0`` other than 0, 0.5 or 1 makes a bad row. Loaded whole, the labels are checked at load
time (an error naming the rows, or the rows left out and counted in :class:`PairStats`); streamed,
the row passes marked ``bad`` (why, naming the row) and the transform raises it as a
:class:`~diffusion_dpo.data.transforms.BadRowError`, so the dataset's ``on_bad_example`` decides.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffusion_dpo.data.removed import check_not_removed, removed_reason
from diffusion_dpo.data.transforms import check_on_bad_example

logger = logging.getLogger(__name__)

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
ORDERED_COLUMNS = ("caption", "image_w", "image_l")
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_FORMAT_NAMES = {"parquet": "parquet", "json": "JSON", "csv": "CSV"}


@dataclass
class PairStats:
    """Counts of what loading did. For a streaming source they grow as rows pass, in the process
    that iterates (with DataLoader workers: in each worker)."""

    #: Pairs read from the source (ties included).
    seen: int = 0
    #: Ties (``label_0 == 0.5``) met; dropped unless ``keep_ties``.
    ties: int = 0
    #: Pairs whose second image won (``label_0 == 0``) and that were swapped to put it first.
    swapped: int = 0
    #: Pairs whose ``label_0`` is not 0, 0.5 or 1 (left out, or placeholders when streaming).
    bad_labels: int = 0
    #: The first few of them: (row in the source, why).
    bad_label_rows: list[tuple[int, str]] = field(default_factory=list)


#: How many bad rows loading names, in its errors and in the stats.
NAMED_BAD_ROWS = 5


def label_problem(value) -> str | None:
    """Why ``value`` is not a Pick-a-Pic ``label_0`` (0, 0.5 or 1, as an int, a float or a numpy
    scalar), or ``None`` when it is one. NaN, None, strings and any other number are bad."""
    if value is not None and not isinstance(value, str | bytes):
        try:
            if float(value) in (0.0, 0.5, 1.0):
                return None
        except (TypeError, ValueError):
            pass
    shown = value if isinstance(value, int | float) else repr(value)
    return f"label_0 {shown} is not 0, 0.5 or 1"


def sample_rows(num_rows: int, max_rows: int | None, seed: int) -> np.ndarray:
    """Positions of ``max_rows`` of ``num_rows`` rows drawn at random with ``seed``, in increasing
    order; all positions when ``max_rows`` is None or not smaller than ``num_rows``.

    A random subset, as the paper code's ``dataset.shuffle(seed=seed).select(range(N))``: the first N
    rows of a file sorted by prompt, date or source would not be representative. The subset is the
    first ``max_rows`` of one seeded permutation, so a larger ``max_rows`` keeps every smaller one's
    rows.
    """
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_train_samples must be >= 0, got {max_rows}")
    if max_rows is None or max_rows >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).permutation(num_rows)[:max_rows])


def bad_label_error(problems: list[tuple[int, str]], what: str, description: str) -> ValueError:
    """The load-time error for rows with bad labels: how many, the first few by row, the way out."""
    named = "; ".join(f"row {i}: {reason}" for i, reason in problems[:NAMED_BAD_ROWS])
    more = "; ..." if len(problems) > NAMED_BAD_ROWS else ""
    return ValueError(
        f"{len(problems)} {what} of {description} have a bad label ({named}{more}); fix them, or pass "
        "on_bad_example='skip' to leave them out"
    )


@dataclass
class RowSource:
    """A loaded source before normalisation: the rows plus what error messages need to name it."""

    rows: object  # datasets.Dataset | datasets.IterableDataset
    #: How to name the source in messages, e.g. "parquet file /data/pairs.parquet".
    description: str
    #: Folder that relative image paths are resolved against (JSONL / CSV files), else None.
    base_dir: str | None = None


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that does not exist is a mistyped path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or Path(name).suffix.lower() in _FILE_BUILDERS
        or name.count("/") > 1
        or "\\" in name
    )


def _cast_images_undecoded(rows):
    # A datasets.Image column would be decoded on access; keep it encoded so that a corrupt image is
    # found by the transform (naming the row), not by the loader's formatting.
    import datasets

    features = getattr(rows, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            rows = rows.cast_column(name, datasets.Image(decode=False))
    return rows


def load_rows(
    dataset_name,
    split: str = "train",
    *,
    streaming: bool = False,
    cache_dir: str | None = None,
    **load_kwargs,
) -> RowSource:
    """Load the raw rows of a source (no schema checks): a ``datasets.Dataset``, or a
    ``datasets.IterableDataset`` when ``streaming``.

    ``dataset_name``: a local ``.parquet``, ``.jsonl``/``.json`` or ``.csv`` file (a single file is
    loaded whole, whatever ``split`` says); a folder of parquet files (split names are inferred from
    file names, e.g. ``train-00000.parquet``, ``test.parquet``; otherwise all files are ``train``); a
    folder written by ``save_to_disk`` (a ``DatasetDict`` is indexed by ``split``); a hub dataset id;
    or an in-memory ``datasets.Dataset`` / ``IterableDataset`` of raw rows. ``load_kwargs`` go to
    ``datasets.load_dataset`` (e.g. ``revision``, ``num_proc``).
    """
    import datasets

    if isinstance(dataset_name, datasets.Dataset | datasets.IterableDataset):
        rows = dataset_name
        if streaming and isinstance(rows, datasets.Dataset):
            rows = rows.to_iterable_dataset()
        return RowSource(_cast_images_undecoded(rows), f"in-memory {type(rows).__name__}")
    name = os.fspath(dataset_name)
    path = Path(name).expanduser()
    common = dict(streaming=streaming, cache_dir=cache_dir, **load_kwargs)
    base_dir = None
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset file {path} has an unsupported extension {path.suffix!r}; "
                f"expected one of {sorted(_FILE_BUILDERS)}"
            )
        description = f"{_FORMAT_NAMES[builder]} file {path}"
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **common)
        if builder in ("json", "csv"):
            base_dir = str(path.resolve().parent)
    elif path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            description = f"save_to_disk folder {path}"
            rows = datasets.load_from_disk(str(path))
            if isinstance(rows, datasets.DatasetDict):
                if split not in rows:
                    raise ValueError(f"split {split!r} not in {description}; it has splits {sorted(rows)}")
                rows = rows[split]
            if streaming:
                rows = rows.to_iterable_dataset()
        elif any(path.rglob("*.parquet")):
            description = f"parquet folder {path}"
            try:
                rows = datasets.load_dataset("parquet", data_dir=str(path), split=split, **common)
            except ValueError as error:
                raise ValueError(f"cannot load split {split!r} of {description}: {error}") from error
        else:
            raise ValueError(
                f"folder {path} holds neither a dataset written by save_to_disk "
                "(dataset_dict.json or state.json) nor parquet files"
            )
    elif removed_reason(name):  # not a local file or folder: a hub id known to be gone, said in one line
        check_not_removed(name)
    elif _looks_like_path(name):
        raise FileNotFoundError(f"dataset path {name!r} does not exist (no such file or folder)")
    else:
        description = f"hub dataset {name!r} (split {split!r})"
        try:
            rows = datasets.load_dataset(name, split=split, **common)
        except Exception as error:
            raise ValueError(
                f"cannot load {name!r}: it is not a local file or folder, and loading it as a "
                f"Hugging Face hub dataset failed ({type(error).__name__}: {error})"
            ) from error
    return RowSource(_cast_images_undecoded(rows), description, base_dir)


def column_names(source: RowSource) -> list[str]:
    """The source's columns; for a stream of unknown features (e.g. JSON), those of its first row."""
    names = getattr(source.rows, "column_names", None)
    if names is None:
        first = next(iter(source.rows), None)
        names = list(first) if first is not None else []
    return list(names)


def detect_pair_schema(names: list[str], description: str) -> str:
    """'ordered' or 'pickapic', or a ValueError naming the missing columns, the found ones and the source."""
    if set(ORDERED_COLUMNS) <= set(names):
        return "ordered"
    if set(PICKAPIC_COLUMNS) <= set(names):
        return "pickapic"
    if {"jpg_0", "jpg_1", "label_0"} & set(names):
        missing, schema = [c for c in PICKAPIC_COLUMNS if c not in names], "Pick-a-Pic v2"
    else:
        missing, schema = [c for c in ORDERED_COLUMNS if c not in names], "ordered pairs"
    raise ValueError(
        f"missing columns {missing} for {schema}; found columns {sorted(names)} in {description}. "
        "A pair dataset needs caption, image_w, image_l or caption, jpg_0, jpg_1, label_0."
    )


def resolve_image_path(value, base_dir: str | None):
    """Make a relative path cell absolute against ``base_dir`` (JSONL / CSV); other values unchanged."""
    if base_dir is not None and isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.join(base_dir, value)
    return value


class _PairNormalizer:
    """Row (or column-batch) -> ``{"caption", "image_w", "image_l"}``, winner first. Picklable, so it
    survives DataLoader workers."""

    def __init__(self, schema: str, base_dir: str | None):
        self.schema = schema
        self.base_dir = base_dir

    def row(self, row: dict) -> dict:
        bad = row.get("bad")  # set by _PairCounter on a streamed row with a bad label
        if self.schema == "ordered":
            image_w, image_l = row["image_w"], row["image_l"]
        else:
            image_w, image_l = row["jpg_0"], row["jpg_1"]
            if bad is None and float(row["label_0"]) == 0.0:  # the second image won
                image_w, image_l = image_l, image_w
        return {
            "caption": row["caption"],
            "image_w": resolve_image_path(image_w, self.base_dir),
            "image_l": resolve_image_path(image_l, self.base_dir),
            "bad": bad,
        }

    def __call__(self, batch: dict) -> dict:
        # datasets.Dataset.with_transform hands over a batch: column name -> list.
        n = len(batch["caption"])
        rows = [self.row({k: v[i] for k, v in batch.items()}) for i in range(n)]
        return {key: [r[key] for r in rows] for key in ("caption", "image_w", "image_l", "bad")}


class _PairCounter:
    """Streaming map: counts pairs, ties, swaps and bad labels as they pass, and marks each row
    ``bad``: ``None``, or why its ``label_0`` is bad, naming its ``index`` in the stream (in this
    worker's part of it, with DataLoader workers). Ties are dropped after it by :func:`_not_a_tie`."""

    def __init__(self, stats: PairStats, keep_ties: bool, description: str):
        self.stats = stats
        self.keep_ties = keep_ties
        self.description = description
        self._next_log = 1000

    def __call__(self, row: dict, index: int) -> dict:
        self.stats.seen += 1
        problem = label_problem(row["label_0"])
        if problem is not None:
            self.stats.bad_labels += 1
            if len(self.stats.bad_label_rows) < NAMED_BAD_ROWS:
                self.stats.bad_label_rows.append((index, problem))
            return {"bad": f"row {index} of {self.description}: {problem}"}
        label = float(row["label_0"])
        self.stats.ties += label == 0.5
        self.stats.swapped += label == 0.0
        if self.stats.seen >= self._next_log:
            self._next_log *= 10
            logger.info(
                "%s %d ties of the first %d pairs of %s",
                "kept" if self.keep_ties else "dropped",
                self.stats.ties,
                self.stats.seen,
                self.description,
            )
        return {"bad": None}


def _not_a_tie(row: dict) -> bool:
    # Rows marked bad pass, to become placeholders (or errors) in the transform.
    return row["bad"] is not None or float(row["label_0"]) != 0.5


def load_pair_dataset(
    dataset_name: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    keep_ties: bool = False,
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
    stats: PairStats | None = None,
    *,
    seed: int = 0,
    on_bad_example: str = "error",
    **load_kwargs,
):
    """Load preference pairs from any supported source as rows ``caption, image_w, image_l, bad``.

    Returns a ``datasets.Dataset`` (rows normalised lazily on access by ``with_transform``; ties, bad
    labels and rows outside ``max_train_samples`` removed through an index mapping, so no image data
    is copied) or, with ``streaming``, a ``datasets.IterableDataset`` normalised as it is iterated.

    ``keep_ties``: keep Pick-a-Pic ties (``label_0 == 0.5``), in their stored order; by default they
    are dropped and counted ("dropped N ties of M pairs" is logged; when streaming, counted as rows
    pass). ``max_train_samples``: keep N pairs drawn at random with ``seed`` (after tie and bad-label
    removal; see :func:`sample_rows`), in their stored order; when streaming, the first N.
    ``on_bad_example``: what a ``label_0`` other than 0, 0.5 or 1 does when loaded whole:
    ``"error"`` raises a ``ValueError`` naming the first such rows and their values, ``"skip"``
    leaves them out (counted and named in ``stats``); a streamed row with a bad label is marked
    ``bad`` for the transform instead. ``stats``: a :class:`PairStats` to fill with the counts.
    ``load_kwargs``: see :func:`load_rows`.

    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` naming the missing
    columns, the columns found and the source when the schema does not fit.
    """
    check_on_bad_example(on_bad_example)
    stats = stats if stats is not None else PairStats()
    source = load_rows(dataset_name, split, streaming=streaming, cache_dir=cache_dir, **load_kwargs)
    schema = detect_pair_schema(column_names(source), source.description)
    needed = list(ORDERED_COLUMNS if schema == "ordered" else PICKAPIC_COLUMNS)
    rows = source.rows.select_columns(needed)
    normalizer = _PairNormalizer(schema, source.base_dir)

    if streaming:
        if schema == "pickapic":
            # with_indices: a row's position in this iteration of the stream, from 0 again each epoch.
            rows = rows.map(_PairCounter(stats, keep_ties, source.description), with_indices=True)
            if not keep_ties:
                rows = rows.filter(_not_a_tie)
        rows = rows.map(normalizer.row, remove_columns=[c for c in needed if c != "caption"])
        if max_train_samples is not None:
            rows = rows.take(max_train_samples)
        return rows

    stats.seen = len(rows)
    keep = np.ones(len(rows), dtype=bool)
    if schema == "pickapic":
        # Python values: a JSON column of mixed types is stored as JSON text and decoded only there.
        values = rows.select_columns(["label_0"]).with_format(None)[:]["label_0"]
        labels = np.full(len(values), np.nan)  # NaN where the label is bad
        problems = []
        for i, value in enumerate(values):
            problem = label_problem(value)
            if problem is None:
                labels[i] = float(value)
            else:
                problems.append((i, problem))
        if problems:
            if on_bad_example == "error":
                raise bad_label_error(problems, "pairs", source.description)
            stats.bad_labels, stats.bad_label_rows = len(problems), problems[:NAMED_BAD_ROWS]
            logger.warning(
                "left out %d pairs of %s with a bad label_0 (first: row %d: %s)",
                len(problems),
                source.description,
                *problems[0],
            )
        ties = labels == 0.5
        stats.ties = int(ties.sum())
        stats.swapped = int((labels == 0.0).sum())
        keep = ~np.isnan(labels) & (keep_ties | ~ties)
        logger.info(
            "%s %d ties of %d pairs of %s",
            "kept" if keep_ties else "dropped",
            stats.ties,
            stats.seen,
            source.description,
        )
    kept = np.flatnonzero(keep)
    kept = kept[sample_rows(len(kept), max_train_samples, seed)]
    if len(kept) < len(rows):
        rows = rows.select(kept)
    return rows.with_transform(normalizer)
