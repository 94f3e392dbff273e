"""Preference pairs: load any supported source in any supported format as ``caption, image_w, image_l, p``.

Sources (see :func:`load_rows`): a Hugging Face hub dataset id, a local parquet file or folder of
parquet files, a folder written by ``datasets.save_to_disk``, a JSONL / JSON / CSV file, or WebDataset
``.tar`` shards (a file or a folder of them). Formats (:mod:`diffusion_dpo.data.formats`, one module
each, recognised from the columns or named with ``dataset_format``): Pick-a-Pic v2 and mirrors
(``caption, jpg_0, jpg_1, label_0``), ordered pairs (``caption, image_w, image_l``), your own
``caption, image_0, image_1, label_0``, HPDv3 / HPDv3++, ImageRewardDB pairs, open-image-preferences,
and WebDataset samples. In JSONL / JSON / CSV files image cells are paths, relative to the file's folder
(or ``image_root``), or absolute.

Every source becomes rows ``{"caption": str, "image_w": ImageLike, "image_l": ImageLike, "p": float,
"bad": str | None}`` with the winner first and ``p`` = P(image_w preferred): pairs whose second image
won are swapped, and ties (``p0 == 0.5``) carry no preference and are dropped by default
(docs/objectives.md#diffusion-dpo; Wallace et al. 2023) or kept at ``p = 0.5`` (soft labels,
docs/data.md). Images stay encoded (bytes, a path, or a ``{"bytes", "path"}`` dict) until the
transform decodes them, so loading never rewrites image data, even for Pick-a-Pic v2's ~335 GB.

A label that cannot be read (a Pick-a-Pic ``label_0`` other than 0, 0.5 or 1; a vote share outside
[0, 1]) makes a bad row. Loaded whole, the labels are checked at load time (an error naming the rows,
or the rows left out and counted in :class:`PairStats`); streamed, the row passes marked ``bad`` (why,
naming the row) and the transform raises it as a :class:`~diffusion_dpo.data.transforms.BadRowError`,
so the dataset's ``on_bad_example`` decides.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffusion_dpo.data.formats import PairFormat, position_coin, resolve_format
from diffusion_dpo.data.formats.base import LabelError, winner_first
from diffusion_dpo.data.formats.pickapic import label_problem  # noqa: F401 (the audit's import)
from diffusion_dpo.data.removed import check_not_removed, removed_reason
from diffusion_dpo.data.transforms import check_on_bad_example

logger = logging.getLogger(__name__)

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
ORDERED_COLUMNS = ("caption", "image_w", "image_l")
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tar": "webdataset",
}
_FORMAT_NAMES = {"parquet": "parquet", "json": "JSON", "csv": "CSV", "webdataset": "WebDataset"}


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
    #: Pairs whose votes were split (0 < p0 < 1, not a tie): what soft labels keep.
    split_votes: int = 0
    #: Pairs dropped because their vote margin |2·p0 − 1| was below ``min_label_margin``.
    near_ties: int = 0
    #: The format the source was read in (``diffusion_dpo.data.formats``).
    dataset_format: str | None = None


#: How many bad rows loading names, in its errors and in the stats.
NAMED_BAD_ROWS = 5


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
        elif any(path.rglob("*.tar")) and not any(path.rglob("*.parquet")):
            description = f"WebDataset folder {path}"
            shards = sorted(
                str(f) for f in path.rglob("*.tar")
            )  # one shard per file: streams split over them
            rows = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", **common)
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


class PairConverter:
    """A source row -> the positional form ``(caption, image_0, image_1, p0)`` and the training row
    ``{"caption", "image_w", "image_l", "p", "bad"}`` (winner first, ``p`` = P(image_w preferred) in
    [0.5, 1]). Picklable, so it survives DataLoader workers; holds no state, so a row converts the same
    in every process, epoch and resume.

    A winner-first format's positions come from :func:`~diffusion_dpo.data.formats.position_coin`
    (seeded by ``seed``), so :meth:`positional` never shows the winner in one position more than chance.
    """

    def __init__(self, fmt: PairFormat, base_dir: str | None, seed: int = 0):
        self.fmt = fmt
        self.base_dir = base_dir
        self.seed = seed

    def label(self, row: dict) -> float:
        """``p0`` of a row; winner-first rows get the coin's answer (1.0 or 0.0). Raises LabelError."""
        p0 = self.fmt.label(row)
        if p0 is None:
            caption, first, second = self.fmt.read(row)
            return 0.0 if position_coin(self.seed, caption, first, second) else 1.0
        return p0

    def positional(self, row: dict) -> dict:
        """``{"caption", "image_0", "image_1", "label_0"}`` as a positional source would store the pair;
        ``label_0`` is None and ``bad`` says why when the label cannot be read."""
        caption, image_0, image_1 = self.fmt.read(row)
        try:
            p0, bad = self.label(row), None
        except LabelError as error:
            p0, bad = None, str(error)
        if p0 == 0.0 and self.fmt.label(row) is None:  # the coin put the winner second
            image_0, image_1 = image_1, image_0
        return {
            "caption": caption, "label_0": p0, "bad": bad,
            "image_0": resolve_image_path(image_0, self.base_dir), "image_1": resolve_image_path(image_1, self.base_dir),
        }  # fmt: skip

    def row(self, row: dict) -> dict:
        bad = row.get("bad")  # set by _PairCounter on a streamed row with a bad label
        caption, image_w, image_l = self.fmt.read(row)
        p = 1.0
        if bad is None:
            p0 = self.fmt.label(row)
            p0 = 1.0 if p0 is None else p0  # winner first: the coin would swap twice
            if p0 < 0.5:  # the second image won
                image_w, image_l = image_l, image_w
            p = max(p0, 1.0 - p0)
        return {
            "caption": caption,
            "image_w": resolve_image_path(image_w, self.base_dir),
            "image_l": resolve_image_path(image_l, self.base_dir),
            "p": float(p),
            "bad": bad,
        }

    def __call__(self, batch: dict) -> dict:
        # datasets.Dataset.with_transform hands over a batch: column name -> list.
        n = len(next(iter(batch.values())))
        rows = [self.row({k: v[i] for k, v in batch.items()}) for i in range(n)]
        return {key: [r[key] for r in rows] for key in ("caption", "image_w", "image_l", "p", "bad")}


def label_margin(p0: float) -> float:
    """How decided a pair is: ``|P(image 0) − P(image 1)| = |2·p0 − 1|``; 0 for a tie, 1 for a unanimous pair."""
    return abs(2.0 * p0 - 1.0)


def _count_label(stats: PairStats, p0: float, keep_ties: bool, min_label_margin: float) -> bool:
    """Count one readable label in ``stats``; whether the pair is kept."""
    tie = p0 == 0.5
    stats.ties += tie
    stats.swapped += p0 < 0.5
    stats.split_votes += 0.0 < p0 < 1.0 and not tie
    if min_label_margin > 0 and label_margin(p0) < min_label_margin:
        stats.near_ties += 1
        return False
    return keep_ties or not tie


class _PairCounter:
    """Streaming map: counts pairs, ties, swaps, split votes and bad labels as they pass, and marks each
    row ``bad`` (None, or why its label is bad, naming its ``index`` in the stream: in this worker's
    part of it, with DataLoader workers) and ``keep`` (False for ties and near-ties to drop)."""

    def __init__(self, converter: PairConverter, stats: PairStats, keep_ties: bool, min_label_margin: float,
                 description: str):  # fmt: skip
        self.converter = converter
        self.stats = stats
        self.keep_ties = keep_ties
        self.min_label_margin = min_label_margin
        self.description = description
        self._next_log = 1000

    def __call__(self, row: dict, index: int) -> dict:
        self.stats.seen += 1
        try:
            p0 = self.converter.fmt.label(row)
            p0 = 1.0 if p0 is None else p0  # winner first: counted as stored, as when loaded whole
        except LabelError as error:
            self.stats.bad_labels += 1
            if len(self.stats.bad_label_rows) < NAMED_BAD_ROWS:
                self.stats.bad_label_rows.append((index, str(error)))
            return {"bad": f"row {index} of {self.description}: {error}", "keep": True}
        keep = _count_label(self.stats, p0, self.keep_ties, self.min_label_margin)
        if self.stats.seen >= self._next_log:
            self._next_log *= 10
            logger.info(
                "%s %d ties of the first %d pairs of %s (dropped %d near-ties)",
                "kept" if self.keep_ties else "dropped", self.stats.ties, self.stats.seen, self.description,
                self.stats.near_ties,
            )  # fmt: skip
        return {"bad": None, "keep": keep}


def _kept(row: dict) -> bool:
    # Rows marked bad pass (keep is True), to become placeholders (or errors) in the transform.
    return row["keep"]


def _check_image_root(fmt: PairFormat, rows, base_dir: str | None, description: str) -> None:
    # Relative image paths with nothing to resolve them against would fail one row at a time, later.
    if not fmt.image_paths or base_dir is not None:
        return
    first = next(iter(rows.take(1) if hasattr(rows, "take") else rows), None)
    if first is None:
        return
    _, image_0, _ = fmt.read(first)
    if isinstance(image_0, str) and not os.path.isabs(image_0):
        raise ValueError(
            f"{description} holds {fmt.name} image paths relative to an extracted image folder (e.g. "
            f"{image_0!r}); pass --image_root FOLDER (where the card's image archive was extracted)"
        )


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
    dataset_format: str = "auto",
    image_root: str | None = None,
    min_label_margin: float = 0.0,
    **load_kwargs,
):
    """Load preference pairs from any supported source and format as rows ``caption, image_w, image_l,
    p, bad`` (winner first; ``p`` = P(image_w preferred), 1 for a decided pair, a vote share in
    [0.5, 1) for a split one, 0.5 for a kept tie).

    Returns a ``datasets.Dataset`` (rows converted lazily on access by ``with_transform``; ties, near-ties,
    bad labels and rows outside ``max_train_samples`` removed through an index mapping, so no image data
    is copied) or, with ``streaming``, a ``datasets.IterableDataset`` converted as it is iterated.

    ``dataset_format``: one of :data:`~diffusion_dpo.data.formats.DATASET_FORMATS`; ``auto`` recognises
    it from the columns. ``image_root``: the folder relative image paths resolve against (default: a
    JSONL / CSV / JSON file's own folder). ``keep_ties``: keep ties (``p0 == 0.5``), in their stored
    order; by default they are dropped and counted. ``min_label_margin``: also drop pairs whose vote
    margin ``|2·p0 − 1|`` is below it (near-ties; ties too, whatever ``keep_ties`` says).
    ``max_train_samples``: keep N pairs drawn at random with ``seed`` (after the drops; see
    :func:`sample_rows`), in their stored order; when streaming, the first N. ``seed`` also seeds the
    position coin of winner-first formats. ``on_bad_example``: what an unreadable label does when
    loaded whole: ``"error"`` raises a ``ValueError`` naming the first such rows and their values,
    ``"skip"`` leaves them out (counted and named in ``stats``); a streamed row with a bad label is marked
    ``bad`` for the transform instead. ``stats``: a :class:`PairStats` to fill with the counts.
    ``load_kwargs``: see :func:`load_rows`.

    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` naming the missing
    columns, the columns found, the source and the supported formats when no format fits.
    """
    check_on_bad_example(on_bad_example)
    if not 0.0 <= min_label_margin <= 1.0:
        raise ValueError(f"min_label_margin must be in [0, 1], got {min_label_margin}")
    stats = stats if stats is not None else PairStats()
    source = load_rows(dataset_name, split, streaming=streaming, cache_dir=cache_dir, **load_kwargs)
    names = column_names(source)
    fmt = resolve_format(names, source.description, dataset_format)
    needed = fmt.needed(names)
    rows = source.rows.select_columns(needed)
    base_dir = os.fspath(image_root) if image_root is not None else source.base_dir
    _check_image_root(fmt, rows, base_dir, source.description)
    converter = PairConverter(fmt, base_dir, seed)
    stats.dataset_format = fmt.name

    if streaming:
        # with_indices: a row's position in this iteration of the stream, from 0 again each epoch.
        counter = _PairCounter(converter, stats, keep_ties, min_label_margin, source.description)
        rows = rows.map(counter, with_indices=True).filter(_kept)
        rows = rows.map(converter.row, remove_columns=[*needed, "keep"])
        if max_train_samples is not None:
            rows = rows.take(max_train_samples)
        return rows

    stats.seen = len(rows)
    keep = np.ones(len(rows), dtype=bool)
    label_columns = [c for c in fmt.label_columns if c in needed]
    if label_columns or fmt.label is not winner_first:
        # Python values of the label columns only (no image is read): a JSON column of mixed types is
        # stored as JSON text and decoded only there.
        values = rows.select_columns(label_columns).with_format(None)[:] if label_columns else {}
        problems = []
        for i in range(len(rows)):
            try:
                p0 = fmt.label({c: values[c][i] for c in label_columns})
            except LabelError as error:
                problems.append((i, str(error)))
                keep[i] = False
                continue
            keep[i] = _count_label(stats, 1.0 if p0 is None else p0, keep_ties, min_label_margin)
        if problems:
            if on_bad_example == "error":
                raise bad_label_error(problems, "pairs", source.description)
            stats.bad_labels, stats.bad_label_rows = len(problems), problems[:NAMED_BAD_ROWS]
            logger.warning(
                "left out %d pairs of %s with a bad label (first: row %d: %s)",
                len(problems), source.description, *problems[0],
            )  # fmt: skip
        logger.info(
            "%s %d ties of %d pairs of %s", "kept" if keep_ties else "dropped", stats.ties, stats.seen,
            source.description,
        )  # fmt: skip
        if stats.split_votes or min_label_margin > 0:
            logger.info(
                "%d pairs of %s have split votes%s", stats.split_votes, source.description,
                f"; dropped {stats.near_ties} near-ties (vote margin below {min_label_margin:g})"
                if min_label_margin > 0 else "",
            )  # fmt: skip
    kept = np.flatnonzero(keep)
    kept = kept[sample_rows(len(kept), max_train_samples, seed)]
    if len(kept) < len(rows):
        rows = rows.select(kept)
    return rows.with_transform(converter)
