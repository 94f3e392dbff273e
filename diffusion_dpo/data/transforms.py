"""Per-row image transforms and torch dataset wrappers for preference data.

A row's randomness (caption dropout, random crop, horizontal flip) comes from its own generator,
seeded by ``(seed, epoch, index)`` and never from global state. Resuming a run at some step therefore
gives the very tensors the uninterrupted run would have seen, without replaying the data loader, and
the result does not depend on the number of DataLoader workers.

Images are decoded here, at transform time, not at load time: a corrupt image, a missing file or a
bad caption is found when its row is first used and reported as a :class:`BadRowError` naming the
row and the column. With ``on_bad_example="skip"`` the dataset wrappers log it and return the
transform's :meth:`~TransformOptions.placeholder` instead: an example of the usual keys and shapes
marked ``bad``, so that every process of a distributed run still sees full batches of one shape, and
the trainer can mask and count the placeholders (the collate functions' ``valid`` and ``bad_rows``).

Image values may be encoded bytes, a file path, a ``{"bytes": ..., "path": ...}`` dict (how
``datasets.Image(decode=False)`` stores images) or a ``PIL.Image``; :func:`decode_image` takes any of
them and returns RGB (see :func:`to_rgb` for the modes it converts).

Why one module of ~460 lines: a row's decode, checks, crops, flips and dropout share its generator and
its bad-row handling, which the image path and the latent cache's transform both follow.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

#: What an image cell may hold (see the module docstring).
ImageLike = bytes | str | os.PathLike | dict | Image.Image


class BadRowError(ValueError):
    """A row that cannot be used: an undecodable or missing image, a missing or non-string caption,
    a label that is not one of the allowed values. The message names the row (and the column)."""


#: Values of ``on_bad_example``: raise the :class:`BadRowError`, or train on a placeholder.
ON_BAD_EXAMPLE = ("error", "skip")


def check_on_bad_example(value: str) -> str:
    if value not in ON_BAD_EXAMPLE:
        raise ValueError(f"on_bad_example must be one of {ON_BAD_EXAMPLE}, got {value!r}")
    return value


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


def _open_image(value: ImageLike, where: str) -> Image.Image:
    """``Image.open`` on any image cell; :class:`BadRowError` for a missing value, file or bytes."""
    if value is None:
        raise BadRowError(f"{where}: image is missing (None)")
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise BadRowError(f"{where}: image dict has neither 'bytes' nor 'path'")
    if isinstance(value, str | os.PathLike):
        if not os.path.isfile(value):
            raise BadRowError(f"{where}: image file {os.fspath(value)!r} does not exist")
        data = Path(value).read_bytes()
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    else:
        raise BadRowError(f"{where}: cannot read an image from a {type(value).__name__} ({value!r:.40})")
    if not data:
        raise BadRowError(f"{where}: image is empty (0 bytes)")
    return Image.open(io.BytesIO(data))


def decode_image(value: ImageLike, *, where: str = "image") -> Image.Image:
    """Decode an image cell into a fully loaded, upright RGB ``PIL.Image`` (see :func:`to_rgb`).

    Raises :class:`BadRowError` naming ``where`` (e.g. ``"row 12, image_w"``) when the value is
    missing, the file does not exist or is empty, or the bytes are not a decodable image.
    """
    try:
        image = _open_image(value, where)
        image.load()  # PIL decodes lazily; force it here so a truncated file fails now
        # an image decoded here is ours to change: no copies of its pixels (a given PIL image is not)
        return _upright_rgb(image, owned=image is not value)
    except (BadRowError, MemoryError):
        raise
    except Exception as error:
        # Hostile bytes make PIL raise nearly anything (OSError, SyntaxError, struct.error,
        # IndexError, zlib.error, DecompressionBombError, ...): all of it is this row's problem.
        # KeyboardInterrupt and SystemExit are not Exceptions and pass; so does MemoryError (above).
        raise BadRowError(f"{where}: cannot decode image ({type(error).__name__}: {error})") from error


#: Grayscale modes with more than 8 bits, and the value that maps to white (255).
_WIDE_GRAY_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright 8-bit RGB copy of ``image``, whatever its mode.

    - The EXIF orientation is applied (phone photos are stored sideways with an orientation tag).
    - Transparent images (``RGBA``, ``LA``, ``PA``, premultiplied modes, and ``P``/``L``/``RGB`` with a
      ``transparency`` entry) are composited onto white: dropping the alpha channel would show
      whatever colour the invisible pixels happen to hold.
    - 16-bit and 32-bit integer grayscale (``I;16``, ``I``) is scaled from [0, 65535] and float
      grayscale (``F``) from [0, 1] to [0, 255]; PIL's own ``convert`` would clip both at 255.
    - Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through ``convert("RGB")``.
    """
    return _upright_rgb(image, owned=False)


def _upright_rgb(image: Image.Image, owned: bool) -> Image.Image:
    """:func:`to_rgb`; with ``owned`` (an image nobody else holds) the orientation is applied in place and
    an RGB image is returned as it is: the same pixels without the two copies per image that
    ``exif_transpose`` and ``convert`` make otherwise (per training row, every step)."""
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GRAY_WHITE:
        gray = np.asarray(image, dtype=np.float64) * (255.0 / _WIDE_GRAY_WHITE[image.mode])
        gray = np.nan_to_num(gray, nan=0.0)
        return Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if owned and image.mode == "RGB":
        return image
    return image.convert("RGB")


def check_caption(caption: Any, *, where: str = "caption") -> str:
    """The caption to train on: ``caption`` itself, or ``""`` for an empty or whitespace-only one
    (a legitimate unconditional example, as caption dropout makes). Raises :class:`BadRowError`
    naming ``where`` for ``None`` or a non-string (e.g. a float NaN from an empty CSV cell)."""
    if caption is None:
        raise BadRowError(f"{where}: caption is missing (None)")
    if not isinstance(caption, str):
        raise BadRowError(f"{where}: caption is a {type(caption).__name__} ({caption!r}), not a string")
    return caption if caption.strip() else ""


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
    """Resize (shorter side), maybe flip, crop one RGB image.

    Always draws exactly three numbers from ``rng`` (crop top, crop left, flip), whatever the options,
    so the decisions for later images of the same row do not depend on them.

    Returns ``(pixels [3, resolution, resolution] uint8, original_size (h, w), crop_top_left (top,
    left))``; the step scales pixels to [-1, 1] where it uses them
    (:func:`~diffusion_dpo.models.loading.to_unit_range`). The flip comes before the crop, so ``crop_top_left`` is the crop's
    corner in the image the model sees (the resized image, flipped or not), which is what SDXL's
    micro-conditioning (``add_time_ids``) describes.
    """
    top_draw, left_draw, flip_draw = rng.random(3)
    flip = random_flip and flip_draw < 0.5
    return crop_image(
        image, resolution, flip=flip, center_crop=center_crop, top_draw=top_draw, left_draw=left_draw
    )


def crop_image(
    image: Image.Image,
    resolution: int,
    *,
    flip: bool,
    center_crop: bool,
    top_draw: float = 0.0,
    left_draw: float = 0.0,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """What :func:`transform_image` does once its draws are made: resize, flip if ``flip``, crop (at the
    center, or where ``top_draw``/``left_draw`` in [0, 1) put a random crop). The latent cache calls it
    with both values of ``flip``. Returns as :func:`transform_image`: uint8 pixels."""
    original_size = (image.height, image.width)
    image = _resize_shorter_side(image, resolution)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    slack_h, slack_w = image.height - resolution, image.width - resolution
    if center_crop:
        top, left = int(round(slack_h / 2.0)), int(round(slack_w / 2.0))
    else:
        top, left = int(top_draw * (slack_h + 1)), int(left_draw * (slack_w + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    # uint8 [3, H, W]: a quarter of float32's bytes through the workers' queues and to the GPU
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels, original_size, (top, left)


@dataclass
class TransformOptions:
    """What every row transform shares: size, crop, flip, caption dropout, SDXL fields, seed.

    A subclass names its images' key suffixes in ``_image_suffixes`` and builds each image's fields
    with :meth:`_image_fields`, so that :meth:`placeholder` has exactly the keys of ``__call__``.
    """

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

    _image_suffixes: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(
                f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}"
            )
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def _image_fields(self, suffix: str, pixels, original_size, crop_top_left) -> dict:
        fields = {f"pixel_values{suffix}": pixels}
        if self.sdxl:
            fields[f"original_size{suffix}"] = tuple(original_size)
            fields[f"crop_top_left{suffix}"] = tuple(crop_top_left)
        return fields

    def placeholder(self, index: int, reason: str) -> dict:
        """What a bad row trains as when skipped: the keys, dtypes and shapes of ``__call__``'s
        output, with zero pixels [3, R, R] uint8, caption ``""``, SDXL sizes (R, R) and crops (0, 0), and
        ``bad`` = ``reason`` (``None`` in a good example)."""
        size = self.resolution
        out = {"caption": "", "index": int(index), "bad": str(reason)}
        for suffix in self._image_suffixes:
            zeros = torch.zeros(3, size, size, dtype=torch.uint8)
            out.update(self._image_fields(suffix, zeros, (size, size), (0, 0)))
        return out


def raise_if_marked_bad(row: dict) -> None:
    """Raise the :class:`BadRowError` of a row that loading marked ``bad`` (streamed rows with a bad
    label pass through marked, so that the dataset's ``on_bad_example`` decides)."""
    if row.get("bad") is not None:
        raise BadRowError(str(row["bad"]))


@dataclass
class PairTransform(TransformOptions):
    """Turns a normalised pair row (``caption``, ``image_w``, ``image_l``) into training tensors.

    Each image is resized, cropped and flipped independently, as in the Diffusion-DPO code's
    ``train_transforms``; caption dropout is decided once per pair (Wallace et al. 2023, ``train.py``),
    so both images of a pair always see the same (possibly empty) caption.
    """

    _image_suffixes: ClassVar[tuple[str, ...]] = ("_w", "_l")

    def __call__(self, row: dict, *, index: int, epoch: int = 0) -> dict:
        """Returns ``pixel_values_w``/``pixel_values_l`` [3, R, R] uint8, ``caption``
        str, ``index`` int, ``bad`` None and, for SDXL, ``original_size_w``/``_l`` (h, w) and
        ``crop_top_left_w``/``_l`` (top, left). Raises :class:`BadRowError` naming the row for a bad
        caption or image, or a row marked bad by loading."""
        raise_if_marked_bad(row)
        caption = check_caption(row.get("caption"), where=f"row {index}")
        image_w = decode_image(row.get("image_w"), where=f"row {index}, image_w")
        image_l = decode_image(row.get("image_l"), where=f"row {index}, image_l")
        rng = row_rng(self.seed, epoch, index)
        if rng.random() < self.proportion_empty_prompts:
            caption = ""
        # p: P(image_w preferred), 1 unless the data carries vote shares (docs/data.md#soft-labels)
        out = {"caption": caption, "index": index, "bad": None, "p": float(row.get("p", 1.0))}
        for suffix, image in (("_w", image_w), ("_l", image_l)):
            transformed = transform_image(image, rng, self.resolution, self.center_crop, self.random_flip)
            out.update(self._image_fields(suffix, *transformed))
        return out

    def placeholder(self, index: int, reason: str) -> dict:
        # a skipped pair's loss is masked out; p = 1 keeps the label statistics of real pairs only
        return {**super().placeholder(index, reason), "p": 1.0}


def _stack_pixels(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).contiguous(memory_format=torch.contiguous_format)


def collate_common(examples: list[dict]) -> dict:
    """The keys every batch has: ``captions`` list[str] (B), ``indices`` [B] long, ``valid`` [B]
    bool (False for placeholders), ``bad_rows`` list of ``{"index", "reason"}`` (one per
    placeholder), ``num_skipped`` int (the number of placeholders)."""
    bad_rows = [{"index": int(e["index"]), "reason": e["bad"]} for e in examples if e["bad"] is not None]
    return {
        "captions": [e["caption"] for e in examples],
        "indices": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "valid": torch.tensor([e["bad"] is None for e in examples], dtype=torch.bool),
        "bad_rows": bad_rows,
        "num_skipped": len(bad_rows),
    }


def collate_pairs(examples: list[dict]) -> dict:
    """Batch :class:`PairTransform` outputs, placeholders included, so every batch has B rows.

    Returns
        ``pixel_values_w``, ``pixel_values_l``: [B, 3, R, R] uint8, winners and losers;
        ``captions``: list[str] of length B (shared by both images of a pair);
        ``indices``: [B] long, the rows' dataset indices;
        ``valid``: [B] bool, False where the row is a placeholder for a bad row (mask its loss);
        ``bad_rows``: list of ``{"index": int, "reason": str}``, one per placeholder;
        ``num_skipped``: int, the number of placeholders (``len(bad_rows)``);
        ``label_p``: [B] float32, P(winner preferred) of each pair (1 for placeholders);
        for SDXL also ``original_sizes_w``, ``original_sizes_l`` ([B, 2] long, (h, w)) and
        ``crop_top_lefts_w``, ``crop_top_lefts_l`` ([B, 2] long, (top, left)).
    """
    batch = {
        "pixel_values_w": _stack_pixels([e["pixel_values_w"] for e in examples]),
        "pixel_values_l": _stack_pixels([e["pixel_values_l"] for e in examples]),
        "label_p": torch.tensor([float(e.get("p", 1.0)) for e in examples], dtype=torch.float32),
        **collate_common(examples),
    }
    if "original_size_w" in examples[0]:
        for key in ("original_size_w", "original_size_l", "crop_top_left_w", "crop_top_left_l"):
            name = key.replace("original_size", "original_sizes").replace("crop_top_left", "crop_top_lefts")
            batch[name] = torch.tensor([e[key] for e in examples], dtype=torch.long)  # [B, 2]
    return batch


#: Warn about each of the first bad rows of a process, then only about every ``_LOG_EVERY``-th: a
#: stream of hundreds of GB can hold thousands of bad rows, and each one need not flood the log.
_LOG_FIRST, _LOG_EVERY = 10, 1000


def _log_placeholder(count: int, error: BadRowError) -> None:
    if count <= _LOG_FIRST:
        quieter = f"; from now on only every {_LOG_EVERY}th is logged" if count == _LOG_FIRST else ""
        logger.warning("bad row replaced by a placeholder (%d in this process%s): %s", count, quieter, error)
    elif count % _LOG_EVERY == 0:
        logger.warning("%d bad rows replaced by placeholders in this process; latest: %s", count, error)


class TransformedRows:
    """What the dataset wrappers (and :class:`~diffusion_dpo.data.stream.ShuffledStream`) share: the
    epoch and the ``on_bad_example`` policy."""

    def __init__(self, source, transform: Callable[..., dict], *, on_bad_example: str = "error"):
        self.source = source
        self.transform = transform
        self.on_bad_example = check_on_bad_example(on_bad_example)
        if on_bad_example == "skip" and not hasattr(transform, "placeholder"):
            raise TypeError("on_bad_example='skip' needs a transform with a placeholder() method")
        self.epoch = 0
        #: Placeholders returned in this process (each DataLoader worker has its own count; the
        #: batches' ``num_skipped`` and ``bad_rows`` are what the trainer should add up).
        self.num_skipped = 0

    def _example(self, row: dict, index: int) -> dict:
        try:
            return self.transform(row, index=index, epoch=self.epoch)
        except BadRowError as error:
            if self.on_bad_example == "error":
                raise
            self.num_skipped += 1
            _log_placeholder(self.num_skipped, error)
            return self.transform.placeholder(index, str(error))


class TransformedDataset(TransformedRows, torch.utils.data.Dataset):
    """A map-style torch ``Dataset``: ``source[index]`` passed through ``transform(row, index=, epoch=)``.

    ``source`` is anything indexable with a length (a ``datasets.Dataset`` from
    :func:`~diffusion_dpo.data.pairs.load_pair_dataset`, a list of rows). Call :meth:`set_epoch` at
    the start of every epoch (with non-persistent DataLoader workers, which copy the dataset at each
    epoch's start) so random crops, flips and caption dropout change between epochs.

    ``on_bad_example``: ``"error"`` lets a row's :class:`BadRowError` propagate; ``"skip"`` logs it
    (the first few rows by name, then every 1000th) and returns ``transform.placeholder(index,
    reason)``, which the collate functions keep and mark (``valid``, ``bad_rows``).
    """

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return self._example(self.source[index], index)


class TransformedIterableDataset(TransformedRows, torch.utils.data.IterableDataset):
    """The streaming counterpart of :class:`TransformedDataset` over an iterable of rows.

    A row's index is its position in the stream of this epoch. With DataLoader workers, a
    ``datasets.IterableDataset`` source gives each worker its own shards (workers beyond the number of
    shards get none); the index is then ``position_in_worker * active_workers + worker_id``: unique
    within the epoch, reproducible for a fixed number of workers, and equal to the single-process
    index when the source has one shard. ``on_bad_example`` as for :class:`TransformedDataset`.
    """

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
            yield self._example(row, position * num_workers + worker_id)


def make_torch_dataset(source, transform: Callable[..., dict], *, on_bad_example: str = "error"):
    """Wrap ``source`` in :class:`TransformedIterableDataset` if it is a stream (a
    ``datasets.IterableDataset`` or anything without a length), else in :class:`TransformedDataset`.
    ``on_bad_example``: ``"error"`` or ``"skip"`` (see :class:`TransformedDataset`)."""
    if isinstance(source, torch.utils.data.IterableDataset) or not hasattr(source, "__len__"):
        return TransformedIterableDataset(source, transform, on_bad_example=on_bad_example)
    return TransformedDataset(source, transform, on_bad_example=on_bad_example)
