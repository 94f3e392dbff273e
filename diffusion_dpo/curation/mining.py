"""Preference pairs from a model's own samples: which images to pair, and how to write them.

Two kinds of pairs, both written in Pick-a-Pic v2's schema so that ``train_sd.py --dataset_name``
reads them unchanged:

- **On-policy pairs** (``data/mine_pairs.py``): K seeded samples per prompt from the model being
  tuned, scored by one scorer or a weighted combination; the best and the worst of the K become a pair
  (West-of-N, Pace et al. 2024, arXiv 2401.12086), or every pair whose scores differ by a margin. The
  model then learns from differences among images it actually draws, rather than another model's.
- **Correction pairs** (``data/correction_pairs.py``): a given image of a caption is chosen over the
  model's own sample for that caption, the pairs of SPIN-Diffusion (Yuan et al.,
  NeurIPS 2024), here trained with the Diffusion-DPO loss.

The selection is pure functions of score arrays (:func:`combine_scores`, :func:`select_pairs`,
:func:`mine`), so it is tested on hand-made numbers. Score conventions: higher is better; two images
whose scores are equal are a tie and never a pair, whatever ``min_margin`` says.

Positions: the chosen image is put at ``jpg_0`` or ``jpg_1`` by a coin flip keyed by (seed, prompt,
images) (:func:`chosen_first`), not always first, so that nothing downstream that reads positions
(a relabeller, an audit, a position-biased scorer) sees the winner always in one place. The trainer
does not care: it puts the winner first from ``label_0``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffusion_dpo.data.parquet import pair_schema, write_parquet

#: How images are paired within a prompt.
PAIRINGS = ("best_worst", "all")
#: How several scorers' scores are put on one scale before weighting (see :func:`combine_scores`).
NORMALIZATIONS = ("auto", "none", "zscore")
#: The file a mined dataset folder holds: the "train" split of a parquet folder.
PAIRS_FILE = "train.parquet"
MANIFEST_FILE = "mining.json"


def parse_weights(text: str | None, n_scorers: int) -> list[float]:
    """``"1,0.5"`` → ``[1.0, 0.5]``; None → ``[1.0] * n_scorers``. One finite weight per scorer, not all 0."""
    if text is None:
        return [1.0] * n_scorers
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as err:
        raise ValueError(f"--scorer_weights {text!r}: expected numbers separated by commas") from err
    if len(weights) != n_scorers:
        raise ValueError(f"--scorer_weights {text!r}: {len(weights)} weights for {n_scorers} scorers")
    if not all(np.isfinite(weights)) or not any(weights):
        raise ValueError(f"--scorer_weights {text!r}: weights must be finite and not all zero")
    return weights


def combine_scores(
    scores: Sequence[np.ndarray], weights: Sequence[float], normalization: str = "auto"
) -> tuple[np.ndarray, list[dict]]:
    """The combined score of every image: ``Σ_i w_i · norm_i(scores_i)``.

    Scorers live on different scales (PickScore ≈ 21, HPS ≈ 27, aesthetic 1–10), so a raw weighted sum
    would let the widest scale decide. ``"zscore"`` standardises each scorer over all images given
    (its mean and standard deviation over ``[P, K]``; a constant scorer contributes 0), so the weights
    say how much each scorer counts. ``"none"`` sums raw scores. ``"auto"``: raw for one scorer (then
    margins stay in that scorer's units), z-scores for several.

    Args:
        scores: one ``[P, K]`` array per scorer (prompts × images); finite.
        weights: one weight per scorer.
    Returns:
        ``(combined [P, K] float64, [{"mean", "std"} per scorer])``: the shift and scale applied to each
        (0 and 1 when raw), so that a combined score can be recomputed from the per-scorer ones.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if len(scores) == 0 or len(scores) != len(weights):
        raise ValueError(f"need one weight per scorer, got {len(scores)} scorers and {len(weights)} weights")
    arrays = [np.asarray(s, dtype=np.float64) for s in scores]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"every scorer must score the same images; shapes {[a.shape for a in arrays]}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("scores must be finite")
    standardise = normalization == "zscore" or (normalization == "auto" and len(arrays) > 1)
    combined = np.zeros_like(arrays[0])
    stats = []
    for a, w in zip(arrays, weights):
        mean, std = (float(a.mean()), float(a.std())) if standardise else (0.0, 1.0)
        std = std if std > 0 else 1.0  # a constant scorer: (a - mean) is 0 everywhere anyway
        combined += w * (a - mean) / std
        stats.append({"mean": mean, "std": std})
    return combined, stats


def spread(scores: Sequence[float]) -> float:
    """``max − min`` of one prompt's scores: how differently the model's images of it score."""
    values = np.asarray(scores, dtype=np.float64)
    return float(values.max() - values.min())


def select_pairs(
    scores: Sequence[float],
    pairing: str = "best_worst",
    min_margin: float = 0.0,
    max_pairs: int | None = None,
) -> list[tuple[int, int]]:
    """Pairs ``(chosen, rejected)`` of image indices among one prompt's ``scores`` ``[K]``.

    ``"best_worst"``: the highest- against the lowest-scored image (the first of equal ones, in index
    order), if they differ by at least ``min_margin``. ``"all"``: every two images that differ by at
    least ``min_margin``, the largest margins first (equal margins in index order), at most
    ``max_pairs`` of them. A difference of 0 is a tie and never a pair.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 (or None for no cap), got {max_pairs}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one prompt's [K] scores, got shape {s.shape}")
    if len(s) < 2:
        return []

    def is_pair(gap: float) -> bool:
        return gap > 0 and gap >= min_margin

    if pairing == "best_worst":
        best, worst = int(np.argmax(s)), int(np.argmin(s))  # argmax/argmin take the first of equals
        return [(best, worst)] if is_pair(s[best] - s[worst]) else []
    candidates = []
    for i in range(len(s)):
        for j in range(i + 1, len(s)):
            hi, lo = (i, j) if s[i] > s[j] else (j, i)
            if is_pair(s[hi] - s[lo]):
                candidates.append((-(s[hi] - s[lo]), i, j, hi, lo))
    candidates.sort()  # largest margin first; ties of margin by index, so the order is reproducible
    return [(hi, lo) for *_, hi, lo in candidates[:max_pairs]]


@dataclass
class MinedPairs:
    """What :func:`mine` chose: pairs ``(prompt, chosen, rejected)`` and the prompts without one."""

    pairs: list[tuple[int, int, int]] = field(default_factory=list)
    #: Prompts whose images all score alike (spread below ``min_prompt_spread``): not paired at all.
    dropped: list[int] = field(default_factory=list)
    #: Prompts kept by the spread filter whose images still gave no pair (ties, or below ``min_margin``).
    unpaired: list[int] = field(default_factory=list)


def mine(
    scores: np.ndarray,
    pairing: str = "best_worst",
    min_margin: float = 0.0,
    pairs_per_prompt: int | None = None,
    min_prompt_spread: float = 0.0,
) -> MinedPairs:
    """Pairs of every prompt of ``scores`` ``[P, K]``: the spread filter, then :func:`select_pairs`.

    A prompt whose K scores span less than ``min_prompt_spread`` is dropped: when every sample of a
    prompt scores alike, which one "wins" says more about the scorer's noise than about the images.
    """
    if min_prompt_spread < 0:
        raise ValueError(f"min_prompt_spread must be >= 0, got {min_prompt_spread}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [prompts, images], got shape {scores.shape}")
    out = MinedPairs()
    for p, row in enumerate(scores):
        if spread(row) < min_prompt_spread:
            out.dropped.append(p)
            continue
        chosen = select_pairs(row, pairing, min_margin, pairs_per_prompt)
        if not chosen:
            out.unpaired.append(p)
        out.pairs += [(p, c, r) for c, r in chosen]
    return out


def chosen_first(seed: int, *ids: int) -> bool:
    """Whether the chosen image goes to ``jpg_0``: a fair coin keyed by ``seed`` and the pair's ``ids``
    (non-negative ints, e.g. prompt, chosen, rejected) alone, so a pair's position does not depend on
    which other pairs were written."""
    return bool(np.random.default_rng([seed, *ids]).random() < 0.5)


def score_columns(scorer_names: Sequence[str]) -> list[str]:
    """Column stems ``score_<name>`` for the per-scorer scores, unique and safe in any table format
    (``hpsv2.1`` → ``score_hpsv2_1``; the second of two ``pickscore`` specs → ``score_pickscore_2``)."""
    stems: list[str] = []
    for name in scorer_names:
        stem = "score_" + re.sub(r"\W", "_", name)
        candidate, n = stem, 2
        while candidate in stems:
            candidate, n = f"{stem}_{n}", n + 1
        stems.append(candidate)
    return stems


def write_pairs(output_dir: str | Path, rows: Iterable[dict], extra: Sequence[tuple] = ()) -> Path:
    """Write Pick-a-Pic v2 rows (``caption, jpg_0, jpg_1, label_0, label_1`` + ``extra`` ``(name,
    pyarrow type)`` columns) to ``output_dir/train.parquet``: the "train" split of a parquet folder.

    Written to a hidden temporary file and renamed, so a crash never leaves a truncated file that
    loads as a dataset (dataset loaders skip hidden files).
    """
    path = Path(output_dir) / PAIRS_FILE
    tmp = path.with_name(f".{PAIRS_FILE}.tmp")
    write_parquet(tmp, rows, pair_schema(extra))
    os.replace(tmp, path)
    return path


def write_manifest(output_dir: str | Path, manifest: dict) -> Path:
    """``output_dir/mining.json`` (atomically); NaN (a mean of no pairs) is written as null."""
    path = Path(output_dir) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
    tmp.write_text(json.dumps(_finite_or_none(manifest), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def add_generation_arguments(parser) -> None:
    """The generation flags both scripts share, named as ``eval/evaluate.py``'s."""
    from diffusion_dpo.evaluation.generate import DTYPES

    cuda = _cuda()
    g = parser.add_argument_group("generation (as eval/evaluate.py; part of each image's cache key)")
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=7.5)
    g.add_argument("--resolution", type=int, default=None, help="square output size (default: the model's)")
    g.add_argument("--negative_prompt", default=None)
    g.add_argument("--batch_size", type=int, default=4, help="images per pipeline call")
    g.add_argument("--device", default="cuda" if cuda else "cpu")
    g.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="pipeline weights dtype")
    g.add_argument(
        "--cache_dir",
        default=None,
        help="image (and score) cache, default OUTPUT/cache; share it between runs and with eval/evaluate.py",
    )
    g.add_argument("--no_progress", action="store_true", help="no progress bars")


def generation_settings(args):
    """:class:`GenerationSettings` from the flags of :func:`add_generation_arguments` (ValueError if bad)."""
    from diffusion_dpo.evaluation.generate import settings_from_args

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    return settings_from_args(args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
