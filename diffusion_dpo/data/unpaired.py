"""Unpaired (binary-feedback) data for Diffusion-KTO, and captioned images.

Source rows ``caption, image, label``: ``label`` says whether the image is desirable, as a bool,
1 / 0, or the strings ``"desirable"`` / ``"undesirable"`` (also ``"true"``/``"false"``, ``"1"``/``"0"``,
any case). Sources are those of :func:`~diffusion_dpo.data.pairs.load_rows` (hub id, parquet file or
folder, ``save_to_disk`` folder, JSONL / CSV with image paths relative to the file's folder).
Loaded rows are ``{"caption": str, "image": ImageLike, "desirable": bool, "bad": str | None}``. A
label that is none of these makes a bad row: checked at load time when loaded whole (an error naming
the rows, or the rows left out and counted in :class:`UnpairedStats`), marked ``bad`` for the
transform when streamed (as for pairs, see :mod:`diffusion_dpo.data.pairs`).

:func:`pairs_to_unpaired` turns preference pairs into such rows as Diffusion-KTO does with
Pick-a-Pic (Li et al. 2024, arXiv 2404.04465; docs/objectives.md#diffusion-kto): an image preferred in at least one
comparison is desirable, every other image undesirable, each image once (de-duplicated by a hash of
its encoded bytes).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from diffusion_dpo.data.pairs import (
    NAMED_BAD_ROWS,
    bad_label_error,
    column_names,
    load_rows,
    resolve_image_path,
    sample_rows,
)
from diffusion_dpo.data.transforms import (
    BadRowError,
    TransformOptions,
    _stack_pixels,
    check_caption,
    check_on_bad_example,
    collate_common,
    decode_image,
    image_bytes,
    raise_if_marked_bad,
    row_rng,
    transform_image,
)

logger = logging.getLogger(__name__)

UNPAIRED_COLUMNS = ("caption", "image", "label")
CAPTION_COLUMNS = ("caption", "image")
_TRUE = {"desirable", "true", "1", "yes"}
_FALSE = {"undesirable", "false", "0", "no"}


@dataclass
class UnpairedStats:
    """Label counts of a loaded unpaired dataset: of the rows kept (for a stream: of the rows iterated
    so far). KTO wants ``λD·n_desirable / (λU·n_undesirable)`` in [1, 4/3] (docs/objectives.md#kto)."""

    seen: int = 0
    desirable: int = 0
    undesirable: int = 0
    #: Rows whose label is neither desirable nor undesirable (left out, or placeholders when streaming).
    bad_labels: int = 0
    #: The first few of them: (row in the source, why).
    bad_label_rows: list[tuple[int, str]] = field(default_factory=list)


def _desirable(value) -> bool | None:
    """``True`` / ``False`` for a desirable / undesirable label, ``None`` for anything else."""
    if isinstance(value, bool):
        return value
    if hasattr(value, "item") and not isinstance(value, str):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _label_problem(value) -> str:
    return (
        f"label {value!r} is not desirable/undesirable (expected a bool, 1/0, or 'desirable'/'undesirable')"
    )


def parse_label(value, *, where: str = "label") -> bool:
    """``True`` for a desirable label, ``False`` for an undesirable one; :class:`BadRowError` otherwise."""
    desirable = _desirable(value)
    if desirable is None:
        raise BadRowError(f"{where}: {_label_problem(value)}")
    return desirable


class _UnpairedNormalizer:
    """Row -> ``{"caption", "image"[, "desirable"], "bad"}``. A streamed row with a bad label is
    marked ``bad`` (why, naming its ``index`` in the stream: in this worker's part of it, with
    DataLoader workers) and its ``desirable`` is None; loaded whole, bad labels were removed at load
    time."""

    def __init__(self, base_dir: str | None, labelled: bool, description: str):
        self.base_dir = base_dir
        self.labelled = labelled
        self.description = description

    def row(self, row: dict, index: int | None = None) -> dict:
        out = {
            "caption": row["caption"],
            "image": resolve_image_path(row["image"], self.base_dir),
            "bad": None,
        }
        if self.labelled:
            out["desirable"] = _desirable(row["label"])
            if out["desirable"] is None:
                out["bad"] = f"row {index} of {self.description}: {_label_problem(row['label'])}"
        return out

    def __call__(self, batch: dict) -> dict:
        n = len(batch["caption"])
        rows = [self.row({k: v[i] for k, v in batch.items()}) for i in range(n)]
        keys = ("caption", "image", "bad", "desirable") if self.labelled else ("caption", "image", "bad")
        return {key: [r[key] for r in rows] for key in keys}


class _LabelCounter:
    """Streaming filter that keeps every row and counts its label, bad ones included."""

    def __init__(self, stats: UnpairedStats):
        self.stats = stats

    def __call__(self, row: dict, index: int) -> bool:
        if row["bad"] is not None:
            self.stats.bad_labels += 1
            if len(self.stats.bad_label_rows) < NAMED_BAD_ROWS:
                self.stats.bad_label_rows.append((index, row["bad"]))
            return True
        self.stats.seen += 1
        self.stats.desirable += row["desirable"]
        self.stats.undesirable += not row["desirable"]
        return True


def _parse_labels(values: list) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """([N] int8: 1 desirable, 0 undesirable, -1 bad; [(row, why)] of the bad ones)."""
    desirable = np.array([{True: 1, False: 0, None: -1}[_desirable(v)] for v in values], dtype=np.int8)
    return desirable, [(int(i), _label_problem(values[i])) for i in np.flatnonzero(desirable < 0)]


def _load(
    dataset_name,
    *,
    required,
    split,
    streaming,
    max_train_samples,
    cache_dir,
    stats,
    seed,
    on_bad_example,
    load_kwargs,
):
    check_on_bad_example(on_bad_example)
    source = load_rows(dataset_name, split, streaming=streaming, cache_dir=cache_dir, **load_kwargs)
    names = column_names(source)
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(
            f"missing columns {missing}; found columns {sorted(names)} in {source.description}. "
            f"This dataset needs columns {', '.join(required)}."
        )
    labelled = "label" in required
    rows = source.rows.select_columns(list(required))
    normalizer = _UnpairedNormalizer(source.base_dir, labelled, source.description)
    if streaming:
        # with_indices: a row's position in this iteration of the stream, from 0 again each epoch.
        rows = rows.map(
            normalizer.row, with_indices=True, remove_columns=[c for c in required if c != "caption"]
        )
        if labelled and stats is not None:
            rows = rows.filter(_LabelCounter(stats), with_indices=True)
        return rows.take(max_train_samples) if max_train_samples is not None else rows
    kept = np.arange(len(rows))
    if labelled:
        # Labels are small: check them all now, so a bad one is found at load time, naming its row.
        # Python values: a JSON column of mixed types is stored as JSON text and decoded only there.
        desirable, problems = _parse_labels(rows.select_columns(["label"]).with_format(None)[:]["label"])
        if problems and on_bad_example == "error":
            raise bad_label_error(problems, "rows", source.description)
        if problems:
            logger.warning(
                "left out %d rows of %s with a bad label (first: row %d: %s)",
                len(problems),
                source.description,
                *problems[0],
            )
        kept = np.flatnonzero(desirable >= 0)
    kept = kept[sample_rows(len(kept), max_train_samples, seed)]
    if labelled:
        stats = stats if stats is not None else UnpairedStats()
        stats.seen, stats.desirable = len(kept), int(desirable[kept].sum())
        stats.undesirable = stats.seen - stats.desirable
        stats.bad_labels, stats.bad_label_rows = len(problems), problems[:NAMED_BAD_ROWS]
        logger.info(
            "%d images from %s: %d desirable, %d undesirable",
            stats.seen,
            source.description,
            stats.desirable,
            stats.undesirable,
        )
    if len(kept) < len(rows):
        rows = rows.select(kept)
    return rows.with_transform(normalizer)


def load_unpaired_dataset(
    dataset_name,
    split: str = "train",
    streaming: bool = False,
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
    stats: UnpairedStats | None = None,
    *,
    seed: int = 0,
    on_bad_example: str = "error",
    **load_kwargs,
):
    """Load ``caption, image, label`` rows as ``{"caption", "image", "desirable": bool, "bad"}``.

    A ``datasets.Dataset`` (normalised lazily on access; every label parsed at load time) or, with
    ``streaming``, a ``datasets.IterableDataset``. ``on_bad_example``: what a bad label does when
    loaded whole: ``"error"`` raises a ``ValueError`` naming the first such rows, ``"skip"`` leaves
    them out (counted in ``stats``); streamed, the row is marked ``bad`` for the transform.
    ``stats`` gets the label counts of the rows kept. ``max_train_samples`` keeps N rows drawn at
    random with ``seed`` (after bad labels are left out), in their stored order; when streaming,
    the first N.
    """
    return _load(
        dataset_name, required=UNPAIRED_COLUMNS, split=split, streaming=streaming,
        max_train_samples=max_train_samples, cache_dir=cache_dir, stats=stats, seed=seed,
        on_bad_example=on_bad_example, load_kwargs=load_kwargs,
    )  # fmt: skip


def load_caption_dataset(
    dataset_name,
    split: str = "train",
    streaming: bool = False,
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
    *,
    seed: int = 0,
    on_bad_example: str = "error",
    **load_kwargs,
):
    """Load ``caption, image`` rows (e.g. for pretraining or SFT) as ``{"caption", "image", "bad"}``;
    any other column is ignored. Transform with :class:`UnpairedTransform` (``labelled=False``),
    batch with :func:`collate_unpaired` (no ``desirable`` key then). ``max_train_samples`` and
    ``seed`` as for :func:`load_unpaired_dataset`; ``on_bad_example`` is accepted (and checked) so
    that every loader takes the same arguments, but there is no label to check at load time."""
    return _load(
        dataset_name, required=CAPTION_COLUMNS, split=split, streaming=streaming,
        max_train_samples=max_train_samples, cache_dir=cache_dir, stats=None, seed=seed,
        on_bad_example=on_bad_example, load_kwargs=load_kwargs,
    )  # fmt: skip


@dataclass
class UnpairedTransform(TransformOptions):
    """Turns a row ``{"caption", "image"[, "desirable"]}`` into training tensors: resize (shorter
    side), center or random crop, random flip, [-1, 1]; caption dropout with probability
    ``proportion_empty_prompts``. Randomness from ``(seed, epoch, index)`` only (see
    :func:`~diffusion_dpo.data.transforms.row_rng`)."""

    #: The rows carry a ``desirable`` label (KTO data from :func:`load_unpaired_dataset`), which
    #: every example then has, placeholders included (``False``); plain captioned images have none.
    labelled: bool = False

    _image_suffixes: ClassVar[tuple[str, ...]] = ("",)

    def __call__(self, row: dict, *, index: int, epoch: int = 0) -> dict:
        """Returns ``pixel_values`` [3, R, R] uint8, ``caption``, ``index``, ``bad``
        None, ``desirable`` bool (if ``labelled``) and, for SDXL, ``original_size`` (h, w) and
        ``crop_top_left`` (top, left). Raises :class:`BadRowError` naming the row for a bad caption
        or image, or a row marked bad by loading."""
        if ("desirable" in row) != self.labelled:
            raise ValueError(
                f"row {index} {'has' if 'desirable' in row else 'has no'} 'desirable' label but the "
                f"transform has labelled={self.labelled}; use UnpairedTransform(labelled=True) for "
                "load_unpaired_dataset rows and labelled=False for load_caption_dataset rows"
            )
        raise_if_marked_bad(row)
        caption = check_caption(row.get("caption"), where=f"row {index}")
        image = decode_image(row.get("image"), where=f"row {index}, image")
        rng = row_rng(self.seed, epoch, index)
        if rng.random() < self.proportion_empty_prompts:
            caption = ""
        transformed = transform_image(image, rng, self.resolution, self.center_crop, self.random_flip)
        out = {"caption": caption, "index": index, "bad": None, **self._image_fields("", *transformed)}
        if self.labelled:
            out["desirable"] = bool(row["desirable"])
        return out

    def placeholder(self, index: int, reason: str) -> dict:
        out = super().placeholder(index, reason)
        if self.labelled:
            out["desirable"] = False
        return out


def collate_unpaired(examples: list[dict]) -> dict:
    """Batch :class:`UnpairedTransform` outputs, placeholders included, so every batch has B rows.

    Returns ``pixel_values`` [B, 3, R, R] uint8, ``captions`` list[str], ``indices``
    [B] long, ``valid`` [B] bool (False for placeholders), ``bad_rows`` list of ``{"index",
    "reason"}`` (one per placeholder), ``num_skipped`` int, ``desirable`` [B] bool (labelled rows;
    False for placeholders) and, for SDXL, ``original_sizes`` [B, 2] long (h, w) and
    ``crop_top_lefts`` [B, 2] long (top, left).
    """
    batch = {"pixel_values": _stack_pixels([e["pixel_values"] for e in examples]), **collate_common(examples)}
    if "desirable" in examples[0]:
        batch["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
    if "original_size" in examples[0]:
        batch["original_sizes"] = torch.tensor([e["original_size"] for e in examples], dtype=torch.long)
        batch["crop_top_lefts"] = torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long)
    return batch


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _read(value, where: str) -> bytes:
    try:
        return image_bytes(value)
    except (OSError, ValueError, TypeError) as error:
        raise BadRowError(f"{where}: cannot read image ({type(error).__name__}: {error})") from error


def iter_unpaired_from_pairs(pairs: Iterable[dict]) -> Iterator[dict]:
    """Unary rows ``caption, image (bytes), label (bool)`` from normalised pair rows (``caption,
    image_w, image_l``, e.g. from :func:`~diffusion_dpo.data.pairs.load_pair_dataset`).

    An image is desirable if it won at least one comparison; each image (by a hash of its bytes)
    appears once, with the caption of its first pair. Iterates ``pairs`` twice (so it must be
    re-iterable): once for the winners, once to emit. Ties are dropped by the pair loader by default,
    so an image seen only in ties does not appear; nor does one seen only in pairs that a streaming
    loader marked ``bad`` (a bad label says nothing about which image won).
    """
    winners = {
        _digest(_read(row["image_w"], f"pair {i}, image_w"))
        for i, row in enumerate(pairs)
        if row.get("bad") is None
    }
    emitted: set[bytes] = set()
    n_pairs = duplicates = 0
    for i, row in enumerate(pairs):
        if row.get("bad") is not None:
            continue
        n_pairs += 1
        for key in ("image_w", "image_l"):
            data = _read(row[key], f"pair {i}, {key}")
            digest = _digest(data)
            if digest in emitted:
                duplicates += 1
                continue
            emitted.add(digest)
            yield {"caption": row["caption"], "image": data, "label": digest in winners}
    logger.info(
        "%d pairs -> %d images (%d desirable); %d repeated images merged",
        n_pairs,
        len(emitted),
        len(winners & emitted),
        duplicates,
    )


def pairs_to_unpaired(pairs: Iterable[dict], output_path: str | os.PathLike | None = None):
    """:func:`iter_unpaired_from_pairs` as a ``datasets.Dataset`` with columns ``caption``, ``image``
    (bytes), ``label`` (bool), loadable by :func:`load_unpaired_dataset`.

    With ``output_path`` the rows are streamed to that parquet file in chunks and the dataset is
    memory-mapped from it (for large sources such as Pick-a-Pic); without, it is built in memory.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("caption", pa.string()), ("image", pa.binary()), ("label", pa.bool_())])
    rows = iter_unpaired_from_pairs(pairs)
    if output_path is None:
        features = datasets.Features(
            caption=datasets.Value("string"), image=datasets.Value("binary"), label=datasets.Value("bool")
        )
        return datasets.Dataset.from_list(list(rows), features=features)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(str(output_path), schema) as writer:
        buffer: list[dict] = []
        for row in rows:
            buffer.append(row)
            if len(buffer) == 4096:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer = []
        writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
    return datasets.load_dataset("parquet", data_files=str(output_path), split="train")
