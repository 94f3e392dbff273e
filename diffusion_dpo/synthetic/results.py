"""Collect the synthetic experiment's numbers from ``eval/evaluate.py``'s summary into one table.

The table has the columns of the Diffusion-DPO paper's comparisons (Wallace et al. 2023, arXiv
2311.12908: win rate against the base model, Table 2's implicit-reward accuracy on held-out pairs),
here measured by the ``shapes`` faithfulness scorer instead of people.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import numpy as np

METHODS = ("dpo", "sft", "kto")
_TITLES = {
    "dpo": "Diffusion-DPO",
    "sft": "SFT on winners",
    "kto": "Diffusion-KTO",
    "ipo": "IPO",
    "mapo": "MaPO (no reference)",
}


def method_results(summary: dict, methods=METHODS, scorer: str = "shapes") -> dict:
    """``{method: {win_rate, ci_low, ci_high, n, n_prompts, mean_score, implicit_accuracy}}`` and
    ``{"base": {"mean_score"}}`` from an evaluation summary whose baseline is the base model.

    Raises ``ValueError`` naming what the summary lacks (a model, the scorer, the implicit accuracy).
    """
    missing = [m for m in ("base", *methods) if m not in summary.get("models", [])]
    if missing:
        raise ValueError(f"evaluation summary lacks models {missing}; it has {summary.get('models')}")
    if scorer not in summary.get("scorers", []):
        raise ValueError(f"evaluation summary lacks scorer {scorer!r}; it has {summary.get('scorers')}")
    if summary.get("baseline") != "base":
        raise ValueError(f"the evaluation baseline must be 'base', got {summary.get('baseline')!r}")
    implicit = summary.get("implicit_accuracy") or {}
    out: dict = {"base": {"mean_score": summary["scores"]["base"][scorer]["mean"]}}
    for m in methods:
        wr = summary["win_rates"][m][scorer]
        out[m] = {
            "win_rate": wr["win_rate"],
            "ci_low": wr["ci_low"],
            "ci_high": wr["ci_high"],
            "n": wr["n"],
            "n_prompts": wr["n_prompts"],
            "mean_score": summary["scores"][m][scorer]["mean"],
            "implicit_accuracy": implicit.get(m),
        }
    return out


def markdown_table(results: dict, methods=METHODS) -> str:
    """A markdown table: one row per method with its win rate vs the base [95% CI], mean faithfulness,
    held-out implicit-reward accuracy and training time; a first row for the base itself."""
    lines = [
        "| model | win rate vs base [95% CI] | mean faithfulness | implicit acc. (held-out pairs) | train time |",
        "|---|---|---|---|---|",
    ]

    def seconds(value) -> str:
        return "–" if value is None else f"{value:.0f} s"

    base = results["base"]
    lines.append(
        f"| base (pretrained, noisy captions) | – | {base['mean_score']:.3f} | – | {seconds(base.get('seconds'))} |"
    )
    for m in methods:
        r = results[m]
        acc = "–" if r.get("implicit_accuracy") is None else f"{r['implicit_accuracy']:.3f}"
        lines.append(
            f"| {_TITLES.get(m, m)} | {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
            f"| {r['mean_score']:.3f} | {acc} | {seconds(r.get('seconds'))} |"
        )
    return "\n".join(lines)


def _scores(scores_csv: Path, model: str, scorer: str) -> np.ndarray:
    """``[P, S]`` scores of ``model`` from an evaluation's ``scores.csv`` (prompt x seed)."""
    cells: dict[tuple[int, int], float] = {}
    with Path(scores_csv).open() as f:
        for row in csv.DictReader(f):
            if row["model"] == model:
                cells[(int(row["prompt_index"]), int(row["seed"]))] = float(row[scorer])
    if not cells:
        raise ValueError(f"{scores_csv} has no scores of model {model!r}")
    prompts = sorted({p for p, _ in cells})
    seeds = sorted({s for _, s in cells})
    return np.array([[cells[(p, s)] for s in seeds] for p in prompts])


def head_to_head(scores_csv: Path, candidate: str, opponent: str, scorer: str = "shapes") -> dict:
    """Paired win rate of ``candidate`` against ``opponent`` on the same (prompt, seed) images, ties ½,
    with the evaluation's cluster-bootstrap interval over prompts."""
    from diffusion_dpo.evaluation.stats import win_rate

    return win_rate(_scores(scores_csv, candidate, scorer), _scores(scores_csv, opponent, scorer)).to_dict()


def pooled_head_to_head(
    scores_csvs: list[Path], candidate: str, opponent: str, scorer: str = "shapes"
) -> dict:
    """:func:`head_to_head` over several runs (seeds) at once: each (run, prompt) is one cluster of the
    bootstrap, so the interval reflects prompts; the runs' spread is reported apart."""
    from diffusion_dpo.evaluation.stats import win_rate

    a = np.concatenate([_scores(path, candidate, scorer) for path in scores_csvs])
    b = np.concatenate([_scores(path, opponent, scorer) for path in scores_csvs])
    return win_rate(a, b).to_dict()


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "per_seed": values,
    }


def aggregate_seeds(records: dict, methods, scores_csvs: dict | None = None) -> dict:
    """Per method, the spread over seeds of its win rate against the base, mean score and implicit
    accuracy (``{"mean", "sd", "min", "max", "per_seed"}``), and each seed's interval; DPO against SFT
    likewise, plus pooled over seeds when the evaluations' ``scores.csv`` are given."""
    seeds = list(records)
    out: dict = {"seeds": seeds, "methods": {}}
    for m in methods:
        rows = [records[s][m] for s in seeds]
        entry = {
            "win_rate": _spread([r["win_rate"] for r in rows]),
            "intervals": [[r["ci_low"], r["ci_high"]] for r in rows],
            "mean_score": _spread([r["mean_score"] for r in rows]),
        }
        if all(r.get("implicit_accuracy") is not None for r in rows):
            entry["implicit_accuracy"] = _spread([r["implicit_accuracy"] for r in rows])
        out["methods"][m] = entry
    out["base"] = {"mean_score": _spread([records[s]["base"]["mean_score"] for s in seeds])}
    if all("dpo_vs_sft" in records[s] for s in seeds):
        rows = [records[s]["dpo_vs_sft"] for s in seeds]
        out["dpo_vs_sft"] = {
            "win_rate": _spread([r["win_rate"] for r in rows]),
            "intervals": [[r["ci_low"], r["ci_high"]] for r in rows],
        }
        if scores_csvs:
            out["dpo_vs_sft"]["pooled"] = pooled_head_to_head([scores_csvs[s] for s in seeds], "dpo", "sft")
    return out


def seeds_markdown(record: dict, methods) -> str:
    """The table of a multi-seed study: per method the mean win rate against the base ± the standard
    deviation over seeds, each seed's win rate [95% CI], the mean faithfulness and implicit accuracy;
    then DPO against SFT head to head."""
    seeds = record["seeds"]
    lines = [
        f"| model | win rate vs base, mean ± sd over {len(seeds)} seeds | per seed [95% CI] | mean faithfulness | implicit acc. |",
        "|---|---|---|---|---|",
    ]
    base = record["base"]["mean_score"]
    lines.append(f"| base | – | – | {base['mean']:.3f} ± {base['sd']:.3f} | – |")
    for m in methods:
        r = record["methods"][m]
        per_seed = ", ".join(
            f"{w:.3f} [{lo:.3f}, {hi:.3f}]"
            for w, (lo, hi) in zip(r["win_rate"]["per_seed"], r["intervals"], strict=True)
        )
        acc = r.get("implicit_accuracy")
        acc_text = "–" if acc is None else f"{acc['mean']:.3f} ± {acc['sd']:.3f}"
        lines.append(
            f"| {_TITLES.get(m, m)} | {r['win_rate']['mean']:.3f} ± {r['win_rate']['sd']:.3f} | {per_seed} "
            f"| {r['mean_score']['mean']:.3f} ± {r['mean_score']['sd']:.3f} | {acc_text} |"
        )
    if "dpo_vs_sft" in record:
        h = record["dpo_vs_sft"]
        per_seed = ", ".join(
            f"{w:.3f} [{lo:.3f}, {hi:.3f}]"
            for w, (lo, hi) in zip(h["win_rate"]["per_seed"], h["intervals"], strict=True)
        )
        pooled = h.get("pooled")
        pooled_text = (
            f"; pooled over seeds {pooled['win_rate']:.3f} [{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}] "
            f"({pooled['n']} images)"
            if pooled
            else ""
        )
        lines.append("")
        lines.append(
            f"Diffusion-DPO against SFT on winners, head to head on the same held-out (prompt, seed) images: "
            f"{h['win_rate']['mean']:.3f} ± {h['win_rate']['sd']:.3f} over seeds ({per_seed}){pooled_text}."
        )
    return "\n".join(lines)


#: The factors of the shapes scorer reported per model (synthetic.faithfulness_terms)
ATTRIBUTES = ("color", "shape", "background", "presence")


def attribute_scores(eval_dir: Path, models) -> dict[str, dict[str, float]]:
    """Per model, the mean of each factor of the faithfulness score over its evaluation images
    (:data:`ATTRIBUTES`), and ``all_right``: the share of images whose colour, shape and background
    terms all exceed 0.5. Shows *what* a method fixes or copies, which one faithfulness number hides."""
    from PIL import Image

    from diffusion_dpo import synthetic

    sums: dict[str, dict[str, float]] = {m: dict.fromkeys((*ATTRIBUTES, "all_right"), 0.0) for m in models}
    counts = dict.fromkeys(models, 0)
    with (Path(eval_dir) / "scores.csv").open() as f:
        for row in csv.DictReader(f):
            if row["model"] not in sums:
                continue
            with Image.open(Path(eval_dir) / row["image"]) as image:
                terms = synthetic.faithfulness_terms(image.convert("RGB"), row["prompt"])
            for key in ATTRIBUTES:
                sums[row["model"]][key] += terms[key]
            sums[row["model"]]["all_right"] += float(
                all(terms[k] > 0.5 for k in ("color", "shape", "background"))
            )
            counts[row["model"]] += 1
    missing = [m for m in models if counts[m] == 0]
    if missing:
        raise ValueError(f"{eval_dir}/scores.csv has no images of {missing}")
    return {m: {k: v / counts[m] for k, v in sums[m].items()} for m in models}


def attributes_markdown(per_seed: dict, models) -> str:
    """A table of :func:`attribute_scores` averaged over seeds (``{seed: {model: {...}}}``)."""
    seeds = list(per_seed)
    lines = [
        "| model | colour | shape | background | presence | all three right |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        mean = {k: statistics.fmean(per_seed[s][m][k] for s in seeds) for k in (*ATTRIBUTES, "all_right")}
        title = "base" if m == "base" else _TITLES.get(m, m)
        lines.append(
            f"| {title} | {mean['color']:.3f} | {mean['shape']:.3f} | {mean['background']:.3f} "
            f"| {mean['presence']:.3f} | {mean['all_right']:.3f} |"
        )
    return "\n".join(lines)
