"""Pure statistics for comparing text-to-image models on the same prompts and seeds.

Every model generates one image per (prompt, seed) with the same seeds, so scores are *paired*:
``scores[p, k]`` of model A and of model B come from the same prompt ``p`` and the same initial noise
(seed ``k``). Arrays here are ``[P, S]`` (prompts × seeds) of one scorer's scores.

- :func:`summarize` — mean, median and standard error of one model's scores.
- :func:`paired_outcomes` / :func:`win_rate` — how often a model beats the baseline on the same
  (prompt, seed), ties counting 1/2, with a cluster-bootstrap percentile interval that resamples
  *prompts* (all seeds of a prompt together: images of one prompt are not independent).
- :func:`win_rate_by_category` — the same within each prompt category (e.g. PartiPrompts' "Category").
- :func:`pairwise_wins` / :func:`fit_bradley_terry` — a Bradley–Terry ranking of several models
  (docs/objectives.md#bradleyterry-rankings): ``P(i beats j) = σ(s_i − s_j)``, s fitted by maximum likelihood, ``s_0 = 0``.
- :func:`verdict` — where a win rate's interval lies relative to 0.5 (beats, ties with, is beaten by).
- :func:`wilson_interval`, :func:`rank_auc`, :func:`auc_interval` — the 95% interval of a proportion
  (Wilson) and the Mann–Whitney AUC with Hanley and McNeil's interval: the data audit's rules
  (:mod:`diffusion_dpo.curation.rules`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def _as_2d(scores, name: str) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]  # one seed per prompt
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty [P, S] array of scores, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return x


def summarize(scores) -> dict[str, float]:
    """Mean, median, standard error of the mean and count of one model's scores ``[P, S]`` (or ``[N]``).

    ``sem = std(ddof=1) / sqrt(n)`` over all images; it treats images as independent (seeds of one
    prompt are correlated, so it is optimistic — the win-rate interval is the cluster-aware one).
    ``sem`` is NaN for a single image.
    """
    x = _as_2d(scores, "scores").ravel()
    n = x.size
    sem = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(x.mean()), "median": float(np.median(x)), "sem": sem, "n": int(n)}


def paired_outcomes(candidate, baseline, tie_tol: float = 0.0) -> np.ndarray:
    """Per-(prompt, seed) outcome of ``candidate`` vs ``baseline``: 1 win, 0.5 tie, 0 loss.

    Args:
        candidate, baseline: ``[P, S]`` scores on the same prompts and seeds (higher is better).
        tie_tol: ``|candidate − baseline| <= tie_tol`` counts as a tie (default: only exact equality).

    Returns:
        ``[P, S]`` float array of outcomes.
    """
    a, b = _as_2d(candidate, "candidate"), _as_2d(baseline, "baseline")
    if a.shape != b.shape:
        raise ValueError(f"candidate {a.shape} and baseline {b.shape} scores must have the same [P, S] shape")
    diff = a - b
    return np.where(np.abs(diff) <= tie_tol, 0.5, (diff > 0).astype(np.float64))


@dataclass(frozen=True)
class WinRate:
    """A win rate with its bootstrap percentile interval.

    ``n`` is the number of paired comparisons (images), ``n_prompts`` the number of clusters.
    """

    win_rate: float
    ci_low: float
    ci_high: float
    n: int
    n_prompts: int

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_win_rates(outcomes, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Win rates of ``n_boot`` cluster-bootstrap resamples of ``outcomes`` ``[P, S]``: ``[n_boot]``.

    Each resample draws P prompts with replacement and keeps all S seeds of every drawn prompt
    (cluster bootstrap), so the interval reflects prompt-to-prompt variation, not just seed noise.
    A fixed ``seed`` makes the interval reproducible.
    """
    o = _as_2d(outcomes, "outcomes")
    per_prompt = o.mean(axis=1)  # [P]; every prompt has the same number of seeds
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_prompt), size=(n_boot, len(per_prompt)))  # [n_boot, P]
    return per_prompt[idx].mean(axis=1)


def win_rate(
    candidate, baseline, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0, tie_tol: float = 0.0
) -> WinRate:
    """Paired win rate of ``candidate`` over ``baseline`` (``[P, S]`` each), ties as 1/2, with a
    cluster-bootstrap (over prompts) percentile interval at level ``confidence``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    o = paired_outcomes(candidate, baseline, tie_tol=tie_tol)
    boot = bootstrap_win_rates(o, n_boot=n_boot, seed=seed)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return WinRate(float(o.mean()), float(lo), float(hi), int(o.size), int(o.shape[0]))


def win_rate_by_category(
    candidate, baseline, categories, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, WinRate]:
    """:func:`win_rate` within each category; ``categories`` is ``[P]`` (one label per prompt).

    Returns ``{category: WinRate}`` in sorted category order; the bootstrap resamples prompts within
    the category.
    """
    a, b = _as_2d(candidate, "candidate"), _as_2d(baseline, "baseline")
    cats = np.asarray([str(c) for c in categories])
    if len(cats) != a.shape[0]:
        raise ValueError(f"categories has {len(cats)} entries but there are {a.shape[0]} prompts")
    return {
        str(c): win_rate(a[cats == c], b[cats == c], n_boot=n_boot, confidence=confidence, seed=seed)
        for c in sorted(set(cats.tolist()))
    }


def summarize_by_category(scores, categories) -> dict[str, dict[str, float]]:
    """:func:`summarize` within each category; ``categories`` is ``[P]``."""
    x = _as_2d(scores, "scores")
    cats = np.asarray([str(c) for c in categories])
    if len(cats) != x.shape[0]:
        raise ValueError(f"categories has {len(cats)} entries but there are {x.shape[0]} prompts")
    return {str(c): summarize(x[cats == c]) for c in sorted(set(cats.tolist()))}


def pairwise_wins(scores_per_model) -> np.ndarray:
    """Win counts between every pair of models, ``W[i, j]`` = comparisons model i won against j.

    Args:
        scores_per_model: M arrays ``[P, S]`` of the same scorer on the same prompts and seeds.

    Returns:
        ``[M, M]`` array; a tie adds 1/2 to both ``W[i, j]`` and ``W[j, i]``; the diagonal is 0.
    """
    xs = [_as_2d(s, f"scores of model {i}") for i, s in enumerate(scores_per_model)]
    m = len(xs)
    wins = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            if i != j:
                wins[i, j] = paired_outcomes(xs[i], xs[j]).sum()
    return wins


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def bradley_terry_log_likelihood(s, wins) -> float:
    """``Σ_{i≠j} W[i, j] · log σ(s_i − s_j)`` for strengths ``s`` ``[M]`` and win counts ``W`` ``[M, M]``."""
    s = np.asarray(s, dtype=np.float64)
    w = np.asarray(wins, dtype=np.float64)
    return float((w * _log_sigmoid(s[:, None] - s[None, :])).sum())


def fit_bradley_terry(
    wins, *, anchor: int = 0, l2: float = 1e-6, max_iter: int = 200, tol: float = 1e-10
) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry strengths (docs/objectives.md#bradleyterry-rankings; Bradley & Terry 1952).

    Maximises ``Σ_{i≠j} W[i, j] · log σ(s_i − s_j) − (l2/2)·Σ s_i²`` with ``s[anchor] = 0`` by Newton's
    method (the objective is concave, so Newton with step halving converges). ``P(i beats j) =
    σ(s_i − s_j)``; with no cycle in the data the fit reproduces the empirical pairwise rates.

    Args:
        wins: ``[M, M]`` win counts from :func:`pairwise_wins` (ties as half a win each way).
        anchor: index of the model whose strength is fixed at 0 (the baseline).
        l2: a tiny ridge that keeps s finite when a model wins (or loses) every comparison — then the
            unpenalised MLE is at infinity. At 1e-6 it moves fitted probabilities by ~1e-6 otherwise.

    Returns:
        ``[M]`` strengths ``s`` (log-odds units), ``s[anchor] == 0``.
    """
    w = np.asarray(wins, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"wins must be a square [M, M] matrix, got shape {w.shape}")
    if np.any(w < 0):
        raise ValueError("wins must be non-negative counts")
    m = w.shape[0]
    if not 0 <= anchor < m:
        raise ValueError(f"anchor {anchor} out of range for {m} models")
    w = w * (1.0 - np.eye(m))
    n = w + w.T  # comparisons between i and j
    free = np.array([i for i in range(m) if i != anchor], dtype=int)
    s = np.zeros(m)

    def objective(s: np.ndarray) -> float:
        return bradley_terry_log_likelihood(s, w) - 0.5 * l2 * float(s @ s)

    value = objective(s)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))  # p[i, j] = P(i beats j)
        grad = (w - n * p).sum(axis=1) - l2 * s  # d/ds_i: Σ_j W_ij (1 − p_ij) − W_ji p_ji
        curv = n * p * (1.0 - p)  # [M, M], symmetric
        hess = curv - np.diag(curv.sum(axis=1)) - l2 * np.eye(m)  # negative definite on `free`
        g, h = grad[free], hess[np.ix_(free, free)]
        step = np.linalg.solve(h, -g)
        t = 1.0
        while True:
            candidate = s.copy()
            candidate[free] += t * step
            new_value = objective(candidate)
            if new_value >= value - 1e-12 or t < 1e-8:
                break
            t *= 0.5
        s, improvement, value = candidate, new_value - value, new_value
        if np.max(np.abs(t * step)) < tol or abs(improvement) < tol * max(1.0, abs(value)):
            break
    return s


def sigmoid(x):
    """``1 / (1 + exp(−x))`` elementwise, for turning strength differences into probabilities."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def verdict(wr: dict) -> str:
    """``beats``, ``is beaten by`` or ``ties with``: where the 95% interval of a win rate lies
    relative to 0.5 (wholly above, wholly below, or containing it)."""
    if wr["ci_low"] > 0.5:
        return "beats"
    if wr["ci_high"] < 0.5:
        return "is beaten by"
    return "ties with"


# ----------------------------------------------------------------------------------------------
# Proportions and AUCs (the data audit's intervals)

#: z of a two-sided 95% normal interval.
Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``successes / n`` (Wilson 1927).

    ``successes`` may be fractional (pairs scored 0.5 when a rule cannot decide them): those pairs vary
    less than a coin flip, so the interval is then a little wider than it needs to be, never narrower.
    With ``n == 0`` nothing is known: (0, 1). Example: 8 of 10 gives (0.490, 0.943).
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def rank_auc(positive, negative) -> float:
    """P(a positive value > a negative one) + 0.5 P(equal): the Mann-Whitney AUC; NaN without both."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.sort(np.asarray(negative, dtype=np.float64))
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")
    not_above = np.searchsorted(neg, pos, side="right")
    return float((below + 0.5 * (not_above - below)).sum() / (len(pos) * len(neg)))


def auc_interval(auc: float, n_positive: int, n_negative: int, z: float = Z95) -> tuple[float, float]:
    """Normal interval of an AUC with Hanley and McNeil's (1982) standard error, clipped to [0, 1]."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (
        auc * (1 - auc) + (n_positive - 1) * (q1 - auc * auc) + (n_negative - 1) * (q2 - auc * auc)
    ) / (n_positive * n_negative)
    half = z * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)
