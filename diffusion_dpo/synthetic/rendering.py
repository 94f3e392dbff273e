"""Drawing a :class:`~diffusion_dpo.synthetic.world.Spec`: one upright shape of random size and position,
colour jitter, anti-aliased by supersampling; PNG bytes for the datasets."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from diffusion_dpo.synthetic.world import COLORS, Spec

# Rendering: shape box side as a share of the image side, margin to the border, colour jitter.
_SIZE_RANGE = (0.45, 0.7)
_MARGIN = 0.08
_COLOR_JITTER = 8
_SUPERSAMPLE = 4


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
    # Upright shapes in a side x side box centred at (cx, cy).
    h = side / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "cross":
        t = side / 6  # arms one third of the box wide
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(spec: Spec, rng: np.random.Generator, resolution: int = 32) -> Image.Image:
    """Draw ``spec`` as a ``resolution`` x ``resolution`` RGB image: random size (45-70% of the side),
    random position (inside a small margin), small colour jitter; anti-aliased by 4x supersampling."""
    size = resolution * _SUPERSAMPLE

    def jitter(name: str) -> tuple[int, int, int]:
        rgb = np.clip(np.array(COLORS[name]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3), 0, 255)
        return tuple(int(v) for v in rgb)

    image = Image.new("RGB", (size, size), jitter(spec.background))
    side = rng.uniform(*_SIZE_RANGE) * size
    low, high = _MARGIN * size + side / 2, size - _MARGIN * size - side / 2
    cx, cy = rng.uniform(low, high), rng.uniform(low, high)
    draw_shape(ImageDraw.Draw(image), spec.shape, cx, cy, side, jitter(spec.color))
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
