"""--validation_scorer (docs/monitors.md): every --validation_steps the held-out prompts are sampled
from the policy and the reference with the same seeds, scored, and their win rate logged with its
95% interval; a win rate significantly below 0.5 warns once and counts for --stop_on_degradation.

Why these can fail: a win rate of the wrong side (reference over policy), an interval that does not
resample prompts, sampling that draws from the training's RNG stream (the run with the win rate would
train differently from the run without), a reference that is not the frozen model (or LoRA's base),
a reference cache lost on resume, a threshold on the wrong end of the interval.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.training import win_rate as win_rate_module
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.loop import train
from diffusion_dpo.training.monitors import MonitorAlarms
from diffusion_dpo.training.summary import describe_run

UNET = "unet/diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("win_rate_data")
    train_pairs = synthetic.write_pair_dataset(folder / "pairs.parquet", 16, seed=0, tie_fraction=0.0)
    # 6 held-out pairs: their captions (synthetic shapes captions, which the shapes scorer reads) are
    # the prompts the win rate samples
    heldout = synthetic.write_pair_dataset(
        folder / "heldout.parquet", 6, seed=1, tie_fraction=0.0, heldout=True
    )
    return train_pairs, heldout


def _flags(model, data, out, **overrides):
    train_pairs, heldout = data
    values = dict(
        validation_dataset_name=heldout, num_validation_pairs=6, validation_steps=2,
        validation_timesteps=[300, 700], num_inference_steps=2, max_train_steps=4, learning_rate=1e-2,
    )  # fmt: skip
    return tiny_run_flags(model, train_pairs, out, **{**values, **overrides})


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class _Stub:
    """A test double of a scorer: ``scores(call)`` gives the scores of its ``call``-th batch of images."""

    name = "stub"

    def __init__(self, scores):
        self.calls, self.scores = 0, scores

    def __call__(self, images, prompts):
        self.calls += 1
        return torch.full((len(images),), float(self.scores(self.calls)))


def _with_scorer(monkeypatch, stub):
    monkeypatch.setattr(win_rate_module, "load_scorer", lambda spec, device: stub)


# ---- the statistic, by hand ----------------------------------------------------------------------


def test_win_rate_and_interval_by_hand():
    """Policy vs reference on 3 prompts x 2 seeds: prompt 0 wins both (1), prompt 1 ties one and loses
    one (0.25), prompt 2 loses both (0): win rate (1 + 0.25 + 0)/3 = 0.41667. The interval resamples
    prompts: a resample of three copies of prompt 2 (probability 1/27 = 3.7% > 2.5%) gives 0, of
    prompt 0 gives 1, so the 95% interval is [0, 1]; scores that are all equal tie: 0.5 [0.5, 0.5]."""
    policy = np.array([[2.0, 3.0], [1.0, 1.0], [0.0, 0.0]])
    reference = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 1.0]])
    result = win_rate_module.win_rate(policy, reference)
    assert result.win_rate == pytest.approx(1.25 / 3)
    assert (result.ci_low, result.ci_high) == (0.0, 1.0)
    tie = win_rate_module.win_rate(reference, reference)
    assert (tie.win_rate, tie.ci_low, tie.ci_high) == (0.5, 0.5, 0.5)


def test_a_win_rate_significantly_below_half_warns_once():
    alarms = MonitorAlarms()
    alarms.observe(2, {"step": 2, "eval/win_rate": 0.5, "eval/win_rate_ci_high": 0.5})  # ties: quiet
    alarms.observe(4, {"step": 4, "eval/win_rate": 0.3, "eval/win_rate_ci_high": 0.55})  # not significant
    assert alarms.warnings == []
    alarms.observe(6, {"step": 6, "eval/win_rate": 0.2, "eval/win_rate_ci_high": 0.4})
    alarms.observe(8, {"step": 8, "eval/win_rate": 0.1, "eval/win_rate_ci_high": 0.3})
    assert [(w["monitor"], w["step"]) for w in alarms.warnings] == [("eval/win_rate_ci_high", 6)]
    assert "significantly worse" in alarms.warnings[0]["message"] and "Try:" in alarms.warnings[0]["message"]
    assert alarms.stalled(2)["monitor"] == "eval/win_rate_ci_high"  # two validations in a row


def test_prompts_are_the_validation_prompts_or_the_held_out_captions(tmp_path, tiny_sd_path, pairs):
    with pytest.raises(ValueError, match="--validation_scorer samples held-out prompts"):
        parse_config(tiny_run_flags(tiny_sd_path, pairs[0], tmp_path, validation_scorer="shapes"))
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        parse_config(_flags(tiny_sd_path, pairs, tmp_path, validation_scorer="nope"))
    with pytest.raises(ValueError, match="full --objective sft fine-tune has none"):
        parse_config(
            tiny_run_flags(
                tiny_sd_path, pairs[0], tmp_path, validation_scorer="shapes", objective="sft",
                validation_prompts=["a red circle on a blue background"],
            )
        )  # fmt: skip
    cfg = parse_config(_flags(tiny_sd_path, pairs, tmp_path, validation_scorer="shapes"))
    captions = type("Pairs", (), {"captions": ["b", "a", "b", " ", "c"]})()
    assert win_rate_module.validation_prompts(cfg, captions) == ["b", "a", "c"]
    cfg = parse_config(
        _flags(tiny_sd_path, pairs, tmp_path, validation_scorer="shapes", validation_prompts=["x"])
    )
    assert win_rate_module.validation_prompts(cfg, captions) == ["x"]


def test_measuring_leaves_the_global_rng_as_it_was(monkeypatch):
    """A scorer (or pipeline) that draws from torch's global RNG does not move the training's stream:
    the state after a measurement equals the state before (and a draw without the fork would move it).
    The reference is scored once; the images are fakes, the scorer a double that draws."""
    monkeypatch.setattr(win_rate_module, "training_pipeline", lambda cfg, models, unet: None)
    monkeypatch.setattr(
        win_rate_module, "sample_prompt_images", lambda cfg, models, pipe, prompt, seeds: [None] * len(seeds)
    )
    draws = []

    class Drawing:
        def __call__(self, images, prompts):
            draws.append(torch.rand(1).item())
            return torch.rand(len(images))

    class Accelerator:
        device, num_processes, process_index = torch.device("cpu"), 1, 0

        def unwrap_model(self, model):
            return model

    cfg = type("Cfg", (), {"seed": 0, "num_validation_images": 3})()
    models = type("Models", (), {"unet": torch.nn.Linear(1, 1), "ref_unet": torch.nn.Linear(1, 1)})()
    measure = win_rate_module.SampleWinRate(cfg, ["a", "b"], "cpu", scorer=Drawing())
    before = torch.get_rng_state()
    first = measure.measure(models, Accelerator())
    assert torch.equal(torch.get_rng_state(), before) and len(draws) == 4  # reference and policy, 2 prompts
    measure.measure(models, Accelerator())
    assert torch.equal(torch.get_rng_state(), before) and len(draws) == 6  # the reference's scores cached
    assert 0.0 <= first["eval/win_rate_ci_low"] <= first["eval/win_rate"] <= first["eval/win_rate_ci_high"]


# ---- the trainer --------------------------------------------------------------------------------


def test_a_run_logs_the_win_rate_at_its_validations_and_trains_as_without_it(tmp_path, tiny_sd_path, pairs):
    """4 steps, validation every 2: eval/win_rate (with ci_low <= win_rate <= ci_high) at steps 2 and
    4 only, in metrics.jsonl and the closing lines; and the weights equal, bit for bit, those of the
    same run without --validation_scorer: sampling leaves nothing behind that training reads (modes,
    devices, the RNG; the RNG alone is checked directly above, as the loop's draws have their own
    generators)."""
    plain = train(parse_config(_flags(tiny_sd_path, pairs, tmp_path / "plain")))
    reset_accelerate()
    cfg = parse_config(
        _flags(tiny_sd_path, pairs, tmp_path / "scored", validation_scorer="shapes", num_validation_images=2)
    )
    scored = train(cfg)
    rows = _rows(tmp_path / "scored")
    assert [r["step"] for r in rows if "eval/win_rate" in r] == [2, 4]
    for r in rows:
        if "eval/win_rate" in r:
            assert 0.0 <= r["eval/win_rate_ci_low"] <= r["eval/win_rate"] <= r["eval/win_rate_ci_high"] <= 1.0
            assert isinstance(r["eval/score_policy"], float) and isinstance(r["eval/score_reference"], float)
    assert all("eval/win_rate" not in r for r in _rows(tmp_path / "plain"))
    a, b = load_file(tmp_path / "plain" / UNET), load_file(tmp_path / "scored" / UNET)
    assert max((a[k] - load_file(Path(tiny_sd_path) / UNET)[k]).abs().max().item() for k in a) > 1e-5
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _rows(tmp_path / "plain")] == [r["loss"] for r in rows]
    assert plain["global_step"] == scored["global_step"] == 4
    assert "held-out win rate of samples vs the reference (shapes)" in describe_run(cfg, scored)


def test_a_scorer_that_prefers_the_reference_warns_and_stops(tmp_path, tiny_sd_path, pairs, monkeypatch):
    """A test double that scores the first batch it sees (the reference's, sampled once and cached)
    above every later one (the policy's): win rate 0, interval [0, 0], one warning in summary.json's
    monitors; with --stop_on_degradation 2 the run checkpoints and stops at the second validation. A
    double that scores everything alike (ties: 0.5 [0.5, 0.5]) stays quiet."""
    from diffusion_dpo.training.guards import RunStopped

    prompts = len(set(_heldout_captions(pairs[1])))  # the scorer is called once per prompt
    _with_scorer(monkeypatch, _Stub(lambda call: 1.0 if call <= prompts else 0.0))
    cfg = parse_config(_flags(tiny_sd_path, pairs, tmp_path / "bad", validation_scorer="shapes"))
    summary = train(cfg)
    [warning] = [w for w in summary["monitors/warnings"] if w["monitor"] == "eval/win_rate_ci_high"]
    assert warning["step"] == 2  # once, at the first validation (the implicit accuracy may warn too)
    rows = [r for r in _rows(tmp_path / "bad") if "eval/win_rate" in r]
    assert [(r["eval/win_rate"], r["eval/win_rate_ci_high"]) for r in rows] == [(0.0, 0.0), (0.0, 0.0)]
    closing = describe_run(cfg, summary)
    assert "WARNING eval/win_rate_ci_high: step 2:" in closing and "0.00 [0.00, 0.00] at step 4" in closing

    reset_accelerate()
    _with_scorer(monkeypatch, _Stub(lambda call: 1.0 if call <= prompts else 0.0))
    with pytest.raises(RunStopped, match="eval/win_rate_ci_high has been past its threshold"):
        train(parse_config(_flags(
            tiny_sd_path, pairs, tmp_path / "stop", validation_scorer="shapes", stop_on_degradation=2,
            max_train_steps=6,
        )))  # fmt: skip
    assert (tmp_path / "stop" / "checkpoint-4").is_dir() and _rows(tmp_path / "stop")[-1]["step"] == 4

    reset_accelerate()
    _with_scorer(monkeypatch, _Stub(lambda call: 1.0))
    quiet = train(parse_config(_flags(tiny_sd_path, pairs, tmp_path / "tie", validation_scorer="shapes")))
    assert all(w["monitor"] != "eval/win_rate_ci_high" for w in quiet["monitors/warnings"])
    assert {r["eval/win_rate"] for r in _rows(tmp_path / "tie") if "eval/win_rate" in r} == {0.5}


def _heldout_captions(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).column("caption").to_pylist()


def test_a_resumed_run_rebuilds_the_reference_and_validates_at_the_same_steps(tmp_path, tiny_sd_path, pairs):
    """6 steps straight = 4 steps, then a resume to 6 (LoRA: the reference is the base under the
    adapters): the same win rates at steps 2, 4, 6."""
    common = dict(validation_scorer="shapes", num_validation_images=2, use_lora=True, checkpointing_steps=2)
    train(parse_config(_flags(tiny_sd_path, pairs, tmp_path / "straight", max_train_steps=6, **common)))
    reset_accelerate()
    train(parse_config(_flags(tiny_sd_path, pairs, tmp_path / "resumed", max_train_steps=4, **common)))
    reset_accelerate()
    train(parse_config(_flags(
        tiny_sd_path, pairs, tmp_path / "resumed", max_train_steps=6, resume_from_checkpoint="latest",
        **common,
    )))  # fmt: skip

    def curve(out):
        return [
            (r["step"], r["eval/win_rate"], r["eval/score_reference"])
            for r in _rows(out)
            if "eval/win_rate" in r
        ]

    assert [s for s, _, _ in curve(tmp_path / "straight")] == [2, 4, 6]
    assert curve(tmp_path / "resumed") == pytest.approx(curve(tmp_path / "straight"))


@pytest.mark.parametrize("family", ["tiny_sd_path", "tiny_sdxl_path", "tiny_sd3_path", "tiny_flux_path"])
def test_every_family_samples_its_reference_as_the_frozen_model_or_the_lora_base(
    request, tmp_path, pairs, family
):
    """One step of a full fine-tune and of LoRA in each family (through the family's own pipeline, no
    family branch in the trainer): the reference's scores are the same images in both, the frozen copy
    of the base and the base under disabled adapters."""
    model = request.getfixturevalue(family)
    scores = {}
    for lora in (False, True):
        out = tmp_path / str(lora)
        flags = _flags(
            model, pairs, out, validation_scorer="shapes", num_validation_images=2, max_train_steps=1,
            use_lora=lora, validation_timesteps=[500],
        )  # fmt: skip
        train(parse_config(flags))
        reset_accelerate()
        [row] = [r for r in _rows(out) if "eval/win_rate" in r]
        scores[lora] = row["eval/score_reference"]
        assert (
            0.0 <= row["eval/win_rate_ci_low"] <= row["eval/win_rate"] <= row["eval/win_rate_ci_high"] <= 1.0
        )
    assert scores[True] == pytest.approx(scores[False], rel=1e-6)
