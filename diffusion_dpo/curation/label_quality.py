"""Label quality before training: do the labels agree with scorers, do the scorers agree with each other,
how many pairs are near-ties, and which pairs does every scorer call the other way?

Users report judges and labels that are right a third of the time (Flow-Factory#224), and pair quality
dominates what DPO learns (flow_grpo#45). This module tells them before they spend GPU days: "your labels
agree with PickScore 54% of the time (95% [0.50, 0.58])". ``data/audit_pairs.py --scorer NAME`` adds
its report (and example pairs) to the audit; the trainer logs the headline at start-up when
``--audit_scorers`` names a scorer.

Definitions (over pairs with a readable label; ``p0`` = P(image 0 preferred), ``d = s(image 0) − s(image
1)`` a scorer's score difference, a scorer "calls" image 0 when ``d > scorer_tie``, image 1 when ``d <
−scorer_tie``, and nothing otherwise):

- **agreement with a scorer**: over decided pairs (``p0 ≠ 0.5``), the share whose call matches the
  label's winner, a pair the scorer does not call counting 0.5; with a Wilson 95% interval.
- **agreement among scorers**: for each two scorers, over the pairs both call, the share they call the
  same way.
- **near-ties**: the share of pairs whose vote margin ``|2·p0 − 1|`` is below ``near_tie`` (ties
  included), the pairs soft labels or ``--min_label_margin`` are for.
- **against every scorer**: decided pairs that every scorer calls, and calls for the other image. These
  are the first pairs to look at. They are listed (row, caption, label, scores) for the HTML report.

The numbers are pure functions of arrays (:func:`label_quality`); :func:`score_pairs` produces the arrays.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from diffusion_dpo.evaluation.stats import wilson_interval

logger = logging.getLogger(__name__)

#: Vote margin under which a pair counts as a near-tie (2 votes of 10 either way, or closer).
NEAR_TIE = 0.2
#: Pairs every scorer calls the other way that the report lists.
MAX_EXAMPLES = 8


def _share(successes: float, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return {"share": successes / n if n else None, "interval": [low, high], "n": int(n)}


def label_quality(
    labels,
    scores: dict[str, np.ndarray],
    *,
    scorer_tie: float = 0.0,
    near_tie: float = NEAR_TIE,
    rows=None,
    captions=None,
    max_examples: int = MAX_EXAMPLES,
) -> dict:
    """The label-quality report (see the module docstring) of ``N`` pairs.

    ``labels``: ``[N]`` p0 = P(image 0 preferred); NaN for a pair without a readable label (left out).
    ``scores``: scorer name -> ``[N, 2]`` scores of image 0 and image 1 (NaN: not scored, left out).
    ``rows``, ``captions``: what the examples name (default: positions).
    """
    p0 = np.asarray(labels, dtype=float)
    n = len(p0)
    rows = list(range(n)) if rows is None else list(rows)
    captions = [None] * n if captions is None else list(captions)
    label_sign = np.sign(2.0 * p0 - 1.0)  # +1: image 0 won, −1: image 1, 0: tie, NaN: bad
    valid = ~np.isnan(p0)
    calls = {}
    for name, s in scores.items():
        s = np.asarray(s, dtype=float).reshape(n, 2)
        d = s[:, 0] - s[:, 1]
        call = np.where(d > scorer_tie, 1.0, np.where(d < -scorer_tie, -1.0, 0.0))
        calls[name] = np.where(np.isnan(d), np.nan, call)
    decided = valid & (label_sign != 0)

    agreement = {}
    for name, call in calls.items():
        scored = decided & ~np.isnan(call)
        hits = float((call[scored] == label_sign[scored]).sum() + 0.5 * (call[scored] == 0).sum())
        agreement[name] = {**_share(hits, int(scored.sum())), "undecided": int((call[scored] == 0).sum())}

    among = {}
    for a, b in itertools.combinations(calls, 2):
        both = valid & (np.nan_to_num(calls[a]) != 0) & (np.nan_to_num(calls[b]) != 0)
        among[f"{a} vs {b}"] = _share(float((calls[a][both] == calls[b][both]).sum()), int(both.sum()))

    margin = np.abs(2.0 * p0 - 1.0)
    near = {
        **_share(float((margin[valid] < near_tie).sum()), int(valid.sum())),
        "ties": int((valid & (label_sign == 0)).sum()),
        "threshold": near_tie,
    }

    against = np.zeros(n, dtype=bool)
    if calls:
        stacked = np.stack([np.nan_to_num(c) for c in calls.values()])  # [K, N]
        against = decided & (stacked == -label_sign).all(axis=0)
    examples = [
        {"row": rows[i], "caption": captions[i], "label_0": float(p0[i]),
         "scores": {k: [float(v) for v in np.asarray(scores[k], dtype=float).reshape(n, 2)[i]] for k in scores}}
        for i in np.flatnonzero(against)[:max_examples]
    ]  # fmt: skip
    return {
        "pairs": n,
        "labelled": int(valid.sum()),
        "decided": int(decided.sum()),
        "scorer_tie": scorer_tie,
        "agreement": agreement,
        "agreement_among_scorers": among,
        "near_ties": near,
        "against_every_scorer": {
            **_share(float(against.sum()), int(decided.sum())),
            "rows": [rows[i] for i in np.flatnonzero(against)],
            "examples": examples,
        },
    }


def headline(report: dict) -> list[str]:
    """One line per finding, e.g. "labels agree with pickscore on 54% of 2000 decided pairs (95% [0.52, 0.56])"."""
    lines = []
    for name, a in report["agreement"].items():
        if a["share"] is None:
            continue
        lo, hi = a["interval"]
        lines.append(
            f"labels agree with {name} on {a['share']:.0%} of {a['n']} decided pairs (95% [{lo:.2f}, {hi:.2f}])"
        )
    for pair, a in report["agreement_among_scorers"].items():
        if a["share"] is not None:
            lo, hi = a["interval"]
            lines.append(
                f"scorers {pair} agree on {a['share']:.0%} of {a['n']} pairs (95% [{lo:.2f}, {hi:.2f}])"
            )
    near = report["near_ties"]
    if near["share"] is not None:
        lines.append(
            f"{near['share']:.0%} of {near['n']} pairs are near-ties (vote margin < {near['threshold']:g}; "
            f"{near['ties']} exact ties)"
        )
    against = report["against_every_scorer"]
    if against["share"] is not None and len(report["agreement"]) > 0:
        lines.append(
            f"{len(against['rows'])} decided pairs ({against['share']:.0%}) are called the other way by every scorer"
            + (f" (rows {against['rows'][:8]})" if against["rows"] else "")
        )
    return lines


def score_pairs(pairs: list[dict], scorers: dict, *, batch_size: int = 16) -> dict[str, np.ndarray]:
    """``[N, 2]`` scores of each pair's ``image_0`` and ``image_1`` (encoded cells) by each scorer
    (name -> :class:`~diffusion_dpo.scorers.Scorer`); a pair whose image cannot be decoded gets NaN."""
    from diffusion_dpo.data.transforms import BadRowError, decode_image

    out = {name: np.full((len(pairs), 2), np.nan) for name in scorers}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        images, prompts, where = [], [], []
        for j, pair in enumerate(chunk):
            try:
                decoded = [decode_image(pair[f"image_{side}"]).convert("RGB") for side in (0, 1)]
            except BadRowError:
                continue
            images += decoded
            prompts += [str(pair.get("caption") or "")] * 2
            where.append(start + j)
        if not images:
            continue
        for name, scorer in scorers.items():
            values = scorer(images, prompts).numpy().reshape(-1, 2)
            out[name][where] = values
    return out


def pairs_label_quality(pairs: list[dict], scorers: dict, **kwargs) -> dict:
    """:func:`label_quality` of positional pairs ``{"row", "caption", "image_0", "image_1", "label_0"}``
    (the audit's :class:`~diffusion_dpo.curation.audit.PairReader` rows; a bad label is None)."""
    # p0: a vote share where the format has one (the audit's label_0 is then the majority)
    labels = [_as_float(p.get("p0", p.get("label_0"))) for p in pairs]
    scores = score_pairs(pairs, scorers)
    return label_quality(
        labels, scores, rows=[p.get("row", i) for i, p in enumerate(pairs)],
        captions=[p.get("caption") for p in pairs], **kwargs,
    )  # fmt: skip


#: Pairs the trainer's start-up check scores (each scorer runs on 2 images per pair).
STARTUP_PAIRS = 64


def startup_label_quality(rows, scorer_specs, *, dataset_name, max_pairs: int = STARTUP_PAIRS) -> dict | None:
    """The trainer's start-up label check: score up to ``max_pairs`` loaded pairs (``rows`` as
    :func:`~diffusion_dpo.data.pairs.load_pair_dataset` returns them, winner first) with each scorer and
    log the headline. A stream is left alone (reading it would consume it). Never raises: advice only."""
    try:
        import datasets
        import torch

        from diffusion_dpo.data.pairs import sample_rows
        from diffusion_dpo.scorers import load_scorer

        if not isinstance(rows, datasets.Dataset):
            logger.info(
                "start-up label check skipped for a streamed dataset; run `python data/audit_pairs.py "
                "--dataset %s --streaming --scorer %s`", dataset_name, scorer_specs[0],
            )  # fmt: skip
            return None
        positions = sample_rows(len(rows), max_pairs, seed=0).tolist()
        batch = rows[positions]
        pairs = [
            {"row": r, "caption": batch["caption"][j], "image_0": batch["image_w"][j],
             "image_1": batch["image_l"][j], "label_0": batch["p"][j]}
            for j, r in enumerate(positions) if batch["bad"][j] is None
        ]  # fmt: skip
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scorers = {spec: load_scorer(spec, device=device) for spec in scorer_specs}
        report = pairs_label_quality(pairs, scorers)
        logger.warning(
            "start-up label check of %d pairs of %s:\n%s\nThe full report with example pairs: `python "
            "data/audit_pairs.py --dataset %s --scorer %s`",
            len(pairs), dataset_name, "\n".join(f"  - {line}" for line in headline(report)), dataset_name,
            scorer_specs[0],
        )  # fmt: skip
        return report
    except Exception as error:  # advice only: a check that fails must not stop a run
        logger.warning("start-up label check skipped (%s: %s)", type(error).__name__, error)
        return None


def _as_float(value) -> float:
    if value is None:
        return np.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return np.nan
    return v if 0.0 <= v <= 1.0 else np.nan


def render_html(report: dict, pairs_by_row: dict, thumbnail) -> str:
    """The HTML section of the audit page: the headline, the table, and the pairs every scorer calls
    the other way beside their scores (``thumbnail(cell) -> data URI``)."""
    import html

    rows = "".join(
        f"<tr><td>labels vs {html.escape(name)}</td><td>{_pct(a)}</td><td>{_ci(a)}</td><td>{a['n']}</td></tr>"
        for name, a in report["agreement"].items()
    ) + "".join(
        f"<tr><td>{html.escape(pair)}</td><td>{_pct(a)}</td><td>{_ci(a)}</td><td>{a['n']}</td></tr>"
        for pair, a in report["agreement_among_scorers"].items()
    )
    near, against = report["near_ties"], report["against_every_scorer"]
    rows += f"<tr><td>near-ties (margin &lt; {near['threshold']:g})</td><td>{_pct(near)}</td><td>{_ci(near)}</td><td>{near['n']}</td></tr>"
    rows += f"<tr><td>against every scorer</td><td>{_pct(against)}</td><td>{_ci(against)}</td><td>{against['n']}</td></tr>"
    figures = []
    for example in against["examples"]:
        pair = pairs_by_row.get(example["row"], {})
        winner = 0 if example["label_0"] > 0.5 else 1
        cells = []
        for side in (winner, 1 - winner):
            uri = thumbnail(pair.get(f"image_{side}")) if pair else ""
            image = f'<img src="{uri}" alt="image {side}">' if uri else "<em>unreadable</em>"
            scores = ", ".join(f"{k} {v[side]:.3g}" for k, v in example["scores"].items())
            label = "labelled winner" if side == winner else "labelled loser"
            cells.append(
                f"<div class=img>{image}<br><b>{label}</b> (image {side})<br><small>{scores}</small></div>"
            )
        caption = html.escape(str(example["caption"]))
        figures.append(
            f'<figure><figcaption>row {example["row"]}: "{caption}" (label_0 {example["label_0"]:g})</figcaption>'
            f"{''.join(cells)}</figure>"
        )
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in headline(report))
    return (
        f"<h2>Label quality</h2><ul>{lines}</ul><table><tr><th>what</th><th>share</th><th>95% interval</th>"
        f"<th>pairs</th></tr>{rows}</table><h3>Pairs every scorer calls the other way</h3>"
        f"{''.join(figures) or '<p>none</p>'}"
    )


def _pct(entry: dict) -> str:
    return "-" if entry["share"] is None else f"{entry['share']:.1%}"


def _ci(entry: dict) -> str:
    return f"[{entry['interval'][0]:.3f}, {entry['interval'][1]:.3f}]"
