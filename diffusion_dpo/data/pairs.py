"""Preference pairs: load any supported source and normalise it to ``caption, image_w, image_l``.

Sources (see :func:`load_rows`): a Hugging Face hub dataset id, a local parquet file or folder of
parquet files, a folder written by ``datasets.save_to_disk``, or a JSONL / CSV file. Two schemas:

- Pick-a-Pic v2 (Kirstain et al. 2023): ``caption``, ``jpg_0``, ``jpg_1`` (encoded images),
  ``label_0`` (1: the first image won, 0: the second won, 0.5: a tie; ``label_1 = 1 - label_0``
  may be present and is not needed);
- ordered pairs: ``caption``, ``image_w`` (the preferred image), ``image_l`` (the other one).

In JSONL / CSV files image cells are paths, relative to the file's folder (or absolute).

Every source becomes rows ``{"caption": str, "image_w": ImageLike, "image_l": ImageLike}`` with
the winner first: Pick-a-Pic pairs with ``label_0 == 0`` are swapped, and ties (``label_0 == 0.5``)
carry no preference and are dropped by default (MATH.md §4; Wallace et al. 2023). Images stay
encoded (bytes, a path, or a ``{"bytes", "path"}`` dict) until the transform decodes them, so
loading never rewrites image data, even for Pick-a-Pic v2's ~335 GB.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def _detect_pair_schema(names: list[str], description: str) -> str:
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
        if self.schema == "ordered":
            image_w, image_l = row["image_w"], row["image_l"]
        else:
            image_w, image_l = row["jpg_0"], row["jpg_1"]
            if row["label_0"] is not None and row["label_0"] < 0.5:  # the second image won
                image_w, image_l = image_l, image_w
        return {
            "caption": row["caption"],
            "image_w": resolve_image_path(image_w, self.base_dir),
            "image_l": resolve_image_path(image_l, self.base_dir),
        }

    def __call__(self, batch: dict) -> dict:
        # datasets.Dataset.with_transform hands over a batch: column name -> list.
        n = len(batch["caption"])
        rows = [self.row({k: v[i] for k, v in batch.items()}) for i in range(n)]
        return {key: [r[key] for r in rows] for key in ("caption", "image_w", "image_l")}


class _PairCounter:
    """Streaming filter: counts pairs, ties and swaps as they pass; drops ties unless ``keep_ties``."""

    def __init__(self, stats: PairStats, keep_ties: bool, description: str):
        self.stats = stats
        self.keep_ties = keep_ties
        self.description = description
        self._next_log = 1000

    def __call__(self, row: dict) -> bool:
        label = row["label_0"]
        if label is None or not np.isfinite(float(label)):
            raise ValueError(f"pair {self.stats.seen} of {self.description} has no label_0 ({label!r})")
        self.stats.seen += 1
        tie = float(label) == 0.5
        self.stats.ties += tie
        self.stats.swapped += float(label) < 0.5
        if self.stats.seen >= self._next_log:
            self._next_log *= 10
            logger.info(
                "%s %d ties of the first %d pairs of %s",
                "kept" if self.keep_ties else "dropped",
                self.stats.ties,
                self.stats.seen,
                self.description,
            )
        return self.keep_ties or not tie


def load_pair_dataset(
    dataset_name: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    keep_ties: bool = False,
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
    stats: PairStats | None = None,
    **load_kwargs,
):
    """Load preference pairs from any supported source as rows ``caption, image_w, image_l``.

    Returns a ``datasets.Dataset`` (rows normalised lazily on access by ``with_transform``, ties
    removed through an index mapping, so no image data is copied) or, with ``streaming``, a
    ``datasets.IterableDataset`` normalised as it is iterated.

    ``keep_ties``: keep Pick-a-Pic ties (``label_0 == 0.5``), in their stored order; by default they
    are dropped and counted ("dropped N ties of M pairs" is logged; when streaming, counted as rows
    pass). ``max_train_samples``: keep only the first N pairs (after tie removal). ``stats``: a
    :class:`PairStats` to fill with the counts. ``load_kwargs``: see :func:`load_rows`.

    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` naming the missing
    columns, the columns found and the source when the schema does not fit.
    """
    stats = stats if stats is not None else PairStats()
    source = load_rows(dataset_name, split, streaming=streaming, cache_dir=cache_dir, **load_kwargs)
    schema = _detect_pair_schema(column_names(source), source.description)
    needed = list(ORDERED_COLUMNS if schema == "ordered" else PICKAPIC_COLUMNS)
    rows = source.rows.select_columns(needed)
    normalizer = _PairNormalizer(schema, source.base_dir)

    if streaming:
        if schema == "pickapic":
            rows = rows.filter(_PairCounter(stats, keep_ties, source.description))
        rows = rows.map(normalizer.row, remove_columns=[c for c in needed if c != "caption"])
        if max_train_samples is not None:
            rows = rows.take(max_train_samples)
        return rows

    stats.seen = len(rows)
    if schema == "pickapic":
        try:
            labels = np.asarray(
                rows.select_columns(["label_0"]).with_format("numpy")[:]["label_0"], dtype=float
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"label_0 of {source.description} is not numeric: {error}") from error
        bad = np.flatnonzero(~np.isfinite(labels))
        if bad.size:
            raise ValueError(
                f"{bad.size} pairs of {source.description} have no label_0 (first: row {int(bad[0])})"
            )
        ties = labels == 0.5
        stats.ties = int(ties.sum())
        stats.swapped = int((labels < 0.5).sum())
        if not keep_ties and stats.ties:
            rows = rows.select(np.flatnonzero(~ties))
        logger.info(
            "%s %d ties of %d pairs of %s",
            "kept" if keep_ties else "dropped",
            stats.ties,
            stats.seen,
            source.description,
        )
    if max_train_samples is not None:
        rows = rows.select(range(min(max_train_samples, len(rows))))
    return rows.with_transform(normalizer)
