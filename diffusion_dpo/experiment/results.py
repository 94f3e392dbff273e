"""Collect the synthetic experiment's numbers from ``eval/evaluate.py``'s summary into one table.

The table has the columns of the Diffusion-DPO paper's comparisons (Wallace et al. 2023, arXiv
2311.12908: win rate against the base model, Table 2's implicit-reward accuracy on held-out pairs),
here measured by the ``shapes`` faithfulness scorer instead of people.
"""

from __future__ import annotations

METHODS = ("dpo", "sft", "kto")
_TITLES = {"dpo": "Diffusion-DPO", "sft": "SFT on winners", "kto": "Diffusion-KTO"}


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
