"""The audit report: every trait's rule over measured pairs (:mod:`.traits`, :mod:`.rules`), ties,
identical pairs, duplicates across the dataset, example pairs, and the table ``data/audit_pairs.py``
prints."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np

from diffusion_dpo.curation.rules import (
    DEFAULT_THRESHOLD,
    caption_length_rule,
    categorical_rule,
    numeric_rule,
    position_bias,
    tie_share,
)
from diffusion_dpo.curation.traits import CATEGORICAL_TRAITS, LOSSLESS_FORMATS, LOSSLESS_RANK, NUMERIC_TRAITS

#: Two pictures whose 64-bit difference hashes differ in at most this many bits are near duplicates.
NEAR_DISTANCE = 4
#: How many rows the report names for each finding (identical pairs, unreadable images, ...).
MAX_NAMED = 10


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
