"""data/iterative_dpo.py: rounds of mine → train → evaluate, each from the round before, and the table
that shows the mining scorer beside the held-out one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def driver():
    return _load("iterative_dpo", REPO / "data" / "iterative_dpo.py")


def _wr(rate, lo, hi):
    return {"win_rate": rate, "ci_low": lo, "ci_high": hi, "n": 10, "n_prompts": 5}


def test_table_puts_the_mining_scorer_beside_the_heldout_one(driver):
    summary = {
        "models": ["round_0", "round_1", "round_2"],
        "scores": {
            "round_0": {"proxy": {"mean": 0.2}, "truth": {"mean": 0.5}},
            "round_1": {"proxy": {"mean": 0.4}, "truth": {"mean": 0.45}},
            "round_2": {"proxy": {"mean": 0.6}, "truth": {"mean": 0.3}},
        },
        "win_rates": {
            "round_1": {"proxy": _wr(0.7, 0.6, 0.8), "truth": _wr(0.45, 0.4, 0.5)},
            "round_2": {"proxy": _wr(0.9, 0.85, 0.95), "truth": _wr(0.3, 0.2, 0.4)},
        },
    }
    mined = {
        "round_1": {"num_pairs": 96, "mean_chosen_score": 0.5, "mean_rejected_score": 0.2},
        "round_2": {"num_pairs": 90, "mean_chosen_score": 0.8, "mean_rejected_score": 0.4},
    }
    vs_previous = {"round_1": summary["win_rates"]["round_1"], "round_2": {"proxy": _wr(0.8, 0.7, 0.9)}}
    rows = driver.table_rows(summary, mined, ["proxy", "truth"], vs_previous)
    assert [r["model"] for r in rows] == ["round_0", "round_1", "round_2"]
    assert rows[0]["pairs"] is None and rows[2]["pairs"] == 90
    assert rows[2]["mined_margin"] == pytest.approx(0.4)
    assert rows[2]["scores"]["truth"]["win_rate_vs_previous"] is None  # not compared: shown as "-"

    table = driver.format_table(rows, mining=["proxy"], heldout=["truth"]).splitlines()
    assert "proxy (mining) mean" in table[0] and "truth (held-out) mean" in table[0]
    assert table[0].index("proxy (mining)") < table[0].index("truth (held-out)")
    cells = [c.strip() for c in table[4].strip("|").split("|")]
    assert cells == [
        "round_2", "90", "0.400", "0.600", "0.900 [0.850, 0.950]", "0.800 [0.700, 0.900]", "0.300",
        "0.300 [0.200, 0.400]", "-",
    ]  # fmt: skip
    # one scorer both mining and held out: one set of columns
    one = driver.format_table(rows, mining=["proxy"], heldout=["proxy"]).splitlines()[0]
    assert one.count("proxy") == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--num_images_per_prompt", "1"], "a pair needs two images"),
        (["--train_arg", "beta_dpo"], "expected KEY=VALUE"),
        (["--train_arg", "output_dir=/tmp/x"], "the driver sets it"),
        (["--train_config", "/no/such.yaml"], "no such file"),
        (["--model", "no_such_folder"], "no such folder"),
        (["--prompts", "/no/such/prompts.txt"], "no such file"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(driver, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        driver.main(flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_round_seeds_never_repeat_or_meet_the_evaluation_seeds(driver):
    k = 64  # images per prompt: round r mines seeds mining_seed(r) .. + k - 1
    ranges = [set(range(driver.mining_seed(0, r), driver.mining_seed(0, r) + k)) for r in range(1, 6)]
    evaluation = set(range(driver.evaluation_seed(0), driver.evaluation_seed(0) + k))
    for i, a in enumerate(ranges):
        assert not a & evaluation
        for b in ranges[i + 1 :]:
            assert not a & b


def test_two_rounds_chain_models_and_a_rerun_reuses_them(driver, tiny_sd_path, tmp_path, capsys):
    """Two short rounds on the tiny model: round 2 mines from and trains on top of round 1's output,
    the table has every model with both scorers, and a rerun trains and samples nothing again."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    config = tmp_path / "train.yaml"  # the shipped config, minus its end-of-run sampling
    config.write_text(
        "\n".join(line for line in (REPO / "configs/iterative_dpo.yaml").read_text().splitlines()
                  if not line.startswith(("validation_prompts", "  - ")))
    )  # fmt: skip
    out = tmp_path / "study"
    argv = [
        "--model", str(tiny_sd_path), "--prompts", str(prompts), "--heldout_prompts", str(prompts),
        "--mining_scorer", "shapes_color_area", "--heldout_scorer", "shapes", "--rounds", "2",
        "--num_images_per_prompt", "3", "--pairing", "best_worst", "--min_margin", "0",
        "--train_config", str(config),
        "--train_arg", "max_train_steps=2", "--train_arg", "train_batch_size=1", "--train_arg", "lr_warmup_steps=0",
        "--num_inference_steps", "2", "--eval_images_per_prompt", "2", "--batch_size", "8",
        "--device", "cpu", "--output_dir", str(out),
    ]  # fmt: skip
    results = driver.main(argv)
    assert [r["model"] for r in results["table"]] == ["round_0", "round_1", "round_2"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    # round 2 started from round 1: its training config names round 1's output as the model
    trained = (out / "round_2" / "model" / "training_config.yaml").read_text()
    assert str(out / "round_1" / "model") in trained
    mined = json.loads((out / "round_2" / "pairs" / "mining.json").read_text())
    assert str(out / "round_1" / "model") in json.dumps(mined)
    for row in results["table"][1:]:
        assert row["pairs"] == 2  # best vs worst, one per prompt
        assert set(row["scores"]) == {"shapes_color_area", "shapes"}
        assert row["scores"]["shapes"]["win_rate_vs_base"] is not None
        assert row["scores"]["shapes"]["win_rate_vs_previous"] is not None
    written = (out / "results.md").read_text()
    assert "shapes_color_area (mining) mean" in written and "shapes (held-out) mean" in written

    # each round sampled its own images to mine (2 prompts x 3) and scored them
    assert [r["mining"]["images_generated"] for r in results["rounds"]] == [6, 6]
    assert all(r["mining"]["scores_computed"] > 0 for r in results["rounds"])

    stamp = (out / "round_2" / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = driver.main(argv)
    printed = capsys.readouterr().out
    assert (
        "reusing the trained model of round 1" in printed
        and "reusing the trained model of round 2" in printed
    )
    # nothing sampled or scored again: mining reports 0 of 6 generated in both rounds, and each
    # evaluation (every model vs round 0, round 2 vs round 1) generated 0 images for every model
    assert [(r["mining"]["images_generated"], r["mining"]["scores_computed"]) for r in again["rounds"]] == [
        (0, 0),
        (0, 0),
    ]
    assert printed.count("images: 0 generated now, 6 cached; scores: 0 computed now") == 2, printed
    for folder in ("eval", "eval_round_2_vs_1"):
        generation = json.loads((out / folder / "summary.json").read_text())["generation"]
        assert generation and all(g["generated"] == 0 for g in generation.values()), (folder, generation)
    assert (
        out / "round_2" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    ).stat().st_mtime_ns == stamp
    assert again["table"] == json.loads(json.dumps(results["table"]))


def test_a_round_without_pairs_stops_with_what_to_change(driver, tiny_sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    argv = [
        "--model", str(tiny_sd_path), "--prompts", str(prompts), "--heldout_prompts", str(prompts),
        "--num_images_per_prompt", "2", "--min_margin", "2",  # scores are in [0, 1]: no pair can qualify
        "--num_inference_steps", "2", "--device", "cpu", "--output_dir", str(tmp_path / "study"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="round 1 mined no pairs.*lower --min_margin"):
        driver.main(argv)
    assert not (tmp_path / "study" / "round_1" / "model").exists()  # nothing trained on nothing


def test_lora_rounds_continue_from_the_fused_model(driver, tiny_sd_path, tmp_path):
    """A LoRA round's adapters are fused into its model and saved as a pipeline; the next round trains
    from it (and so is referenced against it), not from the base again."""
    import torch
    from diffusers import UNet2DConditionModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    config = tmp_path / "train.yaml"
    config.write_text(
        "\n".join(line for line in (REPO / "configs/iterative_dpo.yaml").read_text().splitlines()
                  if not line.startswith(("validation_prompts", "  - ")))
    )  # fmt: skip
    out = tmp_path / "study"
    driver.main([
        "--model", str(tiny_sd_path), "--prompts", str(prompts), "--heldout_prompts", str(prompts),
        "--rounds", "2", "--num_images_per_prompt", "2", "--pairing", "best_worst", "--min_margin", "0",
        "--train_config", str(config), "--train_arg", "use_lora=true", "--train_arg", "max_train_steps=2",
        "--train_arg", "train_batch_size=1", "--train_arg", "lr_warmup_steps=0", "--train_arg", "learning_rate=1e-2",
        "--num_inference_steps", "2", "--eval_images_per_prompt", "1", "--device", "cpu", "--output_dir", str(out),
    ])  # fmt: skip
    merged = out / "round_1" / "model" / "merged"
    assert (merged / "model_index.json").is_file()
    assert str(merged) in (out / "round_2" / "model" / "training_config.yaml").read_text()
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").state_dict()
    fused = UNet2DConditionModel.from_pretrained(merged, subfolder="unet").state_dict()
    assert set(base) == set(fused)  # a plain UNet: the adapters are folded into its weights
    assert any(not torch.equal(base[k], fused[k]) for k in base)  # and they changed it
