"""report.html leads with the verdict: sentences, then the win rates (table and interval plot), then
the score tables, then the settings in plain words inside a collapsed section."""

from __future__ import annotations

import re

import numpy as np
import pytest

from diffusion_dpo.evaluation.report import (
    EvalResults,
    disagreement_notes,
    format_number,
    settings_rows,
    settings_sentences,
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
    # the report's settings section: sentences, every setting of eval/evaluate.py's record in one
    settings = {
        "prompts": "shapes:heldout", "prompt_split": "train", "max_prompts": None,
        "num_images_per_prompt": 4, "seed": 0, "num_inference_steps": 20, "guidance_scale": 3.0,
        "sampling_from": "num_inference_steps 20 as dpo recorded", "resolution": None,
        "negative_prompt": None, "dtype": "fp32", "device": "cpu", "batch_size": 4,
        "scorer_specs": ["shapes"], "scorer_dtype": "fp32", "n_bootstrap": 2000, "implicit_pairs": None,
        "cache_dir": "out/images",
        "model_specs": {"base": {"source": "b", "kind": "pipeline", "base": None},
                        "dpo": {"source": "o", "kind": "lora", "base": "b"}},
    }  # fmt: skip
    assert settings_sentences(settings, 24, [0, 1, 2, 3]) == [
        "Prompts: 24 distinct prompts from shapes:heldout; 4 images per prompt (seeds 0–3), the same seeds "
        "for every model.",
        "Sampling: 20 steps, guidance scale 3, the model's own size, no negative prompt, fp32 weights on "
        "cpu, 4 images per pipeline call (num_inference_steps 20 as dpo recorded).",
        "Scorers: shapes, their backbones in fp32.",
        "Win-rate intervals: 95%, from 2000 bootstrap resamples of the prompts (a prompt's seeds stay "
        "together).",
        "Model base: b (a diffusers pipeline).",
        "Model dpo: o (a LoRA on b).",
        "Images and scores are cached in out/images: a rerun reuses them.",
    ]
    # a setting the sentences do not cover is still shown
    assert settings_sentences({"something_new": 3}, 1, [0]) == ["something_new: 3"]


def test_one_number_format():
    assert [format_number(x) for x in (0.02956, 5.92e-05, 21.5, -0.25, None, float("nan"), 0.0)] == [
        "0.030", "<0.001", "21.500", "-0.250", "–", "–", "0.000",
    ]  # fmt: skip
    assert [format_number(x, signed=True) for x in (0.0296, -0.0004, 3e-5)] == [
        "+0.030",
        "-<0.001",
        "+<0.001",
    ]


def test_disagreement_between_implicit_accuracy_and_win_rate_is_explained():
    summary = {
        "baseline": "base",
        "win_rates": {"dpo": {"shapes": _wr(0.32, 0.19, 0.47)}, "sft": {"shapes": _wr(0.7, 0.6, 0.8)}},
        "implicit_accuracy": {"dpo": 0.799, "sft": 0.48},
    }
    notes = disagreement_notes(summary)
    assert len(notes) == 2
    assert (
        notes[0].startswith("dpo's implicit reward accuracy is 0.799")
        and "beat base's on no scorer" in notes[0]
    )
    assert notes[1].startswith("sft's images beat base's on shapes") and "0.480" in notes[1]
    # agreement: no note
    agree = {**summary, "implicit_accuracy": {"dpo": 0.52, "sft": 0.7}}
    assert disagreement_notes(agree) == []


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
    assert "<li>Prompts: 6 distinct prompts from p.txt; 2 images per prompt (seeds 0, 1)" in settings


def test_best_and_worst_pairs_show_the_images_whose_delta_is_printed(tmp_path):
    """Each best/worst prompt shows every seed's pair of images, and the Δ printed under a model's image
    is that image's score minus the baseline's image of the same prompt and seed; the prompt's printed
    mean Δ is the mean of those. Every image file is distinct, so a wrong pairing shows."""
    from PIL import Image

    n_prompts, seeds = 5, [0, 1, 2]
    paths = {}
    for m in ("base", "dpo"):
        paths[m] = []
        for p in range(n_prompts):
            row = []
            for k in seeds:
                path = tmp_path / "img" / f"{m}_{p}_{k}.png"
                path.parent.mkdir(exist_ok=True)
                Image.new("RGB", (8, 8), (p * 40, k * 80, 0)).save(path)
                row.append(path)
            paths[m].append(row)
    rng = np.random.default_rng(1)
    base = rng.uniform(size=(n_prompts, len(seeds)))
    dpo = base + rng.normal(scale=0.3, size=base.shape)  # seeds of a prompt differ in sign and size
    results = EvalResults(
        models=["base", "dpo"], scorers=["s"], prompts=[f"prompt {i}" for i in range(n_prompts)], seeds=seeds,
        scores={"base": {"s": base}, "dpo": {"s": dpo}}, image_paths=paths,
    )  # fmt: skip
    page = write_report(results, summarize_results(results, n_boot=50), tmp_path / "out", top_k=2)[
        "html"
    ].read_text()
    best = page[page.index("<h3 id='best-dpo-s'>") : page.index("<h3 id='worst-dpo-s'>")]
    worst = page[page.index("<h3 id='worst-dpo-s'>") : page.index("<h2>Side by side")]
    mean = (dpo - base).mean(axis=1)
    for section, expect in ((best, np.argsort(mean)[::-1][:2]), (worst, np.argsort(mean)[:2])):
        blocks = section.split("<div class='block'>")[1:]
        assert len(blocks) == 2
        for block, p in zip(blocks, expect):
            assert f"mean Δ {mean[p]:+.3f} — prompt {p}" in block
            shown = re.findall(
                r'<figure(?: data-delta="([^"]+)")?><a href="[^"]*?(\w+)_(\d)_(\d)\.png"', block
            )
            # every seed, the baseline's row then the model's, all of this prompt
            assert [(m, int(q), int(k)) for _, m, q, k in shown] == [
                (m, p, k) for m in ("base", "dpo") for k in seeds
            ]
            for delta, m, _, k in shown:
                if m == "dpo":
                    assert float(delta) == pytest.approx(dpo[p, int(k)] - base[p, int(k)])
                    assert f"seed {k}: Δ {dpo[p, int(k)] - base[p, int(k)]:+.3f}" in block
