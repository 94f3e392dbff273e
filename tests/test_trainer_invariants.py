"""Where the trainer glues things together: exact resume, gradient accumulation, step-one
invariants, v-prediction and the bf16 reference path (issue "Reliability for multi-day runs", item 8).

Every check compares against hand-derived numbers or an independent computation. Runs are tiny
(32 px, a handful of steps) and in-process; a "kill" is an exception raised from the loop's call to
``compute_batch_loss`` at a chosen micro-batch, which leaves the output folder exactly as a crash
there would (metrics rows past the last checkpoint included).
"""

import contextlib
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.diffusion import denoising_target, draw_for_rows, implicit_reward_accuracy
from diffusion_dpo.models.loading import latent_shape
from diffusion_dpo.models.tiny import save_tiny_pipeline, tiny_unet_config
from diffusion_dpo.training import loop
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.data_setup import make_loader
from diffusion_dpo.training.models import setup_models
from diffusion_dpo.training.step import compute_batch_loss
from diffusion_dpo.training.validation import (
    encode_heldout_pairs,
    heldout_accuracy,
    heldout_implicit_accuracy,
)

LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def six_pairs(tmp_path_factory):
    """6 pairs, no ties: with --train_batch_size 2 an epoch is exactly 3 optimizer steps."""
    path = tmp_path_factory.mktemp("six") / "six.parquet"
    return synthetic.write_pair_dataset(path, 6, seed=0, tie_fraction=0.0)


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("eight") / "eight.parquet"
    return synthetic.write_pair_dataset(path, 8, seed=1, tie_fraction=0.0)


def _argv(model, data, out, **overrides):
    return tiny_run_flags(model, data, out, **{"train_batch_size": 2, "max_train_steps": 4, **overrides})


def _train(model, data, out, **overrides) -> dict:
    try:
        return loop.train(parse_config(_argv(model, data, out, **overrides)))
    finally:
        reset_accelerate()


class _Killed(Exception):
    pass


@contextlib.contextmanager
def _killed_at_micro_batch(k: int):
    """The loop dies when it starts its k-th micro-batch (1-based) — with gradient accumulation 1,
    while computing optimizer step (first step of the run) + k − 1: the rows of the steps before it
    are logged, its own row is not."""
    real = loop.compute_batch_loss
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise _Killed(f"killed at micro-batch {k}")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "compute_batch_loss", dying)
        with pytest.raises(_Killed):
            yield


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]


def _assert_same_rows(got: list[dict], want: list[dict]):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w), (g["step"], set(g) ^ set(w))
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (g["step"], key)
            else:
                assert g[key] == value, (g["step"], key)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=1e-5, atol=1e-6, msg=k)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# 1. exact resume


def test_resume_mid_warmup_across_epochs_after_kills(tmp_path, tiny_sd_path, six_pairs):
    """6 steps straight == a run killed in step 4 (rows 1-3 logged, checkpoint-2), resumed and killed
    in step 6 (rows 1-5, checkpoint-4), resumed to the end.

    6 pairs at batch 2: epoch 0 is steps 1-3, epoch 1 steps 4-6. The first resume starts mid-epoch 0
    and crosses into epoch 1; the second starts from a checkpoint inside epoch 1. Warm-up of 5 steps
    with constant_with_warmup: the lr logged after step k is 1e-3·min(1, k/5) = 0.2, 0.4, 0.6, 0.8,
    1, 1 (×1e-3); both checkpoints are mid-warm-up, so a scheduler restarted instead of restored
    would log other numbers (and change the weights).
    """
    common = dict(max_train_steps=6, lr_warmup_steps=5, checkpointing_steps=2)
    straight = _train(tiny_sd_path, six_pairs, tmp_path / "straight", **common)
    want = _rows(tmp_path / "straight")
    assert [r["lr"] for r in want] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3], rel=1e-9)

    out = tmp_path / "resumed"
    with _killed_at_micro_batch(4):
        _train(tiny_sd_path, six_pairs, out, **common)
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]  # a row past the last checkpoint
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    with _killed_at_micro_batch(4):  # steps 3, 4, 5 done; dies in step 6
        _train(tiny_sd_path, six_pairs, out, resume_from_checkpoint="latest", **common)
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5]
    state = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["position"]) == (4, 1, {"rows_done": 2})
    resumed = _train(tiny_sd_path, six_pairs, out, resume_from_checkpoint="latest", **common)

    got = _rows(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # no duplicate, none missing
    _assert_same_rows(got, want)
    _assert_same_weights(resumed["models"].unet, straight["models"].unet)


@pytest.mark.parametrize("sdxl,use_lora", [(False, True), (True, False)], ids=["sd15-lora", "sdxl-full"])
def test_resume_after_kill_lora_and_sdxl(tmp_path, tiny_sd_path, tiny_sdxl_path, six_pairs, sdxl, use_lora):
    """4 steps straight == killed in step 3 after checkpoint-2 + resume, for LoRA (the adapter
    weights and their optimizer state are what is restored) and for SDXL (sizes and crops in the
    batch, two text encoders)."""
    model = tiny_sdxl_path if sdxl else tiny_sd_path
    common = dict(max_train_steps=4, checkpointing_steps=2, use_lora=use_lora, rank=4)
    straight = _train(model, six_pairs, tmp_path / "straight", **common)
    out = tmp_path / "resumed"
    with _killed_at_micro_batch(3):
        _train(model, six_pairs, out, **common)
    assert [r["step"] for r in _rows(out)] == [1, 2]
    resumed = _train(model, six_pairs, out, resume_from_checkpoint="latest", **common)
    _assert_same_rows(_rows(out), _rows(tmp_path / "straight"))
    _assert_same_weights(resumed["models"].unet, straight["models"].unet)


# ----------------------------------------------------------------------------------------------
# 2. gradient accumulation


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_sd_path, eight_pairs):
    """batch 2 × accumulation 2 == batch 4 × 1: the same rows per step (one shared permutation, cut
    in groups), the same per-row draws, and the loss summed over rows / 4 either way. 8 pairs: both
    runs take 2 steps inside epoch 0."""
    # Adam's first steps move each weight by ±lr whatever its gradient's size, so float summation noise
    # can flip near-zero updates; a large ε makes updates proportional to gradients (see
    # tests/test_distributed.py), and the comparison measures the batching, not the rounding.
    adam = dict(learning_rate=1e-2, adam_epsilon=1.0)
    small = _train(tiny_sd_path, eight_pairs, tmp_path / "ga", max_train_steps=2, train_batch_size=2,
                   gradient_accumulation_steps=2, **adam)  # fmt: skip
    big = _train(tiny_sd_path, eight_pairs, tmp_path / "big", max_train_steps=2, train_batch_size=4, **adam)
    ga_rows, big_rows = _rows(tmp_path / "ga"), _rows(tmp_path / "big")
    assert [r["step"] for r in ga_rows] == [1, 2]
    for g, b in zip(ga_rows, big_rows, strict=True):
        for key in ("loss", "mse/model_chosen", "mse/ref_rejected", "rewards/margins", "grad_norm"):
            assert g[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (g["step"], key)
    # each tensor's difference against its update (wrong rows or draws would make them comparable)
    base = _state(UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet"))
    a, b = _state(small["models"].unet), _state(big["models"].unet)
    for k in base:
        update = (a[k] - base[k]).norm()
        assert update > 0, k
        assert (a[k] - b[k]).norm() <= 0.01 * update + 1e-6, k  # + float32 resolution near 1


# ----------------------------------------------------------------------------------------------
# 3. step-one invariants


def test_step_one_lora_policy_is_its_reference(tmp_path, tiny_sd_path, six_pairs):
    """At step 1 a LoRA policy is exactly its reference (B = 0; the reference is the same module, in
    the same mode, adapters off), so every log-ratio is 0: sigmoid loss −logσ(0) = ln 2, every pair
    a tie (accuracy 0.5 by the ties-count-half rule), margins and rewards 0, model errors = reference
    errors, all bit for bit."""
    _train(tiny_sd_path, six_pairs, tmp_path / "out", max_train_steps=1, use_lora=True, rank=4)
    (row,) = _rows(tmp_path / "out")
    assert row["loss"] == pytest.approx(LN2, rel=1e-7)
    assert row["rewards/accuracies"] == 0.5
    assert row["rewards/margins"] == 0.0
    assert row["rewards/chosen"] == 0.0 and row["rewards/rejected"] == 0.0
    assert row["mse/model_chosen"] == row["mse/ref_chosen"]
    assert row["mse/model_rejected"] == row["mse/ref_rejected"]
    assert row["mse/model_chosen"] != row["mse/model_rejected"]  # real, distinct errors
    assert row["grad_norm"] > 0


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_step_one_full_policy_equals_reference(tmp_path, tiny_sd_path, six_pairs, precision):
    """A full fine-tune's policy holds the reference's weights at step 1, so their errors are equal,
    the loss is ln 2 and accuracy is exactly 0.5 (ties count half). This needs the reference to run in
    the policy's mode: diffusers' ResnetBlock2D makes its conv_shortcut input contiguous in training
    mode only (diffusers issue #12975), and the different memory layout changes the last bit; in bf16
    β = 5000 turned that into a step-one loss of 0.62 instead of ln 2 (reference in eval mode)."""
    # 4 pairs: at batch sizes 1-2 the CPU kernels happen to agree in both modes, at 3-6 they do not
    _train(
        tiny_sd_path,
        six_pairs,
        tmp_path / "out",
        max_train_steps=1,
        mixed_precision=precision,
        train_batch_size=4,
    )
    (row,) = _rows(tmp_path / "out")
    assert row["loss"] == pytest.approx(LN2, abs=1e-6)
    assert row["rewards/margins"] == 0 and row["rewards/accuracies"] == 0.5
    assert row["mse/model_chosen"] == row["mse/ref_chosen"]
    assert row["mse/model_rejected"] == row["mse/ref_rejected"]
    assert row["mse/model_chosen"] != row["mse/model_rejected"]  # real, distinct errors
    assert row["grad_norm"] > 0


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(tmp_path, tiny_sd_path):
    """A checkpoint on an epoch's last complete batch resumes (it used to fail as an "empty" data set:
    the resumed epoch had nothing left), map-style and streamed. 6 pairs, 2 per step: epoch 0 is
    steps 1-3, checkpoint-3 holds the whole epoch."""
    data = synthetic.write_pair_dataset(tmp_path / "six.parquet", 6, seed=0, tie_fraction=0.0)
    for streaming in (False, True):
        common = dict(max_train_steps=5, checkpointing_steps=3, streaming=streaming, train_batch_size=2)
        straight = _train(tiny_sd_path, data, tmp_path / f"straight{streaming}", **common)
        _train(tiny_sd_path, data, tmp_path / f"resumed{streaming}", **{**common, "max_train_steps": 3})
        resumed = _train(
            tiny_sd_path, data, tmp_path / f"resumed{streaming}", resume_from_checkpoint="latest", **common
        )
        a, b = straight["models"].unet.state_dict(), resumed["models"].unet.state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, streaming


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_heldout_accuracy_is_one_half_for_the_reference_itself(tmp_path, tiny_sd_path, six_pairs, use_lora):
    """A model identical to its reference ties on every pair at every timestep: exactly 0.5."""
    cfg = parse_config(_argv(tiny_sd_path, six_pairs, tmp_path / "o", use_lora=use_lora, rank=4))
    set_seed(0)
    models = setup_models(cfg, "cpu")
    loader = make_loader(six_pairs, resolution=32, batch_size=4, sdxl=False)
    pairs = encode_heldout_pairs(models, loader, max_pairs=6, resolution=32)
    assert pairs.latents_w.shape == (6, 4, 16, 16)
    assert not torch.equal(pairs.latents_w, pairs.latents_l)
    assert heldout_accuracy(models, pairs, timesteps=(10, 500, 990), seed=3, batch_size=4) == 0.5


def test_implicit_accuracy_is_one_half_for_identical_models(tmp_path, tiny_sd_path, six_pairs):
    """The same for the pure function (a UNet against its copy) and for a saved pipeline scored
    against itself through heldout_implicit_accuracy (the eval script's path)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size=8)).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(1)
    lw, ll = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    hidden = torch.randn(3, 5, 32, generator=g)
    acc = implicit_reward_accuracy(unet, copy.deepcopy(unet), sched, lw, ll, hidden, timesteps=(1, 400, 999))
    assert acc.item() == 0.5
    # the saved-checkpoint path: a pipeline scored against itself
    assert heldout_implicit_accuracy(tiny_sd_path, str(six_pairs), reference=tiny_sd_path, max_pairs=4,
                                     timesteps=(100, 900), batch_size=2) == 0.5  # fmt: skip


# ----------------------------------------------------------------------------------------------
# 4. v-prediction


def _alphas_cumprod_by_hand(beta_start=0.00085, beta_end=0.012, steps=1000) -> np.ndarray:
    # scaled_linear: β_t = (linspace(√β_start, √β_end, T)_t)², ᾱ_t = Π_{s≤t} (1 − β_s); float64
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_v_prediction_target_is_the_closed_form_velocity():
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 with ᾱ from the beta schedule by hand (not get_velocity)."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="v_prediction")  # fmt: skip
    abar = _alphas_cumprod_by_hand()
    # anchors: ᾱ_0 = 1 − β_0 = 0.99915; √ᾱ_999 = 0.068265, SD's terminal signal level quoted by
    # Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 1)
    assert abar[0] == pytest.approx(0.99915, rel=1e-12)
    assert abar[999] ** 0.5 == pytest.approx(0.068265, rel=1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    eps = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    a = torch.from_numpy(abar[t.numpy()]).view(-1, 1, 1, 1)
    expected = a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()
    got = denoising_target(sched, x0, eps, t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # not the epsilon target: at t = 999 the velocity is mostly −x0 (−0.998·x0 + 0.068·ε)
    assert not torch.allclose(got, eps, atol=0.1)
    assert torch.corrcoef(torch.stack([got[3].flatten(), -x0[3].flatten()]))[0, 1] > 0.99


def _v_prediction_pipeline(path: Path) -> Path:
    save_tiny_pipeline(path, seed=0)
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(config))
    return path


def test_v_prediction_training_uses_the_velocity(tmp_path, six_pairs):
    """A tiny pipeline whose scheduler says v_prediction trains (finite loss, weights move), and
    compute_batch_loss's model error equals an independent computation with the velocity target."""
    model = _v_prediction_pipeline(tmp_path / "vpred")
    summary = _train(model, six_pairs, tmp_path / "out", max_train_steps=2)
    assert all(math.isfinite(r["loss"]) for r in _rows(tmp_path / "out"))
    models = summary["models"]
    assert models.components.noise_scheduler.config.prediction_type == "v_prediction"
    base = _state(UNet2DConditionModel.from_pretrained(model, subfolder="unet"))
    trained = _state(models.unet)
    assert any(not torch.equal(trained[k], base[k]) for k in base)

    cfg = parse_config(_argv(model, six_pairs, tmp_path / "o"))
    g = torch.Generator().manual_seed(5)
    batch = {
        "pixel_values_w": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "pixel_values_l": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "captions": ["a red circle", "a blue square on a green background"],
        "indices": torch.tensor([4, 1]),
        "epoch": 2,
    }
    with torch.no_grad():
        _, metrics = compute_batch_loss(models, batch, cfg)

        # independently: latents = (posterior mean + std·draw)·scale, x_t = √ᾱ x0 + √(1−ᾱ) ε,
        # v = √ᾱ ε − √(1−ᾱ) x0, error = mean over C×H×W of (unet(x_t) − v)²
        comps = models.components
        draws = draw_for_rows(0, 2, [4, 1], latent_shape(comps.vae, 32, 32), 1000, images_per_row=2)
        dist = comps.vae.encode(batch["pixel_values_w"]).latent_dist
        x0 = (dist.mean + dist.std * draws.posterior[0]) * comps.vae.config.scaling_factor
        ids = comps.tokenizers[0](batch["captions"], padding="max_length", max_length=16,
                                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        hidden = comps.text_encoders[0](ids)[0]
        abar = torch.from_numpy(_alphas_cumprod_by_hand()[draws.timesteps.numpy()]).float().view(-1, 1, 1, 1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * draws.noise
        pred = models.unet(noisy, draws.timesteps, hidden).sample
        v = abar.sqrt() * draws.noise - (1 - abar).sqrt() * x0
        expected = (pred - v).pow(2).flatten(1).mean(1).mean()
        with_eps = (pred - draws.noise).pow(2).flatten(1).mean(1).mean()
    assert metrics["mse/model_chosen"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(with_eps.item() - expected.item()) > 1e-3 * expected.item()  # the check can tell them apart


# ----------------------------------------------------------------------------------------------
# 5. bf16 / fp16 reference path


def test_bf16_reference_is_kept_and_run_in_bf16(tmp_path, tiny_sd_path, six_pairs):
    """--mixed_precision bf16 on CPU: the frozen reference holds the saved weights cast to bf16 and
    its errors (the logged mse/ref_*) are those of an independent bf16 forward on the same inputs,
    not of the fp32 weights; the loss is finite and training moves every trainable weight."""
    seen = {}
    real_setup, real_step = loop.setup_models, loop.compute_batch_loss

    def setup_and_watch(cfg, device):
        models = real_setup(cfg, device)

        def record(module, args, kwargs, output):
            seen.setdefault("ref_in", (args, kwargs))
            seen.setdefault("ref_out", output.sample.detach().clone())

        models.ref_unet.register_forward_hook(record, with_kwargs=True)
        return models

    def step_and_watch(models, batch, cfg, **kw):
        seen.setdefault("indices", batch["indices"].tolist())
        return real_step(models, batch, cfg, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "setup_models", setup_and_watch)
        mp.setattr(loop, "compute_batch_loss", step_and_watch)
        summary = _train(tiny_sd_path, six_pairs, tmp_path / "out", max_train_steps=2, mixed_precision="bf16")
    rows = _rows(tmp_path / "out")
    assert all(math.isfinite(r["loss"]) for r in rows)
    models = summary["models"]

    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    ref_bf16 = copy.deepcopy(base).to(torch.bfloat16).eval()
    ref_state = models.ref_unet.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in ref_state.values())
    assert all(torch.equal(ref_state[k], v) for k, v in ref_bf16.state_dict().items())
    base_state, trained = base.state_dict(), models.unet.state_dict()
    assert all(not torch.equal(trained[k].float(), base_state[k]) for k in base_state), (
        "a weight did not move"
    )

    # the reference saw bf16 inputs; an independent bf16 forward on them gives its output
    (noisy, t, hidden), kwargs = seen["ref_in"]
    assert noisy.dtype == hidden.dtype == torch.bfloat16
    with torch.no_grad():
        independent = ref_bf16(noisy, t, hidden, **kwargs).sample
        fp32 = base(noisy.float(), t, hidden.float(), **kwargs).sample
    torch.testing.assert_close(seen["ref_out"], independent, rtol=0, atol=0)

    # the logged step-1 reference errors are those of the bf16 forward, against the ε target
    n = len(seen["indices"])
    noise = draw_for_rows(0, 0, seen["indices"], (4, 16, 16), 1000, images_per_row=2).noise
    target = torch.cat([noise, noise]).to(torch.bfloat16).float()

    def err(pred):
        return (pred.float() - target).pow(2).flatten(1).mean(1)

    want = err(independent)
    assert rows[0]["mse/ref_chosen"] == pytest.approx(want[:n].mean().item(), rel=1e-6)
    assert rows[0]["mse/ref_rejected"] == pytest.approx(want[n:].mean().item(), rel=1e-6)
    from_fp32 = err(fp32)[:n].mean().item()
    assert rows[0]["mse/ref_chosen"] != pytest.approx(from_fp32, rel=1e-6)  # bf16 weights are visible


def test_fp16_reference_is_kept_in_fp16(tmp_path, tiny_sd_path, six_pairs):
    """Runs where accelerate gives fp16 autocast (a GPU); skipped on CPU, where it does not."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="fp16")
    if accelerator.device.type == "cpu" and not accelerator.native_amp:
        pytest.skip(
            "accelerate gives no fp16 autocast on CPU (native_amp False, no GradScaler), so the fp32 "
            "policy UNet would receive fp16 inputs; fp16 is a GPU setting"
        )
    reset_accelerate()
    summary = _train(tiny_sd_path, six_pairs, tmp_path / "out", max_train_steps=2, mixed_precision="fp16")
    assert next(summary["models"].ref_unet.parameters()).dtype == torch.float16
    assert all(math.isfinite(r["loss"]) for r in _rows(tmp_path / "out"))
