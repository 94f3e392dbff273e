"""The audit's rules: how well one trait ALONE predicts the winner (numeric, categorical, position,
ties, caption length), each accuracy with its 95% interval (:mod:`diffusion_dpo.evaluation.stats`),
flagged when the interval's lower end exceeds the threshold (:mod:`.audit` says why)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from diffusion_dpo.evaluation.stats import auc_interval, rank_auc, wilson_interval

#: A trait is flagged when the lower end of its 95% interval exceeds this accuracy.
DEFAULT_THRESHOLD = 0.6


def _flag(accuracy: float | None, interval, threshold: float) -> bool:
    return accuracy is not None and interval[0] > threshold


def numeric_rule(chosen, rejected, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """How well "the higher (or lower) value wins" predicts the winner, from the chosen and rejected
    images' values ``[N]`` each (NaN: unknown, scored 0.5 like a tie of values).

    Returns ``accuracy`` (of the better direction, over all N pairs), ``interval`` (95% Wilson),
    ``direction`` ("higher" / "lower"), ``n``, ``differs`` (pairs with two known, different values),
    ``accuracy_where_different`` and ``flag`` (the interval's lower end above ``threshold``).
    """
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    known = ~(np.isnan(c) | np.isnan(r))
    score = np.where(known & (c > r), 1.0, np.where(known & (c < r), 0.0, 0.5))  # [N] for "higher wins"
    n, differs = len(score), int((known & (c != r)).sum())
    if n == 0:
        return {"accuracy": None, "interval": None, "direction": None, "n": 0, "differs": 0,
                "accuracy_where_different": None, "flag": False}  # fmt: skip
    higher = float(score.mean())
    direction = "higher" if higher >= 0.5 else "lower"
    accuracy = higher if direction == "higher" else 1.0 - higher
    interval = wilson_interval(accuracy * n, n)
    hits = score[known & (c != r)]
    where = float(hits.mean() if direction == "higher" else 1.0 - hits.mean()) if differs else None
    return {
        "accuracy": accuracy, "interval": list(interval), "direction": direction, "n": n, "differs": differs,
        "accuracy_where_different": where, "flag": _flag(accuracy, interval, threshold),
    }  # fmt: skip


def categorical_rule(chosen, rejected, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The best rule "the image whose value is X wins" (or "loses") over the values seen, from the chosen
    and rejected images' values ``[N]`` each (None: unknown). A pair where both or neither have X, or
    a value is unknown, scores 0.5.

    Returns ``accuracy`` (over all N pairs), ``interval`` (95% Wilson), ``value`` (X), ``direction``
    ("wins" / "loses"), ``n``, ``differs`` (pairs where exactly one image has X),
    ``accuracy_where_different``, ``flag`` and ``counts`` (``{"chosen": {value: n}, "rejected": ...}``).
    """
    chosen, rejected = list(chosen), list(rejected)
    n = len(chosen)
    counts = {"chosen": dict(Counter(map(str, chosen)).most_common()),
              "rejected": dict(Counter(map(str, rejected)).most_common())}  # fmt: skip
    best = {"accuracy": None, "interval": None, "value": None, "direction": None, "n": n, "differs": 0,
            "accuracy_where_different": None, "flag": False, "counts": counts}  # fmt: skip
    if n == 0:
        return best
    known = [(a, b) for a, b in zip(chosen, rejected) if a is not None and b is not None]
    best_key = None
    for value in sorted({v for pair in known for v in pair}, key=str):
        wins = sum(a == value and b != value for a, b in known)
        losses = sum(b == value and a != value for a, b in known)
        accuracy = (wins + 0.5 * (n - wins - losses)) / n  # "value wins"
        direction = "wins" if accuracy >= 0.5 else "loses"
        accuracy = max(accuracy, 1.0 - accuracy)
        # between equally good rules (with two values "A wins" is "B loses") name the one that wins
        key = (accuracy, direction == "wins")
        if best_key is None or key > best_key:
            best_key = key
            differs = wins + losses
            where = max(wins, losses) / differs if differs else None
            interval = wilson_interval(accuracy * n, n)
            best.update(accuracy=accuracy, interval=list(interval), value=value, direction=direction,
                        differs=differs, accuracy_where_different=where,
                        flag=_flag(accuracy, interval, threshold))  # fmt: skip
    return best


def position_bias(image_0_wins: int, decided: int, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Position bias of Pick-a-Pic labels: the share of non-tied pairs whose image 0 won, its 95% Wilson
    interval and ``biased`` (the interval excludes 0.5), plus the trait view: the accuracy of "image 0
    wins" (or 1, the better), its interval and ``flag`` (lower end above ``threshold``)."""
    share = image_0_wins / decided if decided else None
    low, high = wilson_interval(image_0_wins, decided)
    if share is None:
        accuracy, interval, side = None, None, None
    else:
        side = 0 if share >= 0.5 else 1
        accuracy = max(share, 1.0 - share)
        interval = [low, high] if side == 0 else [1.0 - high, 1.0 - low]
    return {
        "trait": "position", "kind": "label", "image_0_wins": image_0_wins, "decided": decided,
        "share_image_0": share, "interval_image_0": [low, high], "biased": bool(decided and (low > 0.5 or high < 0.5)),
        "accuracy": accuracy, "interval": interval, "rule": None if side is None else f"image {side} wins",
        "n": decided, "flag": _flag(accuracy, interval, threshold),
        "explanation": "no non-tied pairs" if share is None else (
            f"image 0 won {image_0_wins} of {decided} non-tied pairs ({share:.1%}; 95% "
            f"[{low:.3f}, {high:.3f}]{', not 0.5' if low > 0.5 or high < 0.5 else ''}); pairs are loaded "
            "winner first, so this is about the labels, not a shortcut for the model"
        ),
    }  # fmt: skip


def tie_share(ties: int, labelled: int) -> dict:
    """Ties (``label_0 == 0.5``) among the pairs with a valid label: count, share, 95% Wilson interval."""
    return {"count": ties, "of": labelled, "share": ties / labelled if labelled else None,
            "interval": list(wilson_interval(ties, labelled))}  # fmt: skip


def caption_length_rule(words_positive, words_negative, trait: str, positive: str, negative: str,
                        threshold: float = DEFAULT_THRESHOLD) -> dict:  # fmt: skip
    """Does the caption's word count separate ``positive`` from ``negative`` pairs? Its AUC, in the
    better direction, with Hanley-McNeil's 95% interval and ``flag``."""
    n_pos, n_neg = len(words_positive), len(words_negative)
    row = {"trait": trait, "kind": "label", "n": n_pos + n_neg, "accuracy": None, "interval": None,
           "rule": None, "flag": False}  # fmt: skip
    if not n_pos or not n_neg:
        return {**row, "explanation": f"needs both {positive} and {negative} pairs"}
    auc = rank_auc(words_positive, words_negative)
    longer = auc >= 0.5
    accuracy = auc if longer else 1.0 - auc
    interval = auc_interval(accuracy, n_pos, n_neg)
    return {
        **row, "accuracy": accuracy, "interval": list(interval), "flag": _flag(accuracy, interval, threshold),
        "rule": f"{'longer' if longer else 'shorter'} captions are {positive}" if auc != 0.5 else None,
        "explanation": (
            f"AUC of the word count, {positive} ({n_pos}, mean {np.mean(words_positive):.1f} words) vs "
            f"{negative} ({n_neg}, mean {np.mean(words_negative):.1f}); the caption is shared by both images, "
            "so it cannot pick the winner"
        ),
    }  # fmt: skip
