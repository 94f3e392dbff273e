"""FLUX.1 (diffusion_dpo/models/families/flux.py) on a tiny FluxPipeline built offline: recognised and its
relatives refused, prompts encoded as FluxPipeline.encode_prompt does, the packed-latent objective equal
to the rectified-flow formula with packing written out by hand, the guidance embedding fed one value, and
the trainer (full and LoRA, every objective, resume, held-out accuracy, 2 processes) on it."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from trainer_runs import flags, reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.diffusion import pair_logratios
from diffusion_dpo.diffusion.processes import FlowMatchProcess
from diffusion_dpo.losses import PAIRWISE_LOSSES, pairwise_loss_from_logratios
from diffusion_dpo.models.families import FluxFamily, family_for_index
from diffusion_dpo.models.families.flux import flux_call
from diffusion_dpo.models.loading import load_components
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

T5_LENGTH = 16  # the tiny T5's captions fit; FLUX.1's default (512) would only cost time
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return synthetic.write_pair_dataset(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 16, seed=0)


def _flux_run(model, data, out, **overrides):
    argv = tiny_run_flags(model, data, out, max_sequence_length=T5_LENGTH, beta_dpo=500, **overrides)
    return train(parse_config(argv))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- recognition, refusals, options ----------------------------------------------------------------


def test_flux_is_recognised_its_relatives_refused_and_its_options_checked():
    flux = family_for_index({"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]})
    assert type(flux) is FluxFamily
    assert flux.max_sequence_length == 512 and flux.guidance_scale == 3.5  # diffusers' Flux defaults
    assert flux.sampling_kwargs() == {"max_sequence_length": 512, "guidance_scale": 3.5}
    assert family_for_index({"_class_name": "FluxPipeline"}, guidance_scale=1.0).guidance_scale == 1.0
    refused = {
        "FluxKontextPipeline": "condition image",
        "FluxFillPipeline": "mask and a masked image",
        "FluxControlPipeline": "control image",
        "FluxControlNetPipeline": "ControlNet",
        "FluxPriorReduxPipeline": "no transformer",
        "Flux2Pipeline": "FLUX.2 has another transformer",
        "Flux2KleinPipeline": "Qwen3 for klein",
        "FluxImg2ImgPipeline": "only FLUX.1 text-to-image",
    }
    for name, need in refused.items():
        with pytest.raises(ValueError, match=f"model is a {name}: .*{need}"):
            family_for_index({"_class_name": name})
    with pytest.raises(ValueError, match="--drop_t5: FLUX.1's token states are all T5's"):
        family_for_index({"_class_name": "FluxPipeline"}, drop_t5=True)
    with pytest.raises(ValueError, match="at most 512"):
        family_for_index({"_class_name": "FluxPipeline"}, max_sequence_length=513)
    # families without a guidance embedding take --guidance_scale as sampling's classifier-free guidance
    # only (it never reaches their training call), and refuse FLUX.1's resolution shift
    for index in (
        {"_class_name": "StableDiffusion3Pipeline"},
        {"unet": ["diffusers", "UNet2DConditionModel"]},
    ):
        other = family_for_index(index, guidance_scale=2.0)
        assert "guidance_scale" not in other.sampling_kwargs() and not hasattr(other, "guidance_scale")
        with pytest.raises(ValueError, match="--resolution_shift: .* fixed schedule"):
            family_for_index(index, resolution_shift=512)
    # image sides: 2×2 packing of a VAE that downsamples 8×: multiples of 16, the error names two that work
    vae = SimpleNamespace(block_out_channels=(128, 256, 512, 512))
    flux.check_resolution(512, vae)
    with pytest.raises(ValueError, match="multiples of 16; 512 or 528 would work"):
        flux.check_resolution(520, vae)
    with pytest.raises(ValueError, match="multiples of 16; 16 or 32 would work"):
        flux.check_resolution(8, vae)


def test_the_trainer_refuses_a_side_not_divisible_by_the_packing(tmp_path, tiny_flux_path, pairs_path):
    # the tiny VAE downsamples 2×: sides must be multiples of 4
    with pytest.raises(ValueError, match="--resolution 30: .*multiples of 4; 28 or 32 would work"):
        _flux_run(tiny_flux_path, pairs_path, tmp_path / "o", resolution=30)


def test_schnell_warns_that_it_is_step_distilled_and_gets_no_guidance(tmp_path, caplog):
    from diffusion_dpo.models.tiny import build_tiny_flux_pipeline

    path = tmp_path / "schnell"
    build_tiny_flux_pipeline(guidance_embeds=False).save_pretrained(path)
    with caplog.at_level("WARNING"):
        comps = load_components(str(path), family_options={"max_sequence_length": T5_LENGTH})
    assert "timestep-distilled" in caplog.text
    model = comps.unet.eval()
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 8, 8, generator=g)
    hidden, pooled = comps.family.encode_prompts(comps, ["a red circle", "a cat"], "cpu")
    cond = comps.family.added_conditioning(pooled, None, [""], 32, torch.float32, "cpu")
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():  # the guidance value is not fed to a transformer without the embedding
        a = flux_call(model, noisy, t, hidden, cond)
        b = flux_call(model, noisy, t, hidden, {**cond, "guidance": cond["guidance"] * 0 + 9.0})
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_fill_or_control_transformer_in_a_flux_folder_is_refused_at_load(tmp_path):
    from diffusers import FluxTransformer2DModel

    from diffusion_dpo.models.tiny import build_tiny_flux_pipeline, tiny_flux_transformer_config

    pipe = build_tiny_flux_pipeline()
    # FLUX.1 Canny/Depth: the control image's 64 packed features next to the latents', 64 out
    pipe.transformer = FluxTransformer2DModel(**{**tiny_flux_transformer_config(), "in_channels": 128,
                                                 "out_channels": 64})  # fmt: skip
    pipe.save_pretrained(tmp_path / "control")
    with pytest.raises(ValueError, match="takes 128 input channels for 64 output channels.*Fill or Control"):
        load_components(str(tmp_path / "control"))


# ---- encoding and the objective ----------------------------------------------------------------------


def test_flux_prompt_encoding_equals_the_pipelines(tiny_flux_path):
    from diffusers import FluxPipeline

    comps = load_components(str(tiny_flux_path), family_options={"max_sequence_length": T5_LENGTH})
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    captions = ["a red circle on a blue background", ""]
    hidden, pooled = comps.family.encode_prompts(comps, captions, "cpu")
    expected, expected_pooled, text_ids = pipe.encode_prompt(
        captions, None, device="cpu", max_sequence_length=T5_LENGTH
    )
    assert hidden.shape == (2, T5_LENGTH, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (2, pipe.transformer.config.pooled_projection_dim)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)
    assert torch.equal(text_ids, torch.zeros(T5_LENGTH, 3))  # what flux_call passes as txt_ids
    assert comps.family.text_encoding_settings() == {"max_sequence_length": T5_LENGTH}


def _pack_by_hand(x):
    """[N, C, H, W] → [N, (H/2)(W/2), 4C]: token i·W/2 + j holds the 2×2 patch at (2i, 2j), feature
    4c + 2·di + dj its pixel (2i + di, 2j + dj) of channel c; ids (0, i, j)."""
    n, c, h, w = x.shape
    tokens = torch.empty(n, (h // 2) * (w // 2), 4 * c, dtype=x.dtype)
    ids = torch.zeros((h // 2) * (w // 2), 3)
    for i in range(h // 2):
        for j in range(w // 2):
            ids[i * (w // 2) + j] = torch.tensor([0.0, i, j])
            for di in (0, 1):
                for dj in (0, 1):
                    tokens[:, i * (w // 2) + j, 2 * di + dj :: 4] = x[:, :, 2 * i + di, 2 * j + dj]
    return tokens, ids


def _unpack_by_hand(tokens, h, w):
    n, _, features = tokens.shape
    x = torch.empty(n, features // 4, h, w, dtype=tokens.dtype)
    for i in range(h // 2):
        for j in range(w // 2):
            for di in (0, 1):
                for dj in (0, 1):
                    x[:, :, 2 * i + di, 2 * j + dj] = tokens[:, i * (w // 2) + j, 2 * di + dj :: 4]
    return x


def test_flux_packed_objective_equals_the_hand_written_unpacked_formula(tiny_flux_path):
    import copy

    torch.manual_seed(0)
    comps = load_components(str(tiny_flux_path), family_options={"max_sequence_length": T5_LENGTH})
    ref = comps.unet.eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    process = comps.family.process(comps.noise_scheduler)
    assert isinstance(process, FlowMatchProcess)
    g = torch.Generator().manual_seed(2)
    b = 3
    lw, ll, noise = (torch.randn(b, 16, 16, 16, generator=g) for _ in range(3))
    hidden, pooled = comps.family.encode_prompts(comps, ["a red circle", "", "a green square"], "cpu")
    cond = comps.family.added_conditioning(pooled, None, [""], 32, torch.float32, "cpu")
    t = torch.tensor([30, 500, 990])
    rc, rr = pair_logratios(policy, ref, process, lw, ll, hidden, noise, t, cond)

    # by hand: FLUX.1's scheduler (dynamic shifting) keeps the unshifted training grid, σ = (T − position)/T
    T = comps.noise_scheduler.config.num_train_timesteps
    sigma = comps.noise_scheduler.sigmas[T - 1 - t]
    torch.testing.assert_close(sigma, (t + 1).float() / T)
    sigma = sigma.view(-1, 1, 1, 1)

    def logratio(x0):
        xt = (1 - sigma) * x0 + sigma * noise
        v = noise - x0
        tokens, ids = _pack_by_hand(xt)
        errors = []
        for model in (policy, ref):
            out = model(
                hidden_states=tokens, timestep=sigma.flatten(), guidance=torch.full((b,), 3.5),
                pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=torch.zeros(T5_LENGTH, 3),
                img_ids=ids,
            ).sample  # fmt: skip
            pred = _unpack_by_hand(out, 16, 16)
            errors.append((pred - v).pow(2).mean(dim=(1, 2, 3)))  # per-image mean over C×H×W
        return -0.5 * (errors[0] - errors[1])

    torch.testing.assert_close(rc, logratio(lw), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rr, logratio(ll), rtol=1e-5, atol=1e-7)
    assert rc.requires_grad and not (rc - rr).eq(0).all()
    # the guidance value reaches the transformer: another one gives other log-ratios
    other = {**cond, "guidance": torch.full((b,), 1.0)}
    rc1, _ = pair_logratios(policy, ref, process, lw, ll, hidden, noise, t, other)
    assert not torch.allclose(rc1, rc)


def test_sigma_is_drawn_on_the_unshifted_grid_or_opt_in_on_the_pipelines_resolution_schedule(
    tmp_path, tiny_flux_path, pairs_path
):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion_dpo.models.tiny import FLUX_SCHEDULER_CONFIG

    T = 1000
    grid = torch.arange(1, T + 1, dtype=torch.float64) / T  # index t (0 = least noise) → (t + 1)/T
    plain = load_components(str(tiny_flux_path), load_unet=False, load_text_encoders=False)
    process = plain.family.process(plain.noise_scheduler)
    torch.testing.assert_close(process.sigmas.double(), grid, rtol=0, atol=1e-6)
    # opt-in: what FluxPipeline samples at 32 px on the tiny VAE (2×): (32/4)² = 64 image tokens,
    # μ = 0.5 + (64 − 256)·(1.15 − 0.5)/(4096 − 256), applied by the scheduler's own exponential time shift
    shifted = load_components(
        str(tiny_flux_path),
        load_unet=False,
        load_text_encoders=False,
        family_options={"resolution_shift": 32},
    )
    mu = 0.5 + (64 - 256) * (1.15 - 0.5) / (4096 - 256)
    expected = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).time_shift(mu, 1.0, grid)
    shifted_process = shifted.family.process(shifted.noise_scheduler)
    torch.testing.assert_close(shifted_process.sigmas.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(shifted_process.model_timesteps.double(), expected * T, rtol=1e-6, atol=1e-3)
    # the trainer's flag; refused for a family that samples on a fixed schedule
    summary = _flux_run(tiny_flux_path, pairs_path, tmp_path / "s", use_lora=True, max_train_steps=1,
                        resolution_shift=True)  # fmt: skip
    assert torch.equal(summary["models"].process.sigmas, shifted_process.sigmas)
    with pytest.raises(ValueError, match="--resolution_shift: SD3 models sample on a fixed schedule"):
        family_for_index({"_class_name": "StableDiffusion3Pipeline"}, resolution_shift=1024)


def test_flux_lora_targets_are_diffusers_flux_list(tiny_flux_path):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    model = FluxTransformer2DModel.from_pretrained(tiny_flux_path, subfolder="transformer")
    model.add_adapter(LoraConfig(r=4, target_modules=list(FluxFamily.lora_target_modules)))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    # 12 in the double block; by suffix the single block's to_q/k/v, not its proj_mlp/proj_out
    assert len(adapted) == 15
    assert {n for n in adapted if n.startswith("single")} == {
        f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"
    }


# ---- the trainer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_flux_trains_saves_loads_in_flux_pipeline_and_evaluates(
    tmp_path, tiny_flux_path, pairs_path, use_lora
):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(tiny_flux_path, subfolder="transformer").state_dict()
    out = tmp_path / "out"
    extra = dict(use_lora=True, rank=4, lora_alpha=8) if use_lora else {}
    summary = _flux_run(tiny_flux_path, pairs_path, out, validation_dataset_name=pairs_path,
                        num_validation_pairs=8, validation_steps=3, **extra)  # fmt: skip
    rows = _rows(out)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # policy == reference at step 1
    assert rows[0]["rewards/accuracies"] == 0.5
    assert 0.0 <= rows[-1]["eval/implicit_acc"] <= 1.0  # held-out implicit accuracy
    assert summary["models"].ref_unet is None if use_lora else summary["models"].ref_unet is not None
    # the resolved T5 length and guidance are recorded, for sampling again
    saved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert saved["max_sequence_length"] == T5_LENGTH and saved["guidance_scale"] == 3.5
    sample = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=T5_LENGTH, output_type="np")
    if use_lora:
        from safetensors import safe_open

        with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
        pipe = FluxPipeline.from_pretrained(tiny_flux_path)
        plain = pipe("a red circle", generator=torch.Generator().manual_seed(0), **sample).images
        pipe.load_lora_weights(out)
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
        (config,) = pipe.transformer.peft_config.values()
        assert (config.r, config.lora_alpha) == (4, 8)  # loaded at the trained scale alpha/rank
    else:
        pipe = FluxPipeline.from_pretrained(out)
        trained = pipe.transformer.state_dict()
        assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **sample).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    if use_lora:
        assert not (image == plain).all()  # the adapter changes what the pipeline draws

    # the evaluation suite samples the output at its trained T5 length and guidance, whatever
    # --guidance_scale says (the pipeline's CFG scale for the other families)
    import numpy as np
    from PIL import Image

    from diffusion_dpo.evaluation.generate import (
        GenerationSettings,
        generate_images,
        resolve_model,
        trained_sampling_kwargs,
    )

    spec = resolve_model("trained", str(out))
    assert trained_sampling_kwargs(spec) == {"max_sequence_length": T5_LENGTH, "guidance_scale": 3.5}
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=7.5, resolution=32)
    paths, made = generate_images(spec, ["a red circle"], [0], settings, tmp_path / "images", progress=False)
    assert made == 1
    again = pipe(["a red circle"], generator=[torch.Generator("cpu").manual_seed(0)], guidance_scale=3.5,
                 **{**sample, "output_type": "pil"}).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(paths[0][0])), np.asarray(again))


def test_flux_guidance_scale_is_one_value_for_policy_reference_and_sampling(
    tmp_path, tiny_flux_path, pairs_path
):
    out = tmp_path / "g1"
    summary = _flux_run(tiny_flux_path, pairs_path, out, use_lora=True, max_train_steps=1, guidance_scale=1.0)
    family = summary["models"].components.family
    pooled = torch.zeros(2, 32)
    cond = family.added_conditioning(pooled, None, ["_w", "_l"], 32, torch.float32, "cpu")
    assert torch.equal(cond["guidance"], torch.ones(4))  # winners and losers, policy and reference
    assert family.sampling_kwargs()["guidance_scale"] == 1.0
    assert yaml.safe_load((out / "training_config.yaml").read_text())["guidance_scale"] == 1.0


@pytest.mark.parametrize("loss_type", PAIRWISE_LOSSES)
def test_every_pairwise_loss_runs_on_flux_and_starts_at_its_zero_value(
    tiny_flux_path, pairs_path, loss_type, tmp_path
):
    from diffusion_dpo.training.data_setup import build_train_data
    from diffusion_dpo.training.models import setup_models
    from diffusion_dpo.training.step import compute_batch_loss

    argv = tiny_run_flags(tiny_flux_path, pairs_path, tmp_path, max_sequence_length=T5_LENGTH, beta_dpo=500,
                          use_lora=True, rank=4, loss_type=loss_type,
                          label_smoothing=0.1 if loss_type == "exo_pair" else 0.0)  # fmt: skip
    cfg = parse_config(argv)
    models = setup_models(cfg, "cpu")
    data = build_train_data(cfg, False)
    data.start_epoch(0)
    batch = next(iter(data.loader))
    loss, metrics = compute_batch_loss(models, batch, cfg)
    zero = torch.zeros(len(batch["captions"]))
    expected, _, _ = pairwise_loss_from_logratios(zero, zero, beta=cfg.beta_dpo, loss_type=loss_type,
                                                  label_smoothing=cfg.label_smoothing)  # fmt: skip
    # the LoRA starts as its reference
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    grads = [p.grad for n, p in models.unet.named_parameters() if "lora_A" in n]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("objective", ["sft", "kto", "mapo"])
def test_sft_kto_and_mapo_train_flux(tmp_path, tiny_flux_path, pairs_path, objective):
    data = pairs_path
    if objective == "kto":
        data = synthetic.write_unpaired_dataset(tmp_path / "kto.parquet", 16, seed=0)
    out = tmp_path / objective
    _flux_run(tiny_flux_path, data, out, objective=objective, use_lora=True, rank=4, max_train_steps=2)
    rows = _rows(out)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    from safetensors.torch import load_file

    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0: it trained


def test_flux_lora_resumes_exactly(tmp_path, tiny_flux_path, pairs_path):
    common = dict(max_train_steps=4, checkpointing_steps=2, train_batch_size=2, use_lora=True, rank=4)
    straight = _flux_run(tiny_flux_path, pairs_path, tmp_path / "straight", **common)
    reset_accelerate()
    _flux_run(tiny_flux_path, pairs_path, tmp_path / "resumed", **{**common, "max_train_steps": 2})
    reset_accelerate()
    resumed = _flux_run(
        tiny_flux_path, pairs_path, tmp_path / "resumed", resume_from_checkpoint="latest", **common
    )
    a, b = straight["models"].unet.state_dict(), resumed["models"].unet.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert _rows(tmp_path / "straight")[-1]["loss"] == pytest.approx(_rows(tmp_path / "resumed")[-1]["loss"])


# ---- 2 processes ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_the_flux_lora_one_process_trains(tmp_path, tiny_flux_path, pairs_path):
    """`accelerate launch` with 2 CPU processes (gloo), 1 row each, equals 1 process with 2 rows."""
    from safetensors.torch import load_file

    common = dict(
        pretrained_model_name_or_path=tiny_flux_path, dataset_name=pairs_path, resolution=32,
        max_train_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2, adam_epsilon=1.0,
        lr_warmup_steps=0, checkpointing_steps=100, seed=0, use_lora=True, rank=4,
        max_sequence_length=T5_LENGTH, beta_dpo=500, validation_dataset_name=pairs_path,
        num_validation_pairs=6, validation_steps=3,
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    script = [str(ROOT / "train_sd.py")]
    one = [sys.executable, *script, *flags({**common, "output_dir": tmp_path / "one", "train_batch_size": 2})]
    two = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
        str(_free_port()), "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", *script, *flags({**common, "output_dir": tmp_path / "two", "train_batch_size": 1}),
    ]  # fmt: skip
    for cmd in (one, two):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    a, b = (load_file(tmp_path / n / "pytorch_lora_weights.safetensors") for n in ("one", "two"))
    update = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # B starts at 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert update > 1e-5 and diff < 1e-3 * update, (diff, update)
    for r1, r2 in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two"), strict=True):
        for key in ("loss", "rewards/accuracies", "eval/implicit_acc"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-3, abs=1e-4), (r1["step"], key)


# ---- the synthetic experiment's FLUX.1 arch ------------------------------------------------------------


def test_the_synthetic_experiments_flux_base_and_stage_configs(monkeypatch):
    import numpy as np
    from diffusers import FluxPipeline
    from trainer_runs import load_synthetic_experiment

    from diffusion_dpo.synthetic.vae import build_base_pipeline, fit_vae, images_to_tensor

    rng = np.random.default_rng(0)
    pixels = images_to_tensor([synthetic.render(synthetic.sample_spec(rng), rng, 32) for _ in range(8)])
    vae = fit_vae(pixels, steps=2, batch_size=4, seed=0, latent_channels=16)
    pipe = build_base_pipeline(vae, seed=0, resolution=32, arch="flux")
    assert isinstance(pipe, FluxPipeline) and pipe.vae is vae
    config = pipe.transformer.config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads) == (2, 2, 4)
    assert config.guidance_embeds
    exp = load_synthetic_experiment(monkeypatch)
    args = exp.parse_args(["--output_dir", "x", "--arch", "flux", "--quick"])
    assert args.arch == "flux" and exp.scale_for("flux", True).train_steps["dpo"] == 100
    for stage in ("base", "dpo", "sft", "kto"):
        cfg = parse_config(["--config", str(exp.stage_config(stage, "flux"))])
        assert cfg.guidance_scale == 3.5 and cfg.max_sequence_length == T5_LENGTH
        assert cfg.proportion_empty_prompts == 0.0  # FLUX.1 samples without CFG
