"""Faithfulness: does an image show what its caption says? Measured from pixels on any image, generated
ones included (blurry, noisy, imperfect), so the world needs no people: the ``shapes`` scorer and the
study score models with it."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from diffusion_dpo.synthetic.rendering import draw_shape
from diffusion_dpo.synthetic.world import COLORS, SHAPES, Spec, parse_caption

# faithfulness(): colour tolerance (RGB distance in [0, 1] units), soft foreground threshold, shape
# template grid and sharpness. Calibrated so crisp renders score ~0.9 and one wrong attribute < 0.2.
_COLOR_SIGMA = 0.25
_FG_LOW, _FG_HIGH = 0.25, 0.5
_GRID, _GRID_RADIUS = 32, 1.2
_SHAPE_SHARPNESS = 40.0
_MIN_AREA = 0.03


def _normalized_mask(mask: np.ndarray) -> np.ndarray:
    """Resample a soft mask [H, W] on a [G, G] grid centred at its centroid and scaled by sqrt(area),
    so every shape of one kind looks the same whatever its size and position."""
    height, width = mask.shape
    mass = mask.sum()
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    cy, cx = (mask * ys).sum() / mass, (mask * xs).sum() / mass
    u = ((np.arange(_GRID) + 0.5) / _GRID * 2 - 1) * _GRID_RADIUS
    fy = cy + u[:, None] * np.sqrt(mass) - 0.5
    fx = cx + u[None, :] * np.sqrt(mass) - 0.5
    y0, x0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    wy, wx = fy - y0, fx - x0

    def at(y, x):
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        return np.where(inside, mask[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)], 0.0)

    return (
        at(y0, x0) * (1 - wy) * (1 - wx)
        + at(y0, x0 + 1) * (1 - wy) * wx
        + at(y0 + 1, x0) * wy * (1 - wx)
        + at(y0 + 1, x0 + 1) * wy * wx
    )


@functools.lru_cache(maxsize=1)
def _shape_templates() -> dict[str, np.ndarray]:
    templates = {}
    for shape in SHAPES:
        canvas = Image.new("L", (256, 256), 0)
        draw_shape(ImageDraw.Draw(canvas), shape, 128, 128, 160, 255)
        templates[shape] = _normalized_mask(np.asarray(canvas, dtype=np.float64) / 255.0)
    return templates


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-12))


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be a PIL image or an [H, W, 3] array, got shape {array.shape}")
    # Integer arrays are 0-255; float arrays are taken to be in [0, 1].
    return (
        array.astype(np.float64) / 255.0
        if np.issubdtype(array.dtype, np.integer)
        else array.astype(np.float64)
    )


def faithfulness_terms(image, text: str | Spec) -> dict[str, float]:
    """The factors of :func:`faithfulness`, each in [0, 1]:

    - ``background``: the background colour (median of the border pixels) vs the named one;
    - ``color``: the shape colour (foreground pixels, weighted by how far they are from the
      background) vs the named one; both as ``exp(-d² / 2σ²)``, σ = 0.25 in [0, 1] RGB units;
    - ``shape``: soft IoU of the foreground mask with each ideal shape, after normalising position
      and scale by the mask's centroid and area, turned into a probability of the named shape by a
      softmax (sharpness 40);
    - ``presence``: foreground area / 3% of the image, capped at 1 (no shape, no score).

    ``image``: a PIL image or an [H, W, 3] array (integers in 0-255, or floats in [0, 1]). Raises ``ValueError`` if
    ``text`` is not a caption of this world.
    """
    spec = text if isinstance(text, Spec) else parse_caption(text)
    if spec is None:
        raise ValueError(f"not a caption of the shapes world: {text!r}")
    pixels = _to_array(image)  # [H, W, 3] in [0, 1]
    height, width, _ = pixels.shape
    b = max(1, min(height, width) // 16)
    border = np.concatenate(
        [
            pixels[:b].reshape(-1, 3),
            pixels[-b:].reshape(-1, 3),
            pixels[:, :b].reshape(-1, 3),
            pixels[:, -b:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    mask = np.clip((distance - _FG_LOW) / (_FG_HIGH - _FG_LOW), 0.0, 1.0)  # soft foreground [H, W]
    mass = float(mask.sum())

    def color_score(rgb: np.ndarray, name: str) -> float:
        d2 = float(((rgb - np.array(COLORS[name]) / 255.0) ** 2).sum())
        return float(np.exp(-d2 / (2 * _COLOR_SIGMA**2)))

    terms = {
        "background": color_score(background, spec.background),
        "presence": min(1.0, mass / (_MIN_AREA * height * width)),
    }
    if mass < 1e-6:
        return {**terms, "color": color_score(background, spec.color), "shape": 0.0}
    # Shape colour: median of the core pixels, those nearly as far from the background as the
    # farthest ones; anti-aliased or blurred edges mix in the background colour, noise averages out.
    solid = mask > 0.5 if (mask > 0.5).any() else mask > 0
    core = solid & (distance >= 0.7 * np.percentile(distance[solid], 90))
    foreground = np.median(pixels[core], axis=0)
    normalized = _normalized_mask(mask)
    ious = np.array([_soft_iou(normalized, template) for template in _shape_templates().values()])
    logits = _SHAPE_SHARPNESS * (ious - ious.max())
    probabilities = np.exp(logits) / np.exp(logits).sum()
    terms["color"] = color_score(foreground, spec.color)
    terms["shape"] = float(probabilities[SHAPES.index(spec.shape)])
    return terms


def faithfulness(image, text: str | Spec) -> float:
    """How well ``image`` shows its caption, in [0, 1]: the product of :func:`faithfulness_terms`.

    Continuous in the pixels (generated images rarely tie), high only when the shape's colour, the
    shape and the background all match; crisp renders of the caption score ~0.9.
    """
    terms = faithfulness_terms(image, text)
    return float(terms["background"] * terms["color"] * terms["shape"] * terms["presence"])
