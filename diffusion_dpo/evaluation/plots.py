"""The evaluation report's figures (PNG, matplotlib without pyplot): per-image score differences, win
rates per prompt category, and each model's win-rate interval against the baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffusion_dpo.evaluation.stats import verdict


def _figure(width: float = 5.0, height: float = 3.2):
    # Figure without pyplot: no global backend state, no display needed (the Agg canvas is used).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_difference_histogram(diff: np.ndarray, title: str, path: Path) -> None:
    """Histogram of per-image score differences (model − baseline), with a line at 0."""
    d = np.ravel(diff)
    bins = min(40, max(5, d.size // 2))
    if np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(d).max())):
        bins = 1  # (near-)constant differences: numpy cannot split a float-noise range into bins
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(d, bins=bins, color="#4477aa")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("score difference vs baseline (same prompt and seed)")
    ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_category_bars(per_category: dict, models: list[str], scorer: str, path: Path) -> None:
    """Grouped bars per category: win rate vs baseline with its interval (or mean score, one model)."""
    cats = list(per_category)
    others = models[1:]
    fig = _figure(max(5.0, 0.6 * len(cats) * max(1, len(others)) + 2), 3.5)
    ax = fig.add_subplot()
    x = np.arange(len(cats))
    if others:
        width = 0.8 / len(others)
        for i, m in enumerate(others):
            wr = [per_category[c]["win_rates"][m][scorer] for c in cats]
            y = np.array([w["win_rate"] for w in wr])
            err = np.array(
                [[w["win_rate"] - w["ci_low"] for w in wr], [w["ci_high"] - w["win_rate"] for w in wr]]
            )
            ax.bar(x + i * width - 0.4 + width / 2, y, width, yerr=err, capsize=2, label=m)
        ax.axhline(0.5, color="black", linewidth=1, linestyle="--")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"win rate vs {models[0]}")
        ax.legend(fontsize=7)
    else:
        y = [per_category[c]["scores"][models[0]][scorer]["mean"] for c in cats]
        ax.bar(x, y, 0.6)
        ax.set_ylabel(f"mean {scorer}")
    ax.set_xticks(x, cats, rotation=45, ha="right", fontsize=7)
    ax.set_title(scorer, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_win_rate_intervals(win_rates: dict, baseline: str, path: Path) -> None:
    """One row per (model, scorer): the win rate vs the baseline with its 95% interval, and the 0.5 line."""
    rows = [(f"{m} · {s}", wr) for m, by in win_rates.items() for s, wr in by.items()][::-1]  # top down
    colours = {"beats": "#228833", "is beaten by": "#cc3311", "ties with": "#777777"}
    fig = _figure(6.0, 1.0 + 0.35 * len(rows))
    ax = fig.add_subplot()
    for y, (_, wr) in enumerate(rows):
        low, high = wr["win_rate"] - wr["ci_low"], wr["ci_high"] - wr["win_rate"]
        ax.errorbar(wr["win_rate"], y, xerr=[[low], [high]], fmt="o", capsize=3, color=colours[verdict(wr)])
    ax.axvline(0.5, color="black", linewidth=1, linestyle="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_xlabel(f"win rate vs {baseline} (95% CI over prompts; ties ½)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
