"""The synthetic shapes world: coloured shapes on coloured backgrounds, with a known "preference".

Each prompt names a shape, its colour and the background colour ("a red circle on a blue
background"); every caption word is one token of the tiny CLIP tokenizer
(:data:`diffusion_dpo.models.tiny.TINY_WORDS`). An image is preferred when it follows its caption.
This module holds the world's vocabulary, its combinations (:class:`Spec`) and their splits (a fixed
share held out, :func:`split_specs`, so that generalisation to unseen prompts can be evaluated),
captions and their parsing, and the corruptions losers show (:func:`corrupt`). Beside it:
:mod:`.rendering` draws a combination, :mod:`.faithfulness` measures from pixels whether an image
follows its caption (so a model trained on these pairs is scored without people: ``ShapesScorer``),
:mod:`.imperfect` is the world of flawed winners and noisy annotators, :mod:`.writers` writes the
world's datasets in the project's formats.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

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

MAX_REDRAWS = 1000


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
    for _ in range(MAX_REDRAWS):
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
