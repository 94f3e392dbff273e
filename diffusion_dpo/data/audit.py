"""Shortcut audit of a pair dataset: what, besides content, separates the chosen images from the rejected.

DPO pushes the model towards whatever distinguishes winners from losers. When that is the file format,
the JPEG quality, the size or the sharpness rather than what the annotators judged, the model learns
compression artefacts or resolution instead of the preference. This module measures such traits per
image and asks, for each one, how well it ALONE predicts the winner:

- numeric traits (width, height, aspect ratio, estimated JPEG quality, encoded bytes per pixel, mean
  brightness, mean saturation, sharpness): the accuracy over non-tied pairs of the rule "the image with
  the higher value wins", or "the lower", whichever is better; a pair whose two values are equal counts
  0.5 (the rule cannot decide it, as a coin);
- categorical traits (file format, ``WxH`` size): the best rule "the image whose value is X wins" (or
  "loses"), a pair where both or neither have X counting 0.5;
- position: the rule "image 0 wins" (or 1) over Pick-a-Pic ``label_0``. After loading, pairs are put
  winner first, so position is no shortcut for the trainer; a strong bias says the annotation tool or
  the annotators favoured one side, which makes the labels less trustworthy;
- caption length (words): both images share the caption, so it cannot pick the winner. What it can
  predict is which pairs are ties (dropping ties then shifts the captions trained on) and the winning
  position (a labelling artefact); each is the AUC (Mann-Whitney) of the word count, best direction.

Each accuracy comes with a 95% Wilson interval (for the caption AUCs: Hanley and McNeil's), and a trait
is flagged when the LOWER end of it exceeds ``threshold`` (default 0.6): a trait must predict the winner
clearly better than chance, and on enough pairs, so noise in a few hundred clean pairs is not flagged.
The rule's direction is chosen on the same pairs, which can only raise the accuracy; with the interval's
lower end as the test, that choice does not flag noise either.

Also counted: ties (share, interval), identical pairs (both images the same bytes or pixels), exact
duplicate images across the dataset (same bytes; same pixels), near duplicates (a 64-bit difference hash
within :data:`NEAR_DISTANCE` bits), pairs of the same two images repeated (and with opposite winners),
bad labels, and images that cannot be read (counted and named, never a crash).

Two depths. ``full=False`` reads the file header only (size, format, JPEG tables) and the byte count:
what the trainer runs at start-up (:func:`startup_audit`) on a bounded sample. ``full=True`` decodes
the pixels too: ``python data/audit_pairs.py``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import time
from collections import Counter

import numpy as np
from PIL import Image

from diffusion_dpo.data.pairs import (
    ORDERED_COLUMNS,
    PICKAPIC_COLUMNS,
    column_names,
    detect_pair_schema,
    label_problem,
    load_rows,
    resolve_image_path,
    sample_rows,
)
from diffusion_dpo.data.transforms import decode_image, image_bytes

logger = logging.getLogger(__name__)

#: A trait is flagged when the lower end of its 95% interval exceeds this accuracy.
DEFAULT_THRESHOLD = 0.6
#: Two pictures whose 64-bit difference hashes differ in at most this many bits are near duplicates.
NEAR_DISTANCE = 4
#: z of a two-sided 95% normal interval.
Z95 = 1.959963984540054
#: Formats that store pixels exactly; they rank above every JPEG quality in the ``jpeg_quality`` rule.
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "GIF", "PPM", "TIFF", "QOI", "TGA"})
LOSSLESS_RANK = 101
#: How many rows the report names for each finding (identical pairs, unreadable images, ...).
MAX_NAMED = 10
#: The trainer's start-up audit: at most this many pairs, and about this many seconds of reading.
STARTUP_PAIRS = 256
STARTUP_SECONDS = 5.0

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


# ----------------------------------------------------------------------------------------------
# Statistics


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


# ----------------------------------------------------------------------------------------------
# Per-image traits

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


# ----------------------------------------------------------------------------------------------
# Summaries


def _value(traits: dict, name: str) -> float:
    # The number a rule compares; NaN when unknown (then the pair counts 0.5).
    if name == "jpeg_quality":
        if traits.get("jpeg_quality") is not None:
            return float(traits["jpeg_quality"])
        return float(LOSSLESS_RANK) if traits.get("format") in LOSSLESS_FORMATS else float("nan")
    value = traits.get(name)
    return float("nan") if value is None else float(value)


def _winner_first(record: dict) -> tuple[dict, dict]:
    return (
        (record["image_0"], record["image_1"])
        if record["label_0"] == 1.0
        else (record["image_1"], record["image_0"])
    )


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


def _describe_numeric(name: str, values: np.ndarray) -> str:
    if name == "jpeg_quality":
        jpeg = values[(values <= 100) & ~np.isnan(values)]
        lossless = int((values == LOSSLESS_RANK).sum())
        parts = [f"{len(jpeg)} JPEG" + (f" (median q {np.median(jpeg):.0f})" if len(jpeg) else "")]
        return ", ".join(parts + [f"{lossless} lossless"])
    known = values[~np.isnan(values)]
    return f"mean {known.mean():.4g}" if len(known) else "unknown"


def _most_common(counts: dict, side: str) -> str:
    return ", ".join(f"{value} {n}" for value, n in list(counts[side].items())[:3])


def _trait_rows(usable: list[dict], threshold: float, pixels: bool) -> list[dict]:
    rows = []
    for name, (needs_pixels, what) in CATEGORICAL_TRAITS.items():
        if needs_pixels and not pixels:
            continue
        chosen = [_winner_first(r)[0].get(name) for r in usable]
        rejected = [_winner_first(r)[1].get(name) for r in usable]
        rule = categorical_rule(chosen, rejected, threshold)
        if rule["value"] is None:
            text = "no usable pairs"
        else:
            top = functools.partial(_most_common, rule["counts"])
            text = (
                f"{what}; where only one image is {rule['value']} ({rule['differs']} pairs) it "
                f"{rule['direction']} {rule['accuracy_where_different'] or 0:.0%}; chosen: {top('chosen')}; "
                f"rejected: {top('rejected')}"
            )
        if rule["value"] is not None and not rule["differs"]:  # one value throughout: no rule to speak of
            text = f"{what}; the same for both images of every pair; chosen: {top('chosen')}"
        rows.append({"trait": name, "kind": "categorical", **rule, "explanation": text,
                     "rule": f"{rule['value']} {rule['direction']}" if rule["differs"] else None})  # fmt: skip
    for name, (needs_pixels, what) in NUMERIC_TRAITS.items():
        if needs_pixels and not pixels:
            continue
        chosen = np.array([_value(_winner_first(r)[0], name) for r in usable])
        rejected = np.array([_value(_winner_first(r)[1], name) for r in usable])
        rule = numeric_rule(chosen, rejected, threshold)
        if rule["n"] == 0:
            text = "no usable pairs"
        else:
            where = rule["accuracy_where_different"]
            text = (
                f"{what}; differs in {rule['differs']}/{rule['n']} pairs"
                + (f", there the {rule['direction']} wins {where:.0%}" if where is not None else "")
                + f"; chosen {_describe_numeric(name, chosen)}, rejected {_describe_numeric(name, rejected)}"
            )
        known = lambda v: float(np.nanmean(v)) if (~np.isnan(v)).any() else None  # noqa: E731
        rows.append({"trait": name, "kind": "numeric", **rule, "explanation": text,
                     "rule": f"{rule['direction']} wins" if rule["differs"] else None,
                     "chosen_mean": known(chosen), "rejected_mean": known(rejected)})  # fmt: skip
    return rows


def _close_pairs(hashes: np.ndarray, distance: int, chunk: int = 256) -> int:
    # Pairs i < j of 64-bit hashes within `distance` bits, in [chunk, n] blocks to bound memory.
    n, count = len(hashes), 0
    for start in range(0, n, chunk):
        block = hashes[start : start + chunk, None] ^ hashes[None, :]  # [c, n]
        close = np.bitwise_count(block) <= distance
        upper = np.arange(n)[None, :] > np.arange(start, start + len(block))[:, None]
        count += int((close & upper).sum())
    return count


#: Near duplicates are counted among at most this many distinct pictures (an n² comparison).
MAX_NEAR_DUPLICATE_PICTURES = 20000


def _duplicates(records: list[dict], near_distance: int) -> dict:
    images = [r[side] for r in records for side in ("image_0", "image_1") if "digest" in r[side]]
    files, pictures = Counter(t["digest"] for t in images), Counter(t["pixel_digest"] for t in images)
    hashes = {t["pixel_digest"]: t["dhash"] for t in images}
    near = None
    if len(hashes) <= MAX_NEAR_DUPLICATE_PICTURES:
        near = _close_pairs(np.array(list(hashes.values()), dtype=np.uint64), near_distance)
    first_winner, repeated, conflicting, examples = {}, 0, 0, []
    for r in records:
        if "digest" not in r["image_0"] or "digest" not in r["image_1"]:
            continue
        d0, d1 = r["image_0"]["digest"], r["image_1"]["digest"]
        winner = None if r["label_0"] in (None, 0.5) else (d0 if r["label_0"] == 1.0 else d1)
        key = tuple(sorted((d0, d1)))
        if key not in first_winner:
            first_winner[key] = (r["row"], winner)
            continue
        repeated += 1
        earlier_row, earlier = first_winner[key]
        if winner is not None and earlier is not None and winner != earlier:
            conflicting += 1
        if len(examples) < MAX_NAMED:
            examples.append([earlier_row, r["row"]])
    return {
        "images": len(images),
        "distinct_files": len(files),
        "duplicate_files": len(images) - len(files),  # copies beyond the first of each file
        "files_repeated": sum(1 for c in files.values() if c > 1),
        "distinct_pictures": len(pictures),
        "same_picture_other_bytes": len(files) - len(pictures),
        "near_duplicate_picture_pairs": near,
        "near_distance": near_distance,
        "repeated_pairs": repeated,
        "conflicting_repeated_pairs": conflicting,
        "repeated_pair_rows": examples,
    }


def summarize(
    records: list[dict],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    positional: bool = True,
    position_counts: tuple[int, int] | None = None,
    tie_counts: tuple[int, int] | None = None,
    near_distance: int = NEAR_DISTANCE,
) -> dict:
    """The audit report (JSON-ready) of :func:`measure_pair` records.

    ``positional``: ``label_0`` says which position won (Pick-a-Pic); then ties, position bias and the
    caption-length rules are computed from the records. Otherwise image 0 is the winner (ordered or
    already normalised pairs) and ``position_counts`` (image 0 wins, non-tied pairs) and ``tie_counts``
    (ties, labelled pairs), when known from elsewhere (the loader's counts), fill those entries.

    Keys: ``pairs``, ``bad_labels``, ``undecodable``, ``ties``, ``position``, ``identical_pairs``,
    ``duplicates`` (None without decoded pixels), ``traits`` (one row per trait: ``trait, kind,
    accuracy, interval, rule, flag, explanation``, ...), ``flagged`` (names), ``threshold``, ``pixels``.
    """
    labelled = [r for r in records if r["label_0"] is not None]
    decided = [r for r in labelled if r["label_0"] != 0.5]
    readable = lambda r: "error" not in r["image_0"] and "error" not in r["image_1"]  # noqa: E731
    usable = [r for r in decided if readable(r)]
    pixels = any("brightness" in r[side] for r in records for side in ("image_0", "image_1"))

    traits = []
    if positional:
        ties = len(labelled) - len(decided)
        position_counts = (sum(r["label_0"] == 1.0 for r in decided), len(decided))
        tie_counts = (ties, len(labelled))
    position = position_bias(*position_counts, threshold) if position_counts else None
    if position:
        traits.append(position)
    traits += _trait_rows(usable, threshold, pixels)
    if positional:
        words = lambda rs: [r["caption_words"] for r in rs if r["caption_words"] is not None]  # noqa: E731
        tied = [r for r in labelled if r["label_0"] == 0.5]
        traits.append(
            caption_length_rule(
                words(tied), words(decided), "caption_length_tie", "ties", "non-tied", threshold
            )
        )
        traits.append(caption_length_rule(
            words([r for r in decided if r["label_0"] == 1.0]), words([r for r in decided if r["label_0"] == 0.0]),
            "caption_length_position", "won by image 0", "won by image 1", threshold,
        ))  # fmt: skip

    unreadable = [
        (r["row"], side, r[side]["error"])
        for r in records
        for side in ("image_0", "image_1")
        if "error" in r[side]
    ]
    identical, near_identical = [], []
    for r in records:
        if not readable(r):
            continue
        a, b = r["image_0"], r["image_1"]
        if r["same_bytes"] or ("pixel_digest" in a and a["pixel_digest"] == b["pixel_digest"]):
            identical.append(r["row"])
        elif "dhash" in a and int(a["dhash"] ^ b["dhash"]).bit_count() <= near_distance:
            near_identical.append(r["row"])
    bad = [(r["row"], r["label_problem"]) for r in records if r["label_problem"]]
    return {
        "pairs": len(records),
        "threshold": threshold,
        "pixels": pixels,
        "usable_pairs": len(usable),
        "bad_labels": {"count": len(bad), "examples": bad[:MAX_NAMED]},
        "undecodable": {
            "rows": len({row for row, _, _ in unreadable}),
            "images": len(unreadable),
            "examples": [list(u) for u in unreadable[:MAX_NAMED]],
        },
        "ties": tie_share(*tie_counts) if tie_counts else None,
        "position": position,
        "identical_pairs": {
            "count": len(identical),
            "rows": identical[:MAX_NAMED],
            "near_count": len(near_identical) if pixels else None,
            "near_rows": near_identical[:MAX_NAMED],
        },
        "duplicates": _duplicates(records, near_distance) if pixels else None,
        "traits": traits,
        "flagged": [t["trait"] for t in traits if t["flag"]],
    }


def example_records(records: list[dict], trait: dict, k: int = 4) -> list[dict]:
    """Up to ``k`` non-tied, readable records where ``trait``'s rule picks the winner, for showing."""
    name, found = trait["trait"], []
    for r in records:
        if r["label_0"] in (None, 0.5) or "error" in r["image_0"] or "error" in r["image_1"]:
            continue
        chosen, rejected = _winner_first(r)
        if trait["kind"] == "numeric":
            a, b = _value(chosen, name), _value(rejected, name)
            holds = a > b if trait["direction"] == "higher" else a < b
        elif trait["kind"] == "categorical":
            has = chosen.get(name) == trait["value"], rejected.get(name) == trait["value"]
            holds = has == ((True, False) if trait["direction"] == "wins" else (False, True))
        else:
            return []
        if holds:
            found.append(r)
            if len(found) == k:
                break
    return found


def format_table(report: dict) -> str:
    """The report as plain text: a header of counts, then one line per trait."""
    lines = [f"{report['pairs']} pairs audited ({report['usable_pairs']} non-tied with both images readable)"]
    if report.get("source"):
        lines[0] += f" from {report['source']}"
    if report["ties"]:
        t = report["ties"]
        lines.append(f"ties: {t['count']} of {t['of']} ({(t['share'] or 0):.1%})")
    ident = report["identical_pairs"]
    lines.append(f"identical pairs (both images the same picture): {ident['count']}"
                 + (f"; near-identical: {ident['near_count']}" if ident["near_count"] is not None else ""))  # fmt: skip
    dup = report["duplicates"]
    if dup:
        near = dup["near_duplicate_picture_pairs"]
        lines.append(
            f"images: {dup['images']}, duplicate files {dup['duplicate_files']}, same picture in other bytes "
            f"{dup['same_picture_other_bytes']}, near-duplicate picture pairs "
            f"{'not counted' if near is None else near}; repeated pairs {dup['repeated_pairs']} "
            f"({dup['conflicting_repeated_pairs']} with the other winner)"
        )
    u, b = report["undecodable"], report["bad_labels"]
    lines.append(f"unreadable images: {u['images']} in {u['rows']} rows; bad labels: {b['count']}")
    header = ("trait", "rule", "accuracy alone", "95% interval", "flag", "explanation")
    table = [header]
    for t in report["traits"]:
        acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.3f}"
        ci = "-" if t["interval"] is None else f"[{t['interval'][0]:.3f}, {t['interval'][1]:.3f}]"
        table.append((t["trait"], t["rule"] or "-", acc, ci, "FLAG" if t["flag"] else "", t["explanation"]))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines.append("")
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in table]
    lines.append("")
    if report["flagged"]:
        lines.append(
            f"FLAGGED (the interval's lower end above {report['threshold']}): {', '.join(report['flagged'])}"
        )
    else:
        lines.append(
            f"nothing flagged: no trait predicts the winner with a lower bound above {report['threshold']}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading pairs


class PairReader:
    """The raw pairs of a source, as dicts ``{"row", "caption", "image_0", "image_1", "label_0"}``:
    Pick-a-Pic rows as stored (ties and bad labels included, for the audit to count), ordered pairs
    with the winner as image 0 and ``label_0`` 1. Loads through :func:`~diffusion_dpo.data.pairs.load_rows`,
    so a wrong path or a missing column is the loader's error, naming the source.

    ``max_pairs``: a seeded random subset (:func:`~diffusion_dpo.data.pairs.sample_rows`), or with
    ``streaming`` the first ``max_pairs`` rows; None: all.
    """

    def __init__(self, dataset_name, split: str = "train", *, max_pairs: int | None = None, seed: int = 0,
                 streaming: bool = False, cache_dir: str | None = None, dataset_format: str = "auto",
                 image_root: str | None = None):  # fmt: skip
        source = load_rows(dataset_name, split, streaming=streaming, cache_dir=cache_dir)
        self.description = source.description
        self.base_dir = image_root or source.base_dir
        names = column_names(source)
        self.converter = None
        try:
            self.schema = detect_pair_schema(names, source.description)
            needed = list(ORDERED_COLUMNS if self.schema == "ordered" else PICKAPIC_COLUMNS)
        except ValueError:  # the other formats (diffusion_dpo/data/formats), in their positional form
            from diffusion_dpo.data.pairs import PairConverter, resolve_format

            fmt = resolve_format(names, source.description, dataset_format)  # or the loader's error
            self.schema, self.converter = fmt.name, PairConverter(fmt, self.base_dir, seed)
            needed = fmt.needed(names)
        rows = source.rows.select_columns(needed)
        self.streaming = streaming
        if streaming:
            self.rows, self.positions = (rows.take(max_pairs) if max_pairs else rows), None
        else:
            self.positions = sample_rows(len(rows), max_pairs, seed)
            self.rows = rows

    def __len__(self) -> int | None:
        return None if self.positions is None else len(self.positions)

    def _pair(self, row: int, values: dict) -> dict:
        if self.converter is not None:
            # the audit's label_0 is the majority (0, 0.5 or 1); p0, the vote share, is for label quality
            pair = self.converter.positional(values)
            p0 = pair["label_0"]
            majority = None if p0 is None else (1.0 if p0 > 0.5 else 0.0 if p0 < 0.5 else 0.5)
            return {**pair, "row": row, "label_0": majority, "p0": p0}
        if self.schema == "ordered":
            first, second, label = values["image_w"], values["image_l"], 1.0
        else:
            first, second, label = values["jpg_0"], values["jpg_1"], values["label_0"]
        return {
            "row": row, "caption": values["caption"], "label_0": label,
            "image_0": resolve_image_path(first, self.base_dir), "image_1": resolve_image_path(second, self.base_dir),
        }  # fmt: skip

    def __iter__(self):
        if self.positions is None:
            for row, values in enumerate(self.rows):
                yield self._pair(row, values)
            return
        chosen = self.rows.select(self.positions) if len(self.positions) < len(self.rows) else self.rows
        for row, values in zip(self.positions.tolist(), chosen):
            yield self._pair(row, values)

    def get(self, rows) -> dict[int, dict]:
        """The pairs at these source ``rows`` (a stream is read again up to the last one)."""
        wanted = set(rows)
        if self.positions is not None:
            return {row: self._pair(row, self.rows[int(row)]) for row in sorted(wanted)}
        found = {}
        for pair in self:
            if pair["row"] in wanted:
                found[pair["row"]] = pair
                if len(found) == len(wanted):
                    break
        return found


def audit_dataset(dataset_name, split: str = "train", *, max_pairs: int | None = 2000, seed: int = 0,
                  threshold: float = DEFAULT_THRESHOLD, full: bool = True, streaming: bool = False,
                  cache_dir: str | None = None, **reader_options) -> tuple[dict, list[dict], PairReader]:  # fmt: skip
    """Read, measure and summarise a pair dataset: (report, per-pair records, the reader).
    ``reader_options``: :class:`PairReader`'s ``dataset_format`` and ``image_root``."""
    reader = PairReader(
        dataset_name, split, max_pairs=max_pairs, seed=seed, streaming=streaming, cache_dir=cache_dir,
        **reader_options,
    )  # fmt: skip
    records = []
    for i, pair in enumerate(reader, 1):
        records.append(measure_pair(pair, full=full))
        if i % 1000 == 0:
            logger.info("measured %d pairs of %s", i, reader.description)
    report = summarize(records, threshold=threshold, positional=reader.schema == "pickapic")
    report = {"source": reader.description, "schema": reader.schema, "split": split, **report}
    return report, records, reader


# ----------------------------------------------------------------------------------------------
# The trainer's start-up check


def startup_audit(rows, stats, *, dataset_name, max_pairs: int = STARTUP_PAIRS,
                  threshold: float = DEFAULT_THRESHOLD, time_budget_s: float = STARTUP_SECONDS) -> list[str]:  # fmt: skip
    """The cheap audit the trainer runs on its loaded pairs; logs a warning naming each flagged trait.

    ``rows``: what :func:`~diffusion_dpo.data.pairs.load_pair_dataset` returned (winner first), ``stats``
    its :class:`~diffusion_dpo.data.pairs.PairStats`. Headers only (size, format, JPEG quality, bytes
    per pixel) and identical pairs, on at most ``max_pairs`` pairs drawn at random, reading for about
    ``time_budget_s`` at most; ties and position bias from the loader's counts over the whole dataset.
    A stream is left alone (reading it here would consume it), as is anything that is not pairs.
    Returns the flagged names (plus ``identical_pairs`` when there are some); never raises.
    """
    try:
        return _startup_audit(rows, stats, dataset_name, max_pairs, threshold, time_budget_s)
    except Exception as error:  # advice only: an audit that fails must not stop a run
        logger.warning("start-up shortcut audit skipped (%s: %s)", type(error).__name__, error)
        return []


def _startup_audit(rows, stats, dataset_name, max_pairs, threshold, time_budget_s) -> list[str]:
    import datasets

    from diffusion_dpo.data.pairs import PairStats

    if not isinstance(stats, PairStats):  # unpaired (KTO) or caption/image data
        return []
    if not isinstance(rows, datasets.Dataset):
        logger.info(
            "start-up shortcut audit skipped for a streamed dataset (it would consume the stream); run "
            "`python data/audit_pairs.py --dataset %s --streaming --max_pairs 2000`",
            dataset_name,
        )
        return []
    started = time.monotonic()
    positions = sample_rows(len(rows), max_pairs, seed=0).tolist()
    records = []
    for start in range(0, len(positions), 32):
        batch = rows[positions[start : start + 32]]  # normalised: image_w is the winner
        for j, row in enumerate(positions[start : start + 32]):
            if batch["bad"][j] is None:
                pair = {"row": row, "caption": batch["caption"][j], "image_0": batch["image_w"][j],
                        "image_1": batch["image_l"][j], "label_0": 1.0}  # fmt: skip
                records.append(measure_pair(pair, full=False))
        if time.monotonic() - started > time_budget_s:
            break
    pickapic = "label_0" in rows.column_names  # else ordered pairs: no labels, no position
    decided = stats.seen - stats.ties - stats.bad_labels
    report = summarize(
        records, threshold=threshold, positional=False,
        position_counts=(decided - stats.swapped, decided) if pickapic else None,
        tie_counts=(stats.ties, stats.seen - stats.bad_labels) if pickapic else None,
    )  # fmt: skip
    flagged = [t for t in report["traits"] if t["flag"]]
    identical = report["identical_pairs"]["count"]
    seconds = time.monotonic() - started
    if not flagged and not identical:
        logger.info(
            "start-up shortcut audit of %d pairs (%.1f s): no size, format, JPEG quality, bytes per pixel or "
            "position rule predicts the winner (lower bound above %.2f)", len(records), seconds, threshold,
        )  # fmt: skip
        return []
    lines = [
        f"  - {t['trait']}: '{t['rule']}' alone picks the winner in {t['accuracy']:.0%} of pairs "
        f"(95% [{t['interval'][0]:.2f}, {t['interval'][1]:.2f}]); {t['explanation']}"
        for t in flagged
    ]
    if identical:
        lines.append(
            f"  - identical_pairs: {identical} pairs show the same picture twice (rows {report['identical_pairs']['rows']})"
        )
    logger.warning(
        "start-up shortcut audit of %d pairs of %s: something besides content separates chosen from rejected, "
        "and the model may learn it instead of the preference:\n%s\nRun `python data/audit_pairs.py --dataset %s` "
        "for the full audit (pixels, duplicates, example pairs); --no_audit_pairs turns this check off.",
        len(records), dataset_name, "\n".join(lines), dataset_name,
    )  # fmt: skip
    return [t["trait"] for t in flagged] + (["identical_pairs"] if identical else [])
