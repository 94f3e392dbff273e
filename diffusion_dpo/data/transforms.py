"""Per-row image transforms and torch dataset wrappers for preference data.

A row's randomness (caption dropout, random crop, horizontal flip) comes from its own generator,
seeded by ``(seed, epoch, index)`` and never from global state. Resuming a run at some step therefore
gives the very tensors the uninterrupted run would have seen, without replaying the data loader, and
the result does not depend on the number of DataLoader workers.

Images are decoded here, at transform time, not at load time: a corrupt image or a bad caption is
found when its row is first used, and reported as a :class:`BadRowError` naming the row (or skipped
and counted, with ``skip_bad_rows=True``), instead of crashing deep inside PIL.

Image values may be encoded bytes, a file path, a ``{"bytes": ..., "path": ...}`` dict (how
``datasets.Image(decode=False)`` stores images) or a ``PIL.Image``; :func:`decode_image` takes any of
them.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

#: What an image cell may hold (see the module docstring).
ImageLike = bytes | str | os.PathLike | dict | Image.Image


class BadRowError(ValueError):
    """A row that cannot be used: an undecodable image, an empty or non-string caption, a bad label."""


def row_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that makes every random decision of one row, from ``(seed, epoch, index)`` only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


def image_bytes(value: ImageLike) -> bytes:
    """The encoded bytes of an image cell (reads a path; encodes a PIL image as PNG)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, str | os.PathLike):
        return Path(value).read_bytes()
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def decode_image(value: ImageLike, *, where: str = "image") -> Image.Image:
    """Decode an image cell into a fully loaded RGB ``PIL.Image``.

    Raises :class:`BadRowError` naming ``where`` (e.g. ``"row 12, image_w"``) when the value is
    missing, unreadable or not a valid image.
    """
    if value is None:
        raise BadRowError(f"{where}: image is missing (None)")
    try:
        if isinstance(value, Image.Image):
            image = value
        else:
            if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
                value = value["path"]
            if isinstance(value, str | os.PathLike):
                image = Image.open(value)
            else:
                image = Image.open(io.BytesIO(image_bytes(value)))
        image.load()  # PIL decodes lazily; force it here so a truncated file fails now
        return image.convert("RGB")
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadRowError(f"{where}: cannot decode image ({type(error).__name__}: {error})") from error


def check_caption(caption: Any, *, where: str = "caption") -> str:
    """Return ``caption`` if it is a non-empty string, else raise :class:`BadRowError` naming ``where``."""
    if not isinstance(caption, str):
        raise BadRowError(f"{where}: caption is a {type(caption).__name__} ({caption!r}), not a string")
    if not caption.strip():
        raise BadRowError(f"{where}: caption is empty")
    return caption


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    # torchvision.transforms.Resize(size) on a PIL image: shorter side -> size, aspect kept, bilinear.
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def transform_image(
    image: Image.Image,
    rng: np.random.Generator,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = True,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize (shorter side), crop and maybe flip one RGB image; scale it to [-1, 1].

    Always draws exactly three numbers from ``rng`` (crop top, crop left, flip), whatever the options,
    so the decisions for later images of the same row do not depend on them.

    Returns ``(pixels [3, resolution, resolution] float32 in [-1, 1], original_size (h, w),
    crop_top_left (top, left))``. ``crop_top_left`` is the crop's corner in the resized image before
    any flip, as the Diffusion-DPO SDXL code feeds it to ``add_time_ids``.
    """
    original_size = (image.height, image.width)
    image = _resize_shorter_side(image, resolution)
    top_draw, left_draw, flip_draw = rng.random(3)
    slack_h, slack_w = image.height - resolution, image.width - resolution
    if center_crop:
        top, left = int(round(slack_h / 2.0)), int(round(slack_w / 2.0))
    else:
        top, left = int(top_draw * (slack_h + 1)), int(left_draw * (slack_w + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]
    if random_flip and flip_draw < 0.5:
        pixels = pixels.flip(-1)
    pixels = pixels.float() / 127.5 - 1.0
    return pixels, original_size, (top, left)


@dataclass
class TransformOptions:
    """What every row transform shares: size, crop, flip, caption dropout, SDXL fields, seed."""

    resolution: int = 512
    #: Center crop (True) or a random crop (False).
    center_crop: bool = False
    #: Flip each image horizontally with probability 0.5.
    random_flip: bool = True
    #: Probability that a row's caption is replaced by "" (classifier-free guidance dropout).
    proportion_empty_prompts: float = 0.0
    #: Also return each image's ``original_size`` and ``crop_top_left`` (SDXL micro-conditioning).
    sdxl: bool = False
    #: Seed of the per-row generators (see :func:`row_rng`).
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(
                f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}"
            )
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")


@dataclass
class PairTransform(TransformOptions):
    """Turns a normalised pair row (``caption``, ``image_w``, ``image_l``) into training tensors.

    Each image is resized, cropped and flipped independently, as in the Diffusion-DPO code's
    ``train_transforms``; caption dropout is decided once per pair (Wallace et al. 2023, ``train.py``),
    so both images of a pair always see the same (possibly empty) caption.
    """

    def __call__(self, row: dict, *, index: int, epoch: int = 0) -> dict:
        """Returns ``pixel_values_w``/``pixel_values_l`` [3, R, R] in [-1, 1], ``caption`` str,
        ``index`` int and, for SDXL, ``original_size_w``/``_l`` (h, w) and ``crop_top_left_w``/``_l``
        (top, left). Raises :class:`BadRowError` naming the row for a bad caption or image."""
        caption = check_caption(row.get("caption"), where=f"row {index}")
        image_w = decode_image(row.get("image_w"), where=f"row {index}, image_w")
        image_l = decode_image(row.get("image_l"), where=f"row {index}, image_l")
        rng = row_rng(self.seed, epoch, index)
        if rng.random() < self.proportion_empty_prompts:
            caption = ""
        out = {"caption": caption, "index": index}
        for suffix, image in (("w", image_w), ("l", image_l)):
            pixels, original_size, crop_top_left = transform_image(
                image, rng, self.resolution, self.center_crop, self.random_flip
            )
            out[f"pixel_values_{suffix}"] = pixels
            if self.sdxl:
                out[f"original_size_{suffix}"] = original_size
                out[f"crop_top_left_{suffix}"] = crop_top_left
        return out


def _stack_pixels(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).contiguous(memory_format=torch.contiguous_format).float()


def collate_pairs(examples: list[dict | None]) -> dict | None:
    """Batch :class:`PairTransform` outputs. ``None`` entries (bad rows skipped) are dropped.

    Returns
        ``pixel_values_w``, ``pixel_values_l``: [B, 3, R, R] float32 in [-1, 1], winners and losers;
        ``captions``: list[str] of length B (shared by both images of a pair);
        ``indices``: [B] long, the rows' dataset indices;
        ``num_skipped``: int, bad rows dropped from this batch;
        for SDXL also ``original_sizes_w``, ``original_sizes_l`` ([B, 2] long, (h, w)) and
        ``crop_top_lefts_w``, ``crop_top_lefts_l`` ([B, 2] long, (top, left)).
    ``None`` when every row of the batch was skipped.
    """
    kept = [e for e in examples if e is not None]
    if not kept:
        return None
    batch = {
        "pixel_values_w": _stack_pixels([e["pixel_values_w"] for e in kept]),
        "pixel_values_l": _stack_pixels([e["pixel_values_l"] for e in kept]),
        "captions": [e["caption"] for e in kept],
        "indices": torch.tensor([e["index"] for e in kept], dtype=torch.long),
        "num_skipped": len(examples) - len(kept),
    }
    if "original_size_w" in kept[0]:
        for key in ("original_size_w", "original_size_l", "crop_top_left_w", "crop_top_left_l"):
            name = key.replace("original_size", "original_sizes").replace("crop_top_left", "crop_top_lefts")
            batch[name] = torch.tensor([e[key] for e in kept], dtype=torch.long)  # [B, 2]
    return batch


class TransformedDataset(torch.utils.data.Dataset):
    """A map-style torch ``Dataset``: ``source[index]`` passed through ``transform(row, index=, epoch=)``.

    ``source`` is anything indexable with a length (a ``datasets.Dataset`` from
    :func:`~diffusion_dpo.data.pairs.load_pair_dataset`, a list of rows). Call :meth:`set_epoch` at
    the start of every epoch (with non-persistent DataLoader workers, which copy the dataset at each
    epoch's start) so random crops, flips and caption dropout change between epochs.

    With ``skip_bad_rows`` a :class:`BadRowError` is logged and the row returns ``None``, which the
    collate functions drop and count (``num_skipped``); without it the error propagates.
    """

    def __init__(self, source, transform: Callable[..., dict], *, skip_bad_rows: bool = False):
        self.source = source
        self.transform = transform
        self.skip_bad_rows = skip_bad_rows
        self.epoch = 0
        #: Bad rows skipped in this process (with DataLoader workers, use the batches' ``num_skipped``).
        self.num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        try:
            return self.transform(self.source[index], index=index, epoch=self.epoch)
        except BadRowError as error:
            if not self.skip_bad_rows:
                raise
            self.num_skipped += 1
            logger.warning("skipping bad row (%d skipped so far): %s", self.num_skipped, error)
            return None


class TransformedIterableDataset(torch.utils.data.IterableDataset):
    """The streaming counterpart of :class:`TransformedDataset` over an iterable of rows.

    A row's index is its position in the stream of this epoch. With DataLoader workers, a
    ``datasets.IterableDataset`` source gives each worker its own shards (workers beyond the number of
    shards get none); the index is then ``position_in_worker * active_workers + worker_id``: unique
    within the epoch, reproducible for a fixed number of workers, and equal to the single-process
    index when the source has one shard. Bad rows are skipped (and counted) only with ``skip_bad_rows``.
    """

    def __init__(
        self, source: Iterable[dict], transform: Callable[..., dict], *, skip_bad_rows: bool = False
    ):
        self.source = source
        self.transform = transform
        self.skip_bad_rows = skip_bad_rows
        self.epoch = 0
        self.num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the transforms and of the source's shuffling, if it has any."""
        self.epoch = int(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.epoch)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        # A datasets.IterableDataset idles the workers beyond its number of shards; count only those
        # that get data, so that one worker per shard numbers rows as a single process would.
        num_workers = max(1, min(num_workers, getattr(self.source, "num_shards", num_workers)))
        for position, row in enumerate(self.source):
            index = position * num_workers + worker_id
            try:
                yield self.transform(row, index=index, epoch=self.epoch)
            except BadRowError as error:
                if not self.skip_bad_rows:
                    raise
                self.num_skipped += 1
                logger.warning("skipping bad row (%d skipped so far): %s", self.num_skipped, error)


def make_torch_dataset(source, transform: Callable[..., dict], *, skip_bad_rows: bool = False):
    """Wrap ``source`` in :class:`TransformedIterableDataset` if it is a stream (a
    ``datasets.IterableDataset`` or anything without a length), else in :class:`TransformedDataset`."""
    if isinstance(source, torch.utils.data.IterableDataset) or not hasattr(source, "__len__"):
        return TransformedIterableDataset(source, transform, skip_bad_rows=skip_bad_rows)
    return TransformedDataset(source, transform, skip_bad_rows=skip_bad_rows)
