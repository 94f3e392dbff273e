"""Summaries and reports of an evaluation run: ``summary.json``, ``scores.csv``, ``report.html``, plots.

:func:`summarize_results` turns paired scores (:class:`EvalResults`) into one JSON-able dict with
:mod:`diffusion_dpo.evaluation.stats`; :func:`write_report` writes it and the human-readable files.
The HTML page leads with the answer (one verdict sentence per model and scorer, then the win rates as a
table and an interval plot) and keeps the run's settings in a collapsed section. It is self-contained
apart from the images, which it references by paths relative to the output folder, so the folder can
be copied or served as a whole. Each file is written atomically and ``summary.json`` last, so a run
killed while writing never leaves a truncated summary.

Why one module of ~590 lines: the summary, the console table and the HTML page format the same numbers
with one formatter (:func:`format_number`) and one verdict wording, and the page's sections (verdicts,
win rates, best/worst prompts with every seed, settings in words) are read together when one changes;
the figures already live in :mod:`.plots`.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffusion_dpo.evaluation import stats
from diffusion_dpo.evaluation.plots import (
    plot_category_bars,
    plot_difference_histogram,
    plot_win_rate_intervals,
)
from diffusion_dpo.evaluation.stats import verdict

logger = logging.getLogger(__name__)


@dataclass
class EvalResults:
    """Everything an evaluation produced; model 0 is the baseline.

    ``scores[model][scorer]`` and ``image_paths[model]`` are indexed ``[P, S]`` (prompt, seed).
    """

    models: list[str]
    scorers: list[str]
    prompts: list[str]
    seeds: list[int]
    scores: dict[str, dict[str, np.ndarray]]
    image_paths: dict[str, list[list[Path]]]
    categories: list[str] | None = None
    settings: dict = field(default_factory=dict)
    implicit_accuracy: dict[str, float] | None = None

    def __post_init__(self):
        shape = (len(self.prompts), len(self.seeds))
        for m in self.models:
            for s in self.scorers:
                got = np.shape(self.scores[m][s])
                if got != shape:
                    raise ValueError(
                        f"scores of model {m!r}, scorer {s!r} have shape {got}, expected {shape}"
                    )
        if self.categories is not None and len(self.categories) != len(self.prompts):
            raise ValueError(f"{len(self.categories)} categories for {len(self.prompts)} prompts")

    @property
    def baseline(self) -> str:
        return self.models[0]


def summarize_results(results: EvalResults, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per-model/per-scorer statistics, win rates vs the baseline, per-category breakdown and (with more
    than two models) Bradley–Terry strengths. JSON-able; NaN becomes None when written."""
    base = results.baseline
    others = results.models[1:]
    summary: dict = {
        "baseline": base,
        "models": list(results.models),
        "scorers": list(results.scorers),
        "n_prompts": len(results.prompts),
        "seeds": list(results.seeds),
        "settings": dict(results.settings),
        "scores": {
            m: {s: stats.summarize(results.scores[m][s]) for s in results.scorers} for m in results.models
        },
        "win_rates": {
            m: {
                s: stats.win_rate(
                    results.scores[m][s], results.scores[base][s], n_boot=n_boot, seed=seed
                ).to_dict()
                for s in results.scorers
            }
            for m in others
        },
        "per_category": None,
        "bradley_terry": None,
        "implicit_accuracy": results.implicit_accuracy,
    }
    if results.categories is not None:
        cats = results.categories
        per_cat: dict = {}
        for c in sorted(set(cats)):
            per_cat[c] = {"n_prompts": int(sum(1 for x in cats if x == c)), "scores": {}, "win_rates": {}}
        for m in results.models:
            for s in results.scorers:
                for c, v in stats.summarize_by_category(results.scores[m][s], cats).items():
                    per_cat[c]["scores"].setdefault(m, {})[s] = v
                if m == base:
                    continue
                by = stats.win_rate_by_category(
                    results.scores[m][s], results.scores[base][s], cats, n_boot=n_boot, seed=seed
                )
                for c, wr in by.items():
                    per_cat[c]["win_rates"].setdefault(m, {})[s] = wr.to_dict()
        summary["per_category"] = per_cat
    if len(results.models) > 2:
        bt = {}
        for s in results.scorers:
            wins = stats.pairwise_wins([results.scores[m][s] for m in results.models])
            strengths = stats.fit_bradley_terry(wins, anchor=0)
            bt[s] = {
                m: {"s": float(v), "p_beats_baseline": float(stats.sigmoid(v))}
                for m, v in zip(results.models, strengths)
            }
        summary["bradley_terry"] = bt
    return summary


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), root.resolve())).as_posix()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` via a temp file in the same folder and ``os.replace``: all of it or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_scores_csv(results: EvalResults, path: Path, root: Path) -> None:
    """One row per image: model, prompt_index, prompt, seed, category, image (relative to ``root``),
    then one column per scorer."""
    import io

    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "prompt_index", "prompt", "seed", "category", "image", *results.scorers])
        for m in results.models:
            for p, prompt in enumerate(results.prompts):
                cat = results.categories[p] if results.categories is not None else ""
                for k, seed in enumerate(results.seeds):
                    row = [m, p, prompt, seed, cat, _rel(results.image_paths[m][p][k], root)]
                    writer.writerow(row + [repr(float(results.scores[m][s][p][k])) for s in results.scorers])
        write_text_atomic(path, f.getvalue())


def _pct(x: float) -> str:
    text = f"{100 * x:.0f}%"
    return f"{100 * x:.1f}%" if text == "50%" and x != 0.5 else text  # 50.4% is not 50%


def verdict_sentences(summary: dict) -> list[str]:
    """One sentence per (model, scorer) of ``summary["win_rates"]``, e.g. ``"dpo beats base on
    pickscore: dpo wins 68% of 216 paired images from 24 prompts (95% CI 61%–75%)."``"""
    base = summary["baseline"]
    return [
        f"{m} {verdict(wr)} {base} on {s}: {m} wins {_pct(wr['win_rate'])} of {wr['n']} paired images "
        f"from {wr['n_prompts']} prompts (95% CI {_pct(wr['ci_low'])}–{_pct(wr['ci_high'])})."
        for m, by_scorer in summary["win_rates"].items()
        for s, wr in by_scorer.items()
    ]


def format_number(x, signed: bool = False) -> str:
    """The report's one number format: three decimals (``0.296``, ``+0.030``), ``–`` for a missing or
    non-finite value. A value that rounds to zero but is not zero reads ``<0.001`` rather than ``0.000``
    (or ``5.92e-05`` in another notation), so every number on the page reads the same way."""
    if x is None or not math.isfinite(float(x)):
        return "–"
    x = float(x)
    if x != 0 and abs(x) < 0.0005:
        return ("+" if signed and x > 0 else "-" if x < 0 else "") + "<0.001"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _img(path: Path, root: Path, caption: str, delta: float | None = None) -> str:
    """One image with its caption; ``delta`` (the Δ printed in the caption) is also kept as the
    figure's ``data-delta``, so a test can check that the image shown is the one whose Δ is printed."""
    src = html.escape(urllib.parse.quote(_rel(path, root)))
    data = f' data-delta="{delta!r}"' if delta is not None else ""
    return (
        f'<figure{data}><a href="{src}"><img src="{src}" loading="lazy"></a>'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


_CSS = """
body{font-family:sans-serif;margin:1.5em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}
figure{display:inline-block;margin:1px;vertical-align:top;text-align:center}
figure img{width:72px;height:72px;object-fit:contain;border:1px solid #ddd;image-rendering:pixelated}
figcaption{font-size:9px;max-width:72px}.prompt{font-size:13px;margin:.6em 0 .2em}
.blocks{display:flex;flex-wrap:wrap;gap:4px 24px}.block{flex:0 0 auto}
.row{white-space:nowrap}.who{display:inline-block;width:4em;font-size:11px;vertical-align:middle}
img.plot{max-width:48%;border:1px solid #eee;margin:2px}
ul.verdict{font-size:1.15em;line-height:1.6}ul.settings{line-height:1.5}
p.note{background:#fff6e0;border-left:4px solid #e0a000;padding:.5em 1em}
"""


_NONE_MEANS = {"max_prompts": "all", "resolution": "the model's default"}  # else None reads "none"


def _plain(value, none: str = "none") -> str:
    """A setting in plain words: no JSON quotes, ``none`` for None, lists joined by commas."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items()) or none
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value) or none
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_rows(settings: dict) -> list[tuple[str, str]]:
    """``(name, value)`` rows of the settings table; a dict of dicts (``model_specs``) gets a row per key."""
    rows = []
    for k, v in settings.items():
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            rows += [(f"{k}: {name}", _plain(spec)) for name, spec in v.items()]
        else:
            rows.append((str(k), _plain(v, _NONE_MEANS.get(k, "none"))))
    return rows


def _seed_range(seeds: list) -> str:
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(x) for x in seeds)


def settings_sentences(settings: dict, n_prompts: int, seeds: list) -> list[str]:
    """The run's settings as a few plain sentences (prompts, sampling, scorers, statistics, models),
    then ``key: value`` for any setting they do not cover."""
    st, used = dict(settings), set()

    def get(key, default=None):
        used.add(key)
        return st.get(key, default)

    out = []
    if "prompts" in st:
        limit = get("max_prompts")
        split = get("prompt_split")
        source = f"{get('prompts')}" + (f" (split {split})" if split and split != "train" else "")
        out.append(
            f"Prompts: {n_prompts} distinct prompts from {source}"
            + (f", the first {limit}" if limit else "")
            + f"; {len(seeds)} image{'s' if len(seeds) != 1 else ''} per prompt ({_seed_range(seeds)}), "
            "the same seeds for every model."
        )
        used.add("num_images_per_prompt")
        used.add("seed")
    if "num_inference_steps" in st:
        negative = get("negative_prompt")
        origin = get("sampling_from")
        out.append(
            f"Sampling: {get('num_inference_steps')} steps, guidance scale {_plain(get('guidance_scale'))}, "
            + (
                f"{get('resolution')}×{get('resolution')} pixels"
                if st.get("resolution")
                else "the model's own size"
            )
            + (f", negative prompt “{negative}”" if negative else ", no negative prompt")
            + f", {get('dtype', 'fp32')} weights on {get('device', 'cpu')}, "
            f"{get('batch_size', 1)} images per pipeline call" + (f" ({origin})" if origin else "") + "."
        )
        used.add("resolution")
    if "scorer_specs" in st:
        out.append(
            f"Scorers: {_plain(get('scorer_specs'))}, their backbones in {get('scorer_dtype', 'fp32')}."
        )
    if "n_bootstrap" in st:
        out.append(
            f"Win-rate intervals: 95%, from {get('n_bootstrap')} bootstrap resamples of the prompts "
            "(a prompt's seeds stay together)."
        )
    if get("implicit_pairs"):
        out.append(f"Implicit reward accuracy: on the held-out pairs {st['implicit_pairs']}.")
    for name, spec in (get("model_specs") or {}).items():
        kind = {"lora": f"a LoRA on {spec.get('base')}", "pipeline": "a diffusers pipeline"}.get(
            spec.get("kind"), spec.get("kind") or "a model"
        )
        out.append(f"Model {name}: {spec.get('source')} ({kind}).")
    if get("cache_dir"):
        out.append(f"Images and scores are cached in {st['cache_dir']}: a rerun reuses them.")
    out += [f"{k}: {v}" for k, v in settings_rows({k: v for k, v in st.items() if k not in used})]
    return out


#: Implicit accuracy this far above chance counts as "learned the pairs" for :func:`disagreement_notes`
#: (on 200 held-out pairs the standard error at 0.5 is 0.035).
IMPLICIT_LEARNED = 0.6


def disagreement_notes(summary: dict) -> list[str]:
    """A sentence for each model whose held-out implicit accuracy and win rates disagree: the implicit
    reward prefers held-out winners (accuracy >= :data:`IMPLICIT_LEARNED`) but its images beat the
    baseline on no scorer, or its images win while the accuracy is at or below chance."""
    notes = []
    base = summary["baseline"]
    for m, acc in (summary.get("implicit_accuracy") or {}).items():
        if acc is None or m not in summary["win_rates"]:
            continue
        verdicts = {s: verdict(wr) for s, wr in summary["win_rates"][m].items()}
        beats = [s for s, v in verdicts.items() if v == "beats"]
        if acc >= IMPLICIT_LEARNED and not beats:
            notes.append(
                f"{m}'s implicit reward accuracy is {format_number(acc)}: it ranks the preferred image of a held-out "
                f"pair above the other far more often than chance, but its own images beat {base}'s on no "
                "scorer here. The two measure different things: the accuracy compares denoising errors on "
                "given images; the win rate scores what the model draws from noise with these sampling "
                f"settings. A model can learn to tell its pairs apart before its samples change, so read "
                f"the accuracy as “the training signal was learned”, not as “the images are better”; check "
                "that the steps and guidance are those the models were trained for, then train longer or "
                "on more pairs."
            )
        elif acc <= 0.5 and beats:
            notes.append(
                f"{m}'s images beat {base}'s on {', '.join(beats)}, but its implicit reward accuracy is "
                f"{format_number(acc)}, at or below chance: what improved the images is not what the held-out pairs "
                "prefer (or the pairs are of another distribution than the prompts)."
            )
    return notes


def _image_blocks(results: EvalResults, root: Path, rows: list[tuple[int, str]], model: str | None) -> str:
    """One compact block per prompt ``p`` of ``rows`` (``(p, header)``): a row of images per model, the
    seeds side by side. With ``model``, only the baseline's and ``model``'s rows, and each of
    ``model``'s images is captioned with its Δ vs the baseline's image of the same seed."""
    base = results.baseline
    shown = [base, model] if model else list(results.models)
    e = html.escape
    blocks = []
    for p, header in rows:
        lines = [f"<div class='block'><div class='prompt'>{header}</div>"]
        for m in shown:
            cells = []
            for k, seed in enumerate(results.seeds):
                if model and m == model:
                    deltas = {
                        s: float(results.scores[m][s][p][k] - results.scores[base][s][p][k])
                        for s in results.scorers
                    }
                    caption = f"seed {seed}: " + ", ".join(
                        f"Δ {format_number(d, signed=True)}" for d in deltas.values()
                    )
                    cells.append(
                        _img(results.image_paths[m][p][k], root, caption, next(iter(deltas.values())))
                    )
                else:
                    caption = f"seed {seed}: " + ", ".join(
                        format_number(results.scores[m][s][p][k]) for s in results.scorers
                    )
                    cells.append(_img(results.image_paths[m][p][k], root, caption))
            lines.append(f"<div class='row'><span class='who'>{e(m)}</span>{''.join(cells)}</div>")
        blocks.append("".join(lines) + "</div>")
    return "<div class='blocks'>" + "".join(blocks) + "</div>"


def render_html(
    results: EvalResults,
    summary: dict,
    root: Path,
    plots: list[Path],
    *,
    win_rate_plot: Path | None = None,
    top_k: int = 5,
    max_grid_prompts: int = 16,
) -> str:
    """The HTML report (prompts escaped, image and plot paths relative to ``root``): the verdict, the
    win rates (table and ``win_rate_plot``), the score tables, the settings (collapsed, in sentences),
    the plots and the images: each model's best and worst prompts by the mean Δ over seeds, with every
    seed's pair of images and its own Δ, then the first prompts side by side, seeds in a row.
    Every number has one format (:func:`_num`)."""
    base, others, e = results.baseline, results.models[1:], html.escape
    n_prompts, n_seeds = len(results.prompts), len(results.seeds)
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation: {e(', '.join(results.models))}</title>"
    ]
    out.append(f"<style>{_CSS}</style></head><body><h1>Evaluation</h1>")
    out.append("<h2 id='verdict'>Verdict</h2>")
    if not summary["win_rates"]:
        out.append(f"<p>Only the baseline <b>{e(base)}</b> was evaluated: there is nothing to compare.</p>")
    else:
        items = "".join(f"<li>{e(t)}</li>" for t in verdict_sentences(summary))
        out.append(f"<ul class='verdict'>{items}</ul>")
        out += [f"<p class='note'>{e(t)}</p>" for t in disagreement_notes(summary)]
        out.append(
            f"<p>Every model rendered the same {n_prompts} prompts × {n_seeds} seeds, so "
            f"each (prompt, seed) gives a pair of images, one from the model and one from the baseline "
            f"<b>{e(base)}</b>. The model wins a pair when the scorer rates its image higher; a tie counts ½; "
            "50% means no difference. The interval is a 95% bootstrap interval that resamples prompts: "
            "<i>beats</i> means it lies wholly above 50%, <i>is beaten by</i> wholly below, <i>ties with</i> "
            "that it contains 50% (no difference shown, which is not proof of none). Scorers have different "
            "scales: compare win rates, not raw scores, across scorers.</p>"
        )
    if summary["win_rates"]:
        out.append(
            f"<h2 id='win-rates'>Win rates vs {e(base)}</h2><table><tr><th class='l'>model</th>"
            "<th class='l'>scorer</th><th>win rate</th><th>95% CI</th><th>paired images</th><th>prompts</th>"
            "<th class='l'>verdict</th></tr>"
        )
        for m, by_scorer in summary["win_rates"].items():
            for s, wr in by_scorer.items():
                out.append(
                    f"<tr><td class='l'>{e(m)}</td><td class='l'>{e(s)}</td><td>{format_number(wr['win_rate'])}</td>"
                    f"<td>[{format_number(wr['ci_low'])}, {format_number(wr['ci_high'])}]</td><td>{wr['n']}</td>"
                    f"<td>{wr['n_prompts']}</td><td class='l'>{e(verdict(wr))} {e(base)}</td></tr>"
                )
        out.append("</table>")
        if win_rate_plot is not None:
            out.append(f"<img class='plot' src='{e(urllib.parse.quote(_rel(win_rate_plot, root)))}'>")
    out.append(
        "<h2 id='scores'>Scores</h2><table><tr><th class='l'>model</th><th class='l'>scorer</th>"
        "<th>mean ± sem</th><th>median</th><th>images</th>"
    )
    bt = summary.get("bradley_terry")
    if bt:
        out.append("<th>Bradley–Terry s</th><th>P(beats baseline)</th>")
    out.append("</tr>")
    for m in results.models:
        for s in results.scorers:
            st = summary["scores"][m][s]
            out.append(
                f"<tr><td class='l'>{e(m)}</td><td class='l'>{e(s)}</td>"
                f"<td>{format_number(st['mean'])} ± {format_number(st['sem'])}</td><td>{format_number(st['median'])}</td><td>{st['n']}</td>"
            )
            if bt:
                out.append(
                    f"<td>{format_number(bt[s][m]['s'])}</td><td>{format_number(bt[s][m]['p_beats_baseline'])}</td>"
                )
            out.append("</tr>")
    out.append("</table>")
    if summary.get("implicit_accuracy"):
        out.append(
            "<h2>Implicit reward accuracy on held-out pairs</h2><p>The share of held-out preference pairs "
            f"whose human winner the model's implicit reward prefers, with <b>{e(base)}</b> as the reference "
            "(0.5 is chance).</p><table><tr><th class='l'>model</th><th>accuracy</th></tr>"
        )
        for m, acc in summary["implicit_accuracy"].items():
            out.append(f"<tr><td class='l'>{e(m)}</td><td>{format_number(acc)}</td></tr>")
        out.append("</table>")
    if summary.get("per_category"):
        out.append(
            "<h2>Per category</h2><table><tr><th class='l'>category</th><th>prompts</th>"
            "<th class='l'>model</th><th class='l'>scorer</th><th>mean</th><th>win rate [95% CI]</th></tr>"
        )
        for c, block in summary["per_category"].items():
            for m in results.models:
                for s in results.scorers:
                    wr = block["win_rates"].get(m, {}).get(s)
                    wr_txt = (
                        f"{format_number(wr['win_rate'])} [{format_number(wr['ci_low'])}, {format_number(wr['ci_high'])}]"
                        if wr
                        else "baseline"
                    )
                    out.append(
                        f"<tr><td class='l'>{e(c)}</td><td>{block['n_prompts']}</td><td class='l'>{e(m)}</td>"
                        f"<td class='l'>{e(s)}</td><td>{format_number(block['scores'][m][s]['mean'])}</td><td>{wr_txt}</td></tr>"
                    )
        out.append("</table>")
    out.append("<details id='settings'><summary>Settings of this run</summary><ul class='settings'>")
    out += [f"<li>{e(t)}</li>" for t in settings_sentences(summary["settings"], n_prompts, results.seeds)]
    out.append("</ul></details>")
    if plots:
        out.append("<h2>Plots</h2>")
        out += [f"<img class='plot' src='{e(urllib.parse.quote(_rel(p, root)))}'>" for p in plots]

    for m in others:
        for s in results.scorers:
            diff = np.asarray(results.scores[m][s]) - np.asarray(results.scores[base][s])  # [P, S]
            mean = diff.mean(axis=1)  # [P]
            order = np.argsort(mean, kind="stable")
            k = min(top_k, len(order))
            out.append(f"<h2>{e(m)} vs {e(base)} by {e(s)}: largest gains and losses</h2>")
            out.append(
                f"<p>Prompts ranked by Δ = {e(m)}'s {e(s)} minus {e(base)}'s, averaged over the {n_seeds} seeds; "
                f"each shows every seed, {e(base)} above {e(m)}, and each seed's own Δ under {e(m)}'s image.</p>"
            )
            for label, idx in (("best", order[::-1][:k]), ("worst", order[:k])):
                rows = [
                    (int(p), f"mean Δ {format_number(mean[p], signed=True)} — {e(results.prompts[p])}")
                    for p in idx
                ]
                out.append(f"<h3 id='{label}-{_safe_name(m)}-{_safe_name(s)}'>{label}</h3>")
                out.append(_image_blocks(results, root, rows, model=m))
    n_grid = min(max_grid_prompts, n_prompts)
    out.append(f"<h2>Side by side (first {n_grid} prompts, every seed)</h2>")
    rows = [
        (p, f"<b>{p}</b>"
            + (f" [{e(results.categories[p])}]" if results.categories is not None else "")
            + f": {e(results.prompts[p])}")
        for p in range(n_grid)
    ]  # fmt: skip
    out.append(_image_blocks(results, root, rows, model=None))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(
    results: EvalResults,
    summary: dict,
    output_dir: str | Path,
    *,
    top_k: int = 5,
    max_grid_prompts: int = 16,
) -> dict[str, Path]:
    """Write ``summary.json``, ``scores.csv``, ``plots/*.png`` (with ``plots/win_rates.png``, the interval
    plot, when there is a model to compare) and ``report.html`` into ``output_dir``.

    Returns the paths written, by name (``summary``, ``csv``, ``html``, ``plots`` folder).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    plot_dir = root / "plots"
    plot_dir.mkdir(exist_ok=True)
    plots: list[Path] = []
    base = results.baseline
    for m in results.models[1:]:
        for s in results.scorers:
            path = plot_dir / f"diff_{_safe_name(m)}_{_safe_name(s)}.png"
            diff = np.asarray(results.scores[m][s]) - np.asarray(results.scores[base][s])
            plot_difference_histogram(diff, f"{s}: {m} − {base}", path)
            plots.append(path)
    if summary.get("per_category"):
        for s in results.scorers:
            path = plot_dir / f"category_{_safe_name(s)}.png"
            plot_category_bars(summary["per_category"], results.models, s, path)
            plots.append(path)
    win_rate_plot = None
    if summary["win_rates"]:
        win_rate_plot = plot_dir / "win_rates.png"
        plot_win_rate_intervals(summary["win_rates"], base, win_rate_plot)
    paths = {"summary": root / "summary.json", "csv": root / "scores.csv", "html": root / "report.html"}
    write_scores_csv(results, paths["csv"], root)
    html_text = render_html(
        results,
        summary,
        root,
        plots,
        win_rate_plot=win_rate_plot,
        top_k=top_k,
        max_grid_prompts=max_grid_prompts,
    )
    write_text_atomic(paths["html"], html_text)
    # Last: a summary.json newer than the run's start means every other file is complete.
    write_text_atomic(paths["summary"], json.dumps(_json_safe(summary), indent=2, allow_nan=False))
    paths["plots"] = plot_dir
    logger.info("wrote %s, %s, %s", *(paths[k] for k in ("summary", "csv", "html")))
    return paths
