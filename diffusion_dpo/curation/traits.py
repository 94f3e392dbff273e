"""Per-image traits of the shortcut audit (:mod:`.audit`): what a file's header says (size, format, JPEG
quality, bytes per pixel) and, decoded, its pixels (brightness, saturation, sharpness, digests and a
difference hash for duplicates). Unreadable images are recorded as such, never raised."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from diffusion_dpo.data.pairs import label_problem
from diffusion_dpo.data.transforms import decode_image, image_bytes

#: Formats that store pixels exactly; they rank above every JPEG quality in the ``jpeg_quality`` rule.
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "GIF", "PPM", "TIFF", "QOI", "TGA"})
LOSSLESS_RANK = 101

#: Numeric traits: name -> (needs decoded pixels, what it measures).
NUMERIC_TRAITS = {
    "width": (False, "width in pixels"),
    "height": (False, "height in pixels"),
    "aspect_ratio": (False, "width / height"),
    "jpeg_quality": (
        False,
        "JPEG quality estimated from the quantization tables; lossless formats rank above",
    ),
    "bytes_per_pixel": (False, "encoded file size per pixel"),
    "brightness": (True, "mean luma (0-255)"),
    "saturation": (True, "mean HSV saturation (0-1)"),
    "sharpness": (True, "variance of the Laplacian of the luma"),
}
#: Categorical traits: name -> (needs decoded pixels, what it is).
CATEGORICAL_TRAITS = {"format": (False, "file format"), "size": (False, "width x height")}


# The JPEG standard's example quantization tables (ITU T.81 Annex K, row-major order, as PIL's
# ``Image.quantization`` lists them): luminance, then chrominance.
_ANNEX_K = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
         14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
         18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
        [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
         24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
         *[99] * 32],
    ],
    dtype=np.int64,
)  # fmt: skip


def _ijg_tables() -> np.ndarray:
    # libjpeg's jpeg_quality_scaling (what PIL, Pillow-SIMD and most tools use): a percentage scale of
    # the Annex K tables, rounded, clamped to the baseline range 1..255. [100 qualities, 2, 64]
    quality = np.arange(1, 101)[:, None, None]
    scale = np.where(quality < 50, 5000 // quality, 200 - 2 * quality)
    return np.clip((_ANNEX_K[None] * scale + 50) // 100, 1, 255)


_QUALITY_TABLES = _ijg_tables()


def estimate_jpeg_quality(quantization) -> int | None:
    """The libjpeg quality (1-100) whose scaled standard tables are closest (least absolute difference)
    to ``quantization`` (PIL's ``{table id: 64 values}``); exact for files written by libjpeg. Encoders
    with their own tables get the nearest quality, a rough one. None when there are no tables."""
    if not quantization:
        return None
    ids = sorted(quantization)[:2]
    tables = np.array([list(quantization[i])[:64] for i in ids], dtype=np.int64)  # [T, 64]
    if tables.shape[1] != 64:
        return None
    distance = np.abs(_QUALITY_TABLES[:, : len(ids)] - tables[None]).sum(axis=(1, 2))  # [100]
    return int(np.argmin(distance)) + 1


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an ``[H, W, 3]`` RGB array (0-255): ``[H, W]`` float64."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def mean_saturation(rgb: np.ndarray) -> float:
    """Mean HSV saturation ``(max - min) / max`` of an ``[H, W, 3]`` RGB array, in [0, 1] (0 for black)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return float(np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0).mean())


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior of a ``[H, W]`` image: blur and upscaling
    lower it, noise and JPEG blocking raise it. 0 for images under 3x3."""
    g = np.asarray(gray, dtype=np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]  # [H-2, W-2]
    return float(lap.var())


def difference_hash(gray: np.ndarray) -> int:
    """64-bit difference hash: the luma shrunk to 9x8, one bit per horizontal neighbour pair (is the
    right one brighter?). Robust to re-encoding and resizing, so close hashes mean the same picture."""
    small = Image.fromarray(np.clip(np.asarray(gray), 0, 255).astype(np.uint8)).resize(
        (9, 8), Image.Resampling.BOX
    )
    a = np.asarray(small, dtype=np.int16)  # [8, 9]
    bits = (a[:, 1:] > a[:, :-1]).ravel()  # [64]
    return int(np.packbits(bits).view(">u8")[0])


def header_traits(data: bytes) -> dict:
    """What the file header says (no pixel decode): width, height, aspect ratio, ``WxH`` size, format,
    estimated JPEG quality (None for other formats) and encoded bytes per pixel."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        fmt = image.format or "unknown"
        quality = estimate_jpeg_quality(getattr(image, "quantization", None)) if fmt == "JPEG" else None
    if width <= 0 or height <= 0:
        raise ValueError(f"image has size {width}x{height}")
    return {
        "width": width,
        "height": height,
        "aspect_ratio": width / height,
        "size": f"{width}x{height}",
        "format": fmt,
        "jpeg_quality": quality,
        "bytes_per_pixel": len(data) / (width * height),
    }


def pixel_traits(image: Image.Image) -> dict:
    """Traits of the decoded RGB picture: brightness, saturation, sharpness, a digest of the pixels (the
    same picture in another encoding has the same one) and its difference hash."""
    rgb = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
    gray = luma(rgb)
    digest = hashlib.blake2b(f"{rgb.shape}".encode() + rgb.tobytes(), digest_size=16).hexdigest()
    return {
        "brightness": float(gray.mean()),
        "saturation": mean_saturation(rgb),
        "sharpness": laplacian_variance(gray),
        "pixel_digest": digest,
        "dhash": difference_hash(gray),
    }


def measure_image(value, *, full: bool = True) -> tuple[dict, bytes | None]:
    """(traits, encoded bytes) of one image cell; (``{"error": why}``, None) when it cannot be read."""
    try:
        data = image_bytes(value) if value is not None else None
        if not data:
            raise ValueError("image is missing or empty")
        traits = header_traits(data)
        if full:
            traits.update(pixel_traits(decode_image(data)))
            traits["digest"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        return traits, data
    except Exception as error:  # any unreadable image is this row's problem, reported, never raised
        return {"error": f"{type(error).__name__}: {error}"}, None


def measure_pair(pair: dict, *, full: bool = True) -> dict:
    """Measure one pair ``{"row", "caption", "image_0", "image_1", "label_0"}`` (for ordered or
    normalised pairs image 0 is the winner and ``label_0`` 1).

    Returns ``{"row", "label_0"`` (float, None when bad), ``"label_problem", "caption_words",
    "image_0", "image_1"`` (trait dicts, ``{"error": ...}`` when unreadable), ``"same_bytes"}``.
    """
    problem = label_problem(pair.get("label_0"))
    (traits_0, data_0), (traits_1, data_1) = (
        measure_image(pair[k], full=full) for k in ("image_0", "image_1")
    )
    caption = pair.get("caption")
    return {
        "row": pair.get("row"),
        "label_0": None if problem else float(pair["label_0"]),
        "label_problem": problem,
        "caption_words": len(caption.split()) if isinstance(caption, str) else None,
        "image_0": traits_0,
        "image_1": traits_1,
        "same_bytes": data_0 is not None and data_0 == data_1,
    }
