"""A synthetic preference world: coloured shapes on coloured backgrounds, with a known "preference".

Each prompt names a shape, its colour and the background colour ("a red circle on a blue
background"); every caption word is one token of the tiny CLIP tokenizer
(:data:`diffusion_dpo.models.tiny.TINY_WORDS`). An image is preferred when it follows its caption.
:func:`faithfulness` measures that on any image, generated ones included (blurry, noisy, imperfect),
so a model trained on these pairs can be scored without people (``ShapesScorer``).

The writers make datasets in the project's formats: Pick-a-Pic v2 pairs (:func:`write_pair_dataset`),
captioned images for pretraining a base model (:func:`write_caption_dataset`) and unpaired KTO data
(:func:`write_unpaired_dataset`). A fixed share of (colour, shape, background) combinations is held
out (:func:`split_specs`) so that generalisation to unseen prompts can be evaluated.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffusion_dpo.data.parquet import pair_schema, write_parquet

logger = logging.getLogger(__name__)

#: Named colours (RGB, 0-255). Pairwise distances are >= 0.7 in [0, 1] RGB units, far above the
#: render jitter, so a colour is recognisable from pixels.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Background colours: the same palette (a shape never has its background's colour).
BACKGROUNDS: tuple[str, ...] = tuple(COLORS)
#: Every word a caption can contain.
VOCABULARY: tuple[str, ...] = ("a", "on", "background", *COLORS, *SHAPES)
#: Share of (colour, shape, background) combinations held out of training.
HELDOUT_FRACTION = 0.2

# Rendering: shape box side as a share of the image side, margin to the border, colour jitter.
_SIZE_RANGE = (0.45, 0.7)
_MARGIN = 0.08
_COLOR_JITTER = 8
_SUPERSAMPLE = 4

# faithfulness(): colour tolerance (RGB distance in [0, 1] units), soft foreground threshold, shape
# template grid and sharpness. Calibrated so crisp renders score ~0.9 and one wrong attribute < 0.2.
_COLOR_SIGMA = 0.25
_FG_LOW, _FG_HIGH = 0.25, 0.5
_GRID, _GRID_RADIUS = 32, 1.2
_SHAPE_SHARPNESS = 40.0
_MIN_AREA = 0.03
_MAX_REDRAWS = 1000


@dataclass(frozen=True)
class Spec:
    """What an image shows: a ``color`` ``shape`` on a ``background``-coloured background."""

    shape: str
    color: str
    background: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {self.color!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.color == self.background:
            raise ValueError(f"a {self.color} shape on a {self.background} background would be invisible")


def all_specs() -> list[Spec]:
    """Every valid (shape, colour, background) combination, in a fixed order (6·4·5 = 120)."""
    return [Spec(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS if c != b]


def _pairs(spec: Spec) -> set[tuple[str, str, str]]:
    return {
        ("cs", spec.color, spec.shape),
        ("cb", spec.color, spec.background),
        ("sb", spec.shape, spec.background),
    }


def _carve(specs: Sequence[Spec], target: int, seed: int) -> set[Spec]:
    """``target`` combinations taken out of ``specs``, each only if its attribute pairs ((colour,
    shape), (colour, background), (shape, background)) still occur among those left, so the carved
    ones are new compositions of things the rest shows."""
    order = np.random.default_rng(seed).permutation(len(specs))
    carved: set[Spec] = set()
    for i in order:
        if len(carved) >= target:
            break
        candidate = specs[i]
        kept_pairs = set().union(*(_pairs(s) for s in specs if s not in carved and s != candidate))
        if _pairs(candidate) <= kept_pairs:
            carved.add(candidate)
    return carved


@functools.lru_cache(maxsize=8)
def split_specs(
    heldout_fraction: float = HELDOUT_FRACTION, split_seed: int = 0
) -> tuple[tuple[Spec, ...], ...]:
    """Split the combinations into ``(train, heldout)``, a fixed property of the world.

    A combination is held out only if each of its attribute pairs ((colour, shape), (colour,
    background), (shape, background)) still occurs in some training combination, so held-out
    prompts are new compositions of things seen in training.
    """
    specs = all_specs()
    heldout = _carve(specs, round(heldout_fraction * len(specs)), split_seed)
    train = tuple(s for s in specs if s not in heldout)
    return train, tuple(s for s in specs if s in heldout)


@functools.lru_cache(maxsize=8)
def validation_split(fraction: float = 0.25, split_seed: int = 1) -> tuple[tuple[Spec, ...], ...]:
    """Carve validation combinations out of the training ones: ``(train, validation)``.

    For choosing hyperparameters honestly: validation prompts are neither trained on nor the final
    held-out prompts (:func:`split_specs`), and are new compositions of what training shows (the same
    rule as the held-out split). With the defaults: 72 training, 24 validation, 24 held-out.
    """
    train = split_specs()[0]
    validation = _carve(train, round(fraction * len(train)), split_seed)
    return tuple(s for s in train if s not in validation), tuple(s for s in train if s in validation)


def specs_for(heldout: bool | None = False) -> tuple[Spec, ...]:
    """Training combinations (``False``), held-out ones (``True``) or all of them (``None``)."""
    if heldout is None:
        return tuple(all_specs())
    return split_specs()[1 if heldout else 0]


def heldout_prompts() -> list[str]:
    """Captions of the held-out combinations, for evaluation on prompts never trained on."""
    return [caption(s) for s in specs_for(heldout=True)]


def sample_spec(rng: np.random.Generator, specs: Sequence[Spec] | None = None) -> Spec:
    """A uniformly random combination from ``specs`` (default: the training combinations)."""
    specs = specs_for(False) if specs is None else specs
    return specs[int(rng.integers(len(specs)))]


def caption(spec: Spec) -> str:
    """``"a red circle on a blue background"``."""
    return f"a {spec.color} {spec.shape} on a {spec.background} background"


def parse_caption(text: str) -> Spec | None:
    """The :class:`Spec` a caption names, or ``None`` if it is not a caption of this world."""
    if not isinstance(text, str):
        return None
    words = text.strip().rstrip(".").lower().split()
    if len(words) != 7 or words[0] not in ("a", "an") or words[3] != "on" or words[4] not in ("a", "an"):
        return None
    color, shape, background = words[1], words[2], words[5]
    if (
        words[6] != "background"
        or shape not in SHAPES
        or color not in COLORS
        or background not in BACKGROUNDS
    ):
        return None
    if color == background:
        return None
    return Spec(shape, color, background)


def corrupt(spec: Spec, rng: np.random.Generator, within: Collection[Spec] | None = None) -> Spec:
    """A combination that does NOT follow ``spec``: a different shape colour, shape, background, or
    both colour and shape (chosen uniformly), so a loser can be wrong in any attribute.

    ``within``: draw again until the corruption is one of these combinations. The training writers pass
    the training split, so held-out combinations never appear in training data, not even as losers
    (a model that only ever saw them rejected would learn to avoid them, whatever the caption).
    """
    for _ in range(_MAX_REDRAWS):
        bad = _corrupt_once(spec, rng)
        if within is None or bad in within:
            return bad
    raise ValueError(f"no corruption of {spec} among the {len(within)} combinations of `within`")


def _corrupt_once(spec: Spec, rng: np.random.Generator) -> Spec:
    mode = ("color", "shape", "background", "color+shape")[int(rng.integers(4))]
    shape, color, background = spec.shape, spec.color, spec.background

    def pick(options):
        return options[int(rng.integers(len(options)))]

    if "color" in mode:
        color = pick([c for c in COLORS if c not in (spec.color, spec.background)])
    if "shape" in mode:
        shape = pick([s for s in SHAPES if s != spec.shape])
    if mode == "background":
        background = pick([b for b in BACKGROUNDS if b not in (spec.background, spec.color)])
    return Spec(shape, color, background)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
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
    _draw_shape(ImageDraw.Draw(image), spec.shape, cx, cy, side, jitter(spec.color))
    return image.resize((resolution, resolution), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------------
# Faithfulness: does an image show what its caption says?


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
        _draw_shape(ImageDraw.Draw(canvas), shape, 128, 128, 160, 255)
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


# ----------------------------------------------------------------------------------------------
# Dataset writers


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate_pairs(
    n_pairs: int,
    seed: int = 0,
    resolution: int = 32,
    heldout: bool | None = False,
    tie_fraction: float = 0.05,
    specs: Sequence[Spec] | None = None,
) -> Iterator[dict]:
    """Pick-a-Pic v2 rows ``caption, jpg_0, jpg_1, label_0, label_1`` (PNG bytes).

    The preferred image follows the caption, the other shows :func:`corrupt` of it; the winner is put
    at position 0 or 1 at random. A ``tie_fraction`` of pairs are ties (two faithful renders,
    ``label_0 = 0.5``) so that tie handling is exercised. Training pairs (``heldout=False``) show
    training combinations only, losers included. ``specs`` (overrides ``heldout``): draw captions and
    losers from these combinations only (e.g. :func:`validation_split`'s).
    """
    rng = np.random.default_rng(seed)
    within = set(specs) if specs is not None else (set(specs_for(False)) if heldout is False else None)
    specs = tuple(specs) if specs is not None else specs_for(heldout)
    for _ in range(n_pairs):
        spec = sample_spec(rng, specs)
        if rng.random() < tie_fraction:
            first, second, label_0 = render(spec, rng, resolution), render(spec, rng, resolution), 0.5
        else:
            winner, loser = render(spec, rng, resolution), render(corrupt(spec, rng, within), rng, resolution)
            label_0 = float(rng.random() < 0.5)
            first, second = (winner, loser) if label_0 == 1.0 else (loser, winner)
        yield {
            "caption": caption(spec),
            "jpg_0": encode_png(first),
            "jpg_1": encode_png(second),
            "label_0": label_0,
            "label_1": 1.0 - label_0,
        }


#: Inter-annotator agreement on Pick-a-Pic: people predict another user's choice 68.0% of the time
#: (Kirstain et al. 2023, arXiv 2305.01569, the human baseline against PickScore's 70.2%).
PICKAPIC_AGREEMENT = 0.68
#: Imperfect world: probabilities that an image shows its caption with 0, 1 or 2 wrong attributes.
#: Both images of most pairs are flawed (0.85² = 72% of pairs), so the winner is usually only the
#: better of two wrong images.
ERROR_PROBS = (0.15, 0.45, 0.40)
_ATTRIBUTES = ("color", "shape", "background")


def with_errors(spec: Spec, k: int, rng: np.random.Generator, within: Collection[Spec] | None = None) -> Spec:
    """``spec`` with ``k`` of its attributes (colour, shape, background) changed; redrawn until the
    result is one of ``within`` (the training writers pass the training split, as for :func:`corrupt`)."""
    if k == 0:
        return spec
    for _ in range(_MAX_REDRAWS):
        changed = {a: getattr(spec, a) for a in _ATTRIBUTES}
        for attribute in rng.choice(_ATTRIBUTES, size=k, replace=False):
            options = {"color": list(COLORS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}[
                attribute
            ]
            changed[attribute] = options[int(rng.integers(len(options)))]
            while changed[attribute] == getattr(spec, attribute):
                changed[attribute] = options[int(rng.integers(len(options)))]
        if changed["color"] == changed["background"]:
            continue
        wrong = Spec(**changed)
        if within is None or wrong in within:
            return wrong
    raise ValueError(f"no combination with {k} errors from {spec} among the allowed ones")


def annotator_score(image, text: str | Spec) -> float:
    """What the imperfect world's annotators judge by: :func:`faithfulness_terms` with partial credit,
    the mean of the colour, shape and background terms times presence (one wrong attribute of three
    scores ~0.6, two ~0.3), where :func:`faithfulness` (the evaluation's score) multiplies them."""
    terms = faithfulness_terms(image, text)
    return float((terms["color"] + terms["shape"] + terms["background"]) / 3 * terms["presence"])


def _flawed_render(spec: Spec, rng: np.random.Generator, resolution: int, within, error_probs) -> tuple:
    k = int(rng.choice(len(error_probs), p=error_probs))
    image = render(with_errors(spec, k, rng, within), rng, resolution)
    return image, annotator_score(image, spec), k


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # no overflow at large |x|


def annotator_agreement(score_gaps: np.ndarray, temperature: float) -> float:
    """How often two independent Bradley–Terry annotators (``P(first) = σ(gap / temperature)``)
    agree, on average over pairs with these faithfulness gaps: ``E[p² + (1 − p)²]``."""
    p = _sigmoid(np.asarray(score_gaps) / temperature)
    return float(np.mean(p**2 + (1 - p) ** 2))


@functools.lru_cache(maxsize=4)
def calibrate_temperature(
    agreement: float = PICKAPIC_AGREEMENT, n_pairs: int = 2000, seed: int = 12345, resolution: int = 32
) -> float:
    """The annotator temperature at which two annotators of the imperfect world agree ``agreement`` of
    the time (bisection on :func:`annotator_agreement` over ``n_pairs`` sampled pairs)."""
    if not 0.5 < agreement < 1.0:
        raise ValueError(f"agreement must be in (0.5, 1), got {agreement}")
    rng = np.random.default_rng(seed)
    specs = specs_for(False)
    gaps = []
    for _ in range(n_pairs):
        spec = sample_spec(rng, specs)
        a = _flawed_render(spec, rng, resolution, None, ERROR_PROBS)[1]
        b = _flawed_render(spec, rng, resolution, None, ERROR_PROBS)[1]
        gaps.append(a - b)
    low, high = 1e-4, 10.0  # agreement falls as the temperature rises
    for _ in range(60):
        mid = (low * high) ** 0.5
        if annotator_agreement(np.array(gaps), mid) > agreement:
            low = mid
        else:
            high = mid
    return float((low * high) ** 0.5)


def generate_imperfect_pairs(
    n_pairs: int,
    seed: int = 0,
    resolution: int = 32,
    specs: Sequence[Spec] | None = None,
    temperature: float | None = None,
    error_probs: Sequence[float] = ERROR_PROBS,
) -> Iterator[dict]:
    """Pick-a-Pic v2 rows where winners are imperfect and annotators disagree.

    Both images of a pair show the caption with 0, 1 or 2 wrong attributes (``error_probs``); a noisy
    annotator prefers the first with probability ``σ((f₀ − f₁) / temperature)``, f the
    :func:`annotator_score` of each image for the caption (Bradley–Terry). The default temperature
    makes two annotators agree as often as Pick-a-Pic's people do (:data:`PICKAPIC_AGREEMENT`). Rows
    also hold ``faithfulness_0/1`` (the annotator's scores) and ``errors_0/1`` for analysis. ``specs``: the combinations captions
    and images are drawn from (default: the training split).
    """
    rng = np.random.default_rng(seed)
    specs = tuple(specs) if specs is not None else specs_for(False)
    within = set(specs)
    temperature = calibrate_temperature(resolution=resolution) if temperature is None else temperature
    for _ in range(n_pairs):
        spec = sample_spec(rng, specs)
        (image_0, f_0, k_0), (image_1, f_1, k_1) = (
            _flawed_render(spec, rng, resolution, within, error_probs) for _ in range(2)
        )
        label_0 = float(rng.random() < _sigmoid((f_0 - f_1) / temperature))
        yield {
            "caption": caption(spec), "jpg_0": encode_png(image_0), "jpg_1": encode_png(image_1),
            "label_0": label_0, "label_1": 1.0 - label_0, "faithfulness_0": f_0, "faithfulness_1": f_1,
            "errors_0": k_0, "errors_1": k_1,
        }  # fmt: skip


def generate_captioned_images(
    n_images: int,
    seed: int = 0,
    resolution: int = 32,
    caption_noise: float = 0.0,
    heldout: bool | None = False,
    specs: Sequence[Spec] | None = None,
) -> Iterator[dict]:
    """Rows ``caption, image`` (PNG bytes) for pretraining a base model. With probability
    ``caption_noise`` the caption is replaced by another combination's caption (from the same split),
    so the base model learns to follow captions only partly and preference tuning has room to help.
    ``specs`` (overrides ``heldout``): the combinations to draw from."""
    if not 0.0 <= caption_noise <= 1.0:
        raise ValueError(f"caption_noise must be in [0, 1], got {caption_noise}")
    rng = np.random.default_rng(seed)
    specs = tuple(specs) if specs is not None else specs_for(heldout)
    for _ in range(n_images):
        spec = sample_spec(rng, specs)
        image = render(spec, rng, resolution)
        shown = spec
        if rng.random() < caption_noise:
            shown = sample_spec(rng, [s for s in specs if s != spec])
        yield {"caption": caption(shown), "image": encode_png(image)}


def generate_unpaired(
    n_images: int,
    seed: int = 0,
    resolution: int = 32,
    desirable_fraction: float = 0.5,
    heldout: bool | None = False,
) -> Iterator[dict]:
    """Diffusion-KTO rows ``caption, image, label``: desirable images follow the caption
    (``label=True``), undesirable ones show :func:`corrupt` of it (``label=False``); with
    ``heldout=False`` a training combination, as in :func:`generate_pairs`."""
    rng = np.random.default_rng(seed)
    specs = specs_for(heldout)
    within = set(specs) if heldout is False else None
    for _ in range(n_images):
        spec = sample_spec(rng, specs)
        desirable = bool(rng.random() < desirable_fraction)
        image = render(spec if desirable else corrupt(spec, rng, within), rng, resolution)
        yield {"caption": caption(spec), "image": encode_png(image), "label": desirable}


def write_pair_dataset(
    path: str | Path,
    n_pairs: int,
    seed: int = 0,
    resolution: int = 32,
    heldout: bool | None = False,
    tie_fraction: float = 0.05,
    specs: Sequence[Spec] | None = None,
) -> Path:
    """Write :func:`generate_pairs` to the parquet file ``path`` (Pick-a-Pic v2 columns)."""
    rows = generate_pairs(n_pairs, seed, resolution, heldout, tie_fraction, specs)
    return write_parquet(path, rows, pair_schema())


def write_imperfect_pair_dataset(
    path: str | Path,
    n_pairs: int,
    seed: int = 0,
    resolution: int = 32,
    specs: Sequence[Spec] | None = None,
    temperature: float | None = None,
) -> Path:
    """Write :func:`generate_imperfect_pairs` to the parquet file ``path`` (Pick-a-Pic v2 columns, plus
    ``faithfulness_0/1`` and ``errors_0/1``)."""
    import pyarrow as pa

    extra = [(f"faithfulness_{i}", pa.float64()) for i in (0, 1)] + [
        (f"errors_{i}", pa.int64()) for i in (0, 1)
    ]
    rows = generate_imperfect_pairs(n_pairs, seed, resolution, specs, temperature)
    return write_parquet(path, rows, pair_schema(extra))


def write_caption_dataset(
    path: str | Path,
    n_images: int,
    seed: int = 0,
    resolution: int = 32,
    caption_noise: float = 0.0,
    heldout: bool | None = False,
    specs: Sequence[Spec] | None = None,
) -> Path:
    """Write :func:`generate_captioned_images` to the parquet file ``path`` (columns caption, image)."""
    import pyarrow as pa

    schema = pa.schema([("caption", pa.string()), ("image", pa.binary())])
    rows = generate_captioned_images(n_images, seed, resolution, caption_noise, heldout, specs)
    return write_parquet(path, rows, schema)


def write_unpaired_dataset(
    path: str | Path,
    n_images: int,
    seed: int = 0,
    resolution: int = 32,
    desirable_fraction: float = 0.5,
    heldout: bool | None = False,
) -> Path:
    """Write :func:`generate_unpaired` to the parquet file ``path`` (columns caption, image, label)."""
    import pyarrow as pa

    schema = pa.schema([("caption", pa.string()), ("image", pa.binary()), ("label", pa.bool_())])
    rows = generate_unpaired(n_images, seed, resolution, desirable_fraction, heldout)
    return write_parquet(path, rows, schema)
