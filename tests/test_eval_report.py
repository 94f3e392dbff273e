"""report.html leads with the verdict: sentences, then the win rates (table and interval plot), then
the score tables, then the settings in plain words inside a collapsed section."""

from __future__ import annotations

import re

import numpy as np
import pytest

from diffusion_dpo.evaluation.report import (
    EvalResults,
    settings_rows,
    summarize_results,
    verdict_sentences,
    write_report,
)
from diffusion_dpo.evaluation.stats import verdict


def _wr(win_rate, ci_low, ci_high, n=216, n_prompts=24):
    return {"win_rate": win_rate, "ci_low": ci_low, "ci_high": ci_high, "n": n, "n_prompts": n_prompts}


def test_verdict_sentences_beats_beaten_and_ties():
    summary = {
        "baseline": "base",
        "win_rates": {
            "dpo": {"pickscore": _wr(0.68, 0.61, 0.75), "aesthetic": _wr(0.32, 0.25, 0.39)},
            "sft": {"pickscore": _wr(0.52, 0.45, 0.59, n=30, n_prompts=10)},
        },
    }
    assert verdict_sentences(summary) == [
        "dpo beats base on pickscore: dpo wins 68% of 216 paired images from 24 prompts (95% CI 61%–75%).",
        "dpo is beaten by base on aesthetic: dpo wins 32% of 216 paired images from 24 prompts "
        "(95% CI 25%–39%).",
        "sft ties with base on pickscore: sft wins 52% of 30 paired images from 10 prompts (95% CI 45%–59%).",
    ]


def test_verdict_is_decided_by_the_interval_not_the_point():
    assert verdict(_wr(0.9, 0.5, 1.0)) == "ties with"  # 0.5 is inside the interval
    assert verdict(_wr(0.1, 0.0, 0.5)) == "ties with"
    assert verdict(_wr(0.52, 0.504, 0.54)) == "beats"
    # a bound that rounds to 50% keeps a decimal, so "beats" never sits next to "50%–…"
    text = verdict_sentences({"baseline": "b", "win_rates": {"m": {"s": _wr(0.52, 0.504, 0.54)}}})[0]
    assert "(95% CI 50.4%–54%)" in text


def test_settings_are_plain_words():
    rows = dict(
        settings_rows(
            {
                "prompt_split": "train",
                "max_prompts": None,
                "negative_prompt": None,
                "guidance_scale": 7.5,
                "scorer_specs": ["pickscore", "hpsv2.1"],
                "model_specs": {"base": {"source": "runwayml/sd15", "kind": "hub", "base": None}},
            }
        )
    )
    assert rows == {
        "prompt_split": "train",
        "max_prompts": "all",
        "negative_prompt": "none",
        "guidance_scale": "7.5",
        "scorer_specs": "pickscore, hpsv2.1",
        "model_specs: base": "source runwayml/sd15, kind hub, base none",
    }


@pytest.fixture
def report(tmp_path):
    from PIL import Image

    img = tmp_path / "img" / "x.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 2))
    results = EvalResults(
        models=["base", "dpo"],
        scorers=["s"],
        prompts=[f"prompt {i}" for i in range(6)],
        seeds=[0, 1],
        # dpo wins every pair by 1 (also checks the histogram of a constant difference, float noise and all)
        scores={"base": {"s": base}, "dpo": {"s": base + 1.0}},
        image_paths={m: [[img, img] for _ in range(6)] for m in ("base", "dpo")},
        settings={"prompts": "p.txt", "prompt_split": "train", "max_prompts": None, "scorer_specs": ["s"]},
    )
    summary = summarize_results(results, n_boot=200)
    paths = write_report(results, summary, tmp_path / "out")
    return paths, paths["html"].read_text()


def test_report_sections_in_order_and_settings_collapsed(report):
    paths, page = report
    verdict_at = page.index("dpo beats base on s: dpo wins 100% of 12 paired images from 6 prompts")
    positions = [
        verdict_at,
        page.index("<h2 id='win-rates'>"),
        page.index("plots/win_rates.png"),
        page.index("<h2 id='scores'>"),
        page.index("<details id='settings'>"),
        page.index("<h2>Plots</h2>"),
    ]
    assert positions == sorted(positions)
    assert (paths["plots"] / "win_rates.png").read_bytes().startswith(b"\x89PNG")
    settings = re.search(r"<details id='settings'>(.*?)</details>", page, re.S).group(1)
    assert "<summary>" in settings and " open" not in page[page.index("<details") : page.index("<summary>")]
    assert "&quot;" not in settings and '"' not in settings and "null" not in settings
    assert "<td class='l'>train</td>" in settings and "<td class='l'>all</td>" in settings
