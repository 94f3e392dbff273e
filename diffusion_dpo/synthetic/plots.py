"""Figures of the synthetic experiment: training curves from ``metrics.jsonl`` and a side-by-side image grid.

Kept small (few pixels, few colours) so they can live in ``docs/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a trainer's ``metrics.jsonl`` (one JSON object per optimizer step)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start): ``[N]`` → ``[N]``."""
    x = np.asarray(values, dtype=np.float64)
    if window <= 1 or x.size == 0:
        return x
    cumsum = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, x.size + 1)
    start = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def reward_margin(row: dict) -> float | None:
    """A step's reward margin: DPO's ``rewards/margins`` (mean β·δ); for KTO the mean reward of
    desirable minus undesirable images; ``None`` for SFT (no reward)."""
    if "rewards/margins" in row:
        return row["rewards/margins"]
    if "rewards/chosen" in row and "rewards/rejected" in row:
        return row["rewards/chosen"] - row["rewards/rejected"]
    return None


def plot_training_curves(runs: dict[str, list[dict]], path: str | Path, smooth: int = 10) -> Path:
    """Three panels over optimizer steps: training loss, reward margin and held-out implicit-reward
    accuracy (``eval/implicit_acc``), one line per run (``{name: metrics rows}``). Loss and margin are
    smoothed with a trailing ``smooth``-step mean; runs without a quantity are left out of its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9.6, 2.8), dpi=72)
    colors = {name: f"C{i}" for i, name in enumerate(runs)}  # one colour per run in every panel
    panels = (
        ("loss", lambda r: r.get("loss"), True),
        ("reward margin", reward_margin, True),
        ("held-out implicit acc.", lambda r: r.get("eval/implicit_acc"), False),
    )
    for ax, (title, getter, smoothed) in zip(axes, panels, strict=True):
        for name, rows in runs.items():
            points = [(r["step"], getter(r)) for r in rows if getter(r) is not None]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            values = moving_average(values, smooth) if smoothed else np.asarray(values)
            marker = None if smoothed else "o"
            ax.plot(steps, values, label=name, color=colors[name], marker=marker, markersize=3, linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[2].axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def comparison_grid(
    rows: dict[str, list], labels: list[str], path: str | Path, scale: int = 2, label_height: int = 22
) -> Path:
    """A grid of images, one row per model (``{name: [PIL images]}``, the same prompt and seed in each
    column), with ``labels`` (one short text per column, two lines at most) above the columns and the
    model names on the left. Images are upscaled ``scale`` times (nearest neighbour: pixels stay
    visible). Written as an optimised PNG."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(rows)
    n_cols = len(labels)
    if not names or any(len(images) != n_cols for images in rows.values()):
        raise ValueError(
            f"every row needs one image per label ({n_cols}); got {[len(v) for v in rows.values()]}"
        )
    size = rows[names[0]][0].size[0] * scale
    font = ImageFont.load_default()
    name_width = 8 + max(
        int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in names
    )
    gap = 2
    width = name_width + n_cols * (size + gap)
    height = label_height + len(names) * (size + gap)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        x = name_width + c * (size + gap)
        for i, line in enumerate(label.split("\n")[:2]):
            draw.text((x + 1, 1 + i * 10), line, fill=(0, 0, 0), font=font)
    for r, name in enumerate(names):
        y = label_height + r * (size + gap)
        draw.text((2, y + size // 2 - 5), name, fill=(0, 0, 0), font=font)
        for c, image in enumerate(rows[name]):
            tile = image.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(tile, (name_width + c * (size + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path
