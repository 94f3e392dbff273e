"""Trainer options of the Performance section: --use_adafactor (the paper's SDXL optimizer) and the precision."""

import json

import pytest
import torch
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.training.config import TrainConfig, parse_config
from diffusion_dpo.training.loop import train
from diffusion_dpo.training.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _state_bytes(optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for k, v in s.items()
        if isinstance(v, torch.Tensor) and k != "step"
    )


def test_adafactor_is_set_up_as_the_paper_and_keeps_factored_state_only():
    """The paper's settings (lr as given, no relative step or scaling, clipping 1, the weight decay), and
    after a step a [64, 32] weight holds a row and a column of second moments (64 + 32 floats) and its
    [64] bias 64, each with one RMS scalar, where AdamW holds two full copies of each."""
    from transformers.optimization import Adafactor

    cfg = TrainConfig(
        pretrained_model_name_or_path="m", dataset_name="d", use_adafactor=True, adam_weight_decay=0.03
    )
    layer = torch.nn.Linear(32, 64)
    optimizer = make_optimizer(cfg, layer.parameters(), 1e-4, "cpu")
    assert isinstance(optimizer, Adafactor)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-4 and group["weight_decay"] == 0.03 and group["clip_threshold"] == 1.0
    assert not group["relative_step"] and not group["scale_parameter"] and group["beta1"] is None
    adamw = make_optimizer(
        TrainConfig(pretrained_model_name_or_path="m", dataset_name="d"), layer.parameters(), 1e-4, "cpu"
    )
    before = layer.weight.detach().clone()
    layer(torch.randn(8, 32)).pow(2).sum().backward()
    optimizer.step()
    adamw.step()
    assert not torch.equal(before, layer.weight)
    assert _state_bytes(optimizer) == (64 + 32 + 1 + 64 + 1) * 4
    assert _state_bytes(adamw) == 2 * (64 * 32 + 64) * 4


def test_adafactor_refuses_adamw_kernel_flags():
    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--use_adafactor"]
    for extra in (["--use_8bit_adam"], ["--adam_implementation", "fused"]):
        with pytest.raises(ValueError, match="--use_adafactor replaces AdamW"):
            parse_config(base + extra)
    assert parse_config(base).use_adafactor


def test_a_run_with_adafactor_trains_and_resumes_exactly(tmp_path, tiny_sd_path):
    """4 steps straight == 2 steps, a checkpoint, and 2 resumed steps: Adafactor's factored moments are in
    the checkpoint; and the weights moved."""
    data = synthetic.write_pair_dataset(tmp_path / "pairs.parquet", 16, seed=0)
    common = dict(use_adafactor=True, max_train_steps=4, checkpointing_steps=2, train_batch_size=2)

    def run(out, **kw):
        reset_accelerate()
        return train(parse_config(tiny_run_flags(tiny_sd_path, data, tmp_path / out, **{**common, **kw})))

    straight = run("straight")["models"]
    run("resumed", max_train_steps=2)
    resumed = run("resumed", resume_from_checkpoint="latest")["models"]
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    reference = straight.ref_unet.state_dict()
    assert sum(not torch.equal(a[k], reference[k]) for k in a) > len(a) // 2
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_mixed_precision_left_unset_follows_accelerate(monkeypatch):
    """As in diffusers' scripts: unset, the precision is accelerate's (`accelerate launch
    --mixed_precision bf16` or its config file, which set ACCELERATE_MIXED_PRECISION), else no; a flag
    or the trainer YAML wins; a precision the trainer does not run is refused, naming where it came from."""
    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert parse_config(base).mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parse_config(base).mixed_precision == "bf16"
    assert parse_config([*base, "--mixed_precision", "fp16"]).mixed_precision == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="ACCELERATE_MIXED_PRECISION"):
        parse_config(base)
