"""The imperfect world: both images of a pair may be flawed (0, 1 or 2 wrong attributes) and annotators
are noisy Bradley–Terry judges, calibrated to agree as often as Pick-a-Pic's people do."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Sequence

import numpy as np

from diffusion_dpo.synthetic.faithfulness import faithfulness_terms
from diffusion_dpo.synthetic.rendering import encode_png, render
from diffusion_dpo.synthetic.world import (
    BACKGROUNDS,
    COLORS,
    MAX_REDRAWS,
    SHAPES,
    Spec,
    caption,
    sample_spec,
    specs_for,
)

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
    for _ in range(MAX_REDRAWS):
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
