"""Model families (diffusion_dpo/models/families): SD1.5/SDXL unchanged through them, SD3's flow objective
pinned to its formula, SD3's prompt encoding equal to the pipeline's, and the trainer on a tiny SD3."""

import copy
import json

import pytest
import torch
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.diffusion import draw_for_rows, pair_logratios
from diffusion_dpo.diffusion.processes import DDPMProcess, FlowMatchProcess
from diffusion_dpo.models.families import SD3Family, SDFamily, SDXLFamily, family_for_index
from diffusion_dpo.models.families.sd3 import sd3_call
from diffusion_dpo.models.loading import load_components
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.loop import train
from diffusion_dpo.training.models import setup_models
from diffusion_dpo.training.step import compute_batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return synthetic.write_pair_dataset(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 16, seed=0)


def _index(**parts):
    return {k: (["x", "Y"] if v else [None, None]) for k, v in parts.items()}


def test_families_are_told_from_model_index():
    assert type(family_for_index(_index(unet=1, text_encoder=1, text_encoder_2=0))) is SDFamily
    assert type(family_for_index(_index(unet=1, text_encoder=1, text_encoder_2=1))) is SDXLFamily
    sd3 = family_for_index(
        {"_class_name": "StableDiffusion3Pipeline", **_index(transformer=1, text_encoder_3=0)}
    )
    assert type(sd3) is SD3Family and sd3.max_sequence_length == 77
    with pytest.raises(ValueError, match="Flux is not supported yet"):
        family_for_index({"_class_name": "FluxPipeline", **_index(transformer=1)})
    with pytest.raises(ValueError, match="not a Stable Diffusion"):
        family_for_index({"_class_name": "AudioLDMPipeline", **_index(vocoder=1)})
    with pytest.raises(ValueError, match="--drop_t5: SD models have no T5"):
        family_for_index(_index(unet=1, text_encoder=1), drop_t5=True)


def _batch(sdxl: bool, b: int = 3):
    g = torch.Generator().manual_seed(1)
    batch = {
        "captions": ["a red circle", "", "a blue square on a white background"][:b],
        "indices": torch.tensor([5, 9, 2])[:b],
        "epoch": 1,
        "pixel_values_w": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
        "pixel_values_l": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
    }
    if sdxl:
        for s in ("_w", "_l"):
            batch[f"original_sizes{s}"] = torch.tensor([[32, 32], [40, 48], [64, 32]])[:b]
            batch[f"crop_top_lefts{s}"] = torch.tensor([[0, 0], [4, 8], [0, 16]])[:b]
    return batch


def _pre_family_dpo_loss(models, batch, cfg, sdxl):
    """The DPO step as the trainer computed it before model families, written out: DDPM draws per row,
    the VAE posterior sample, CLIP states (SDXL: both penultimate states, the second pool, time ids),
    ``scheduler.add_noise``, the UNet's positional call, ε target, −logσ(−0.5·β·(Δθ − Δref))."""
    comps = models.components
    sched, vae = comps.noise_scheduler, comps.vae
    n = len(batch["captions"])
    draws = draw_for_rows(cfg.seed, 1, batch["indices"], (4, 16, 16), 1000, images_per_row=2)
    dist = vae.encode(torch.cat([batch["pixel_values_w"], batch["pixel_values_l"]])).latent_dist
    latents = (dist.mean + dist.std * draws.posterior.flatten(0, 1)) * vae.config.scaling_factor

    def ids(tokenizer):
        return tokenizer(
            batch["captions"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip

    cond = None
    if not sdxl:
        hidden = comps.text_encoders[0](ids(comps.tokenizers[0]))[0]
    else:
        outs = [
            enc(ids(tok), output_hidden_states=True)
            for tok, enc in zip(comps.tokenizers, comps.text_encoders)
        ]
        hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        sizes = torch.cat([batch["original_sizes_w"], batch["original_sizes_l"]])
        crops = torch.cat([batch["crop_top_lefts_w"], batch["crop_top_lefts_l"]])
        target_size = torch.tensor([32, 32]).expand(2 * n, 2)
        cond = {
            "text_embeds": torch.cat([outs[1][0]] * 2),
            "time_ids": torch.cat([sizes, crops, target_size], dim=1).float(),
        }
    hidden2, noise2, t2 = (
        torch.cat([hidden] * 2),
        torch.cat([draws.noise] * 2),
        torch.cat([draws.timesteps] * 2),
    )
    noisy = sched.add_noise(latents, noise2, t2)
    target = noise2 if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise2, t2)
    model_err = (
        (models.unet(noisy, t2, hidden2, added_cond_kwargs=cond).sample - target).pow(2).flatten(1).mean(1)
    )
    with torch.no_grad():
        ref_err = (
            (models.ref_unet(noisy, t2, hidden2, added_cond_kwargs=cond).sample - target)
            .pow(2)
            .flatten(1)
            .mean(1)
        )
    logratio = -0.5 * (model_err - ref_err)
    inside = cfg.beta_dpo * (logratio[:n] - logratio[n:])
    return -torch.nn.functional.logsigmoid(inside).mean()


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_sd15_and_sdxl_losses_are_bit_identical_to_the_pre_family_step(tiny_sd_path, tiny_sdxl_path, sdxl):
    model = tiny_sdxl_path if sdxl else tiny_sd_path
    cfg = parse_config(["--pretrained_model_name_or_path", str(model), "--dataset_name", "x", "--resolution", "32",
                        "--beta_dpo", "500", "--seed", "3"])  # fmt: skip
    models = setup_models(cfg, "cpu")
    with torch.no_grad():  # a policy that differs from its reference, so the loss is not ln 2
        for p in models.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = _batch(sdxl)
    assert isinstance(models.process, DDPMProcess)
    loss, _ = compute_batch_loss(models, batch, cfg)
    expected = _pre_family_dpo_loss(models, batch, cfg, sdxl)
    assert abs(loss.item() - 0.6931) > 1e-3
    assert torch.equal(loss, expected), (loss.item(), expected.item())


# ---- SD3: the flow objective ---------------------------------------------------------------------


def _sd3_parts(path):
    comps = load_components(str(path), family_options={"max_sequence_length": 16})
    policy = comps.unet.eval()
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return comps, policy, ref


def test_flow_pair_logratios_equal_the_hand_written_rectified_flow_formula(tiny_sd3_path):
    torch.manual_seed(0)
    comps, policy, ref = _sd3_parts(tiny_sd3_path)
    process = comps.family.process(comps.noise_scheduler)
    assert isinstance(process, FlowMatchProcess)
    g = torch.Generator().manual_seed(2)
    b = 3
    lw, ll, noise = (torch.randn(b, 16, 16, 16, generator=g) for _ in range(3))
    hidden, pooled = comps.family.encode_prompts(comps, ["a red circle", "", "a green square"], "cpu")
    cond = {"pooled_projections": pooled}
    t = torch.tensor([30, 500, 990])
    rc, rr = pair_logratios(policy, ref, process, lw, ll, hidden, noise, t, cond)

    # by hand: σ from the scheduler's own (shifted, noisiest-first) training schedule; the winner and
    # the loser share ε and σ; velocity target ε − x0; per-sample mean squared error in fp32
    T = comps.noise_scheduler.config.num_train_timesteps
    sched_sigmas, sched_timesteps = comps.noise_scheduler.sigmas, comps.noise_scheduler.timesteps
    sigma = sched_sigmas[T - 1 - t].view(-1, 1, 1, 1)
    model_t = sched_timesteps[T - 1 - t]
    assert torch.allclose(model_t, sigma.flatten() * 1000)
    assert sigma[0].item() < 0.2 < 0.9 < sigma[2].item()  # index 0 = least noise, as for DDPM

    def logratio(x0):
        xt = (1 - sigma) * x0 + sigma * noise
        v = noise - x0
        out = []
        for model in (policy, ref):
            pred = model(
                hidden_states=xt, timestep=model_t, encoder_hidden_states=hidden, pooled_projections=pooled
            ).sample
            out.append((pred.float() - v.float()).pow(2).mean(dim=(1, 2, 3)))
        return -0.5 * (out[0] - out[1])

    # (winners and losers run as one batch of 2B here, one batch of B each by hand: last-bit differences)
    torch.testing.assert_close(rc, logratio(lw), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rr, logratio(ll), rtol=1e-5, atol=1e-7)
    assert rc.requires_grad
    assert not (rc - rr).eq(0).all()


def test_flow_reference_runs_without_gradient_or_as_the_adapters_disabled_base(tiny_sd3_path):
    from peft import LoraConfig

    from diffusion_dpo.diffusion import pair_denoising_errors

    torch.manual_seed(0)
    comps, policy, ref = _sd3_parts(tiny_sd3_path)
    process = comps.family.process(comps.noise_scheduler)
    g = torch.Generator().manual_seed(4)
    lw, ll, noise = (torch.randn(2, 16, 16, 16, generator=g) for _ in range(3))
    hidden, pooled = comps.family.encode_prompts(comps, ["a red circle", "a cat"], "cpu")
    args = (process, lw, ll, hidden, noise, torch.tensor([100, 700]), {"pooled_projections": pooled})
    model_err, ref_err = pair_denoising_errors(policy, ref, *args)
    assert model_err.requires_grad and not ref_err.requires_grad
    # LoRA: the reference is the same transformer with its adapters switched off
    base = copy.deepcopy(ref)
    base_err, _ = pair_denoising_errors(base, ref, *args)
    base.add_adapter(
        LoraConfig(r=4, init_lora_weights="gaussian", target_modules=list(SD3Family.lora_target_modules))
    )
    with torch.no_grad():  # B starts at zero (the adapted model starts as the base): a trained adapter
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora_err, lora_ref_err = pair_denoising_errors(base, None, *args)
    torch.testing.assert_close(lora_ref_err, base_err.detach(), rtol=0, atol=0)
    assert not torch.allclose(lora_err, base_err)  # the adapters do change the trained model's errors
    assert any(p.requires_grad for n, p in base.named_parameters() if "lora" in n)


def test_flow_sigma_draw_and_error_weighting(tiny_sd3_path):
    comps = load_components(str(tiny_sd3_path), load_unet=False)
    sched = comps.noise_scheduler
    T = sched.config.num_train_timesteps
    draws = {}
    for scheme in ("logit_normal", "none"):
        process = FlowMatchProcess(sched, sd3_call, weighting_scheme=scheme)
        g = torch.Generator().manual_seed(0)
        t = torch.cat([process.sample_timestep(g) for _ in range(4000)])
        assert t.dtype == torch.long and 0 <= t.min() and t.max() < T
        draws[scheme] = process.sigmas[t]
    # logit-normal u (median 1/2) through SD3's shift 3: σ = 3s/(1 + 2s) has median 0.75
    assert draws["logit_normal"].median().item() == pytest.approx(0.75, abs=0.03)
    # uniform positions: the shifted schedule's σ quantiles, e.g. P(σ ≤ 0.5) = P(s ≤ 1/4) = 1/4
    assert (draws["none"] <= 0.5).float().mean().item() == pytest.approx(0.25, abs=0.03)

    # epsilon weighting: ε̂ − ε = (1 − σ)(v̂ − v) for ε̂ = x_σ + (1 − σ)·v̂, so the weighted velocity
    # error is the ε-space error exactly
    process = FlowMatchProcess(sched, sd3_call, error_weighting="epsilon")
    g = torch.Generator().manual_seed(1)
    x0, eps, v_hat = (torch.randn(3, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([10, 400, 900])
    sigma = process.sigma(t, x0)
    xt = process.add_noise(x0, eps, t)
    eps_hat = xt + (1 - sigma) * v_hat
    v_err = (v_hat - process.target(x0, eps, t)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(
        v_err * process.error_weights(t).double(),
        (eps_hat - eps).pow(2).flatten(1).mean(1),
        rtol=1e-5,
        atol=0,
    )
    assert FlowMatchProcess(sched, sd3_call).error_weights(t) is None  # the default: a constant β
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchProcess(sched, sd3_call, weighting_scheme="uniform")


@pytest.mark.parametrize("drop_t5", [False, True], ids=["t5", "no_t5"])
def test_sd3_prompt_encoding_equals_the_pipelines(tiny_sd3_path, drop_t5):
    from diffusers import StableDiffusion3Pipeline

    comps = load_components(
        str(tiny_sd3_path), family_options={"drop_t5": drop_t5, "max_sequence_length": 16}
    )
    assert len(comps.text_encoders) == (2 if drop_t5 else 3)
    parts = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, **parts)
    captions = ["a red circle on a blue background", ""]
    hidden, pooled = comps.family.encode_prompts(comps, captions, "cpu")
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        captions, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
    )
    # the same tokens through the same encoders (T5 may differ from the pipeline's in the last bits)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)


# ---- SD3 in the trainer ----------------------------------------------------------------------------


def _sd3_run(model, data, out, **overrides):
    argv = tiny_run_flags(model, data, out, max_sequence_length=16, beta_dpo=500, **overrides)
    return train(parse_config(argv))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_sd3_trains_saves_and_the_output_loads_in_the_sd3_pipeline(
    tmp_path, tiny_sd3_path, pairs_path, use_lora
):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer").state_dict()
    out = tmp_path / "out"
    extra = dict(use_lora=True, rank=4) if use_lora else {}
    summary = _sd3_run(tiny_sd3_path, pairs_path, out, validation_dataset_name=pairs_path, num_validation_pairs=8,
                       validation_steps=100, **extra)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # policy == reference at step 1
    assert all(r["mse/model_chosen"] > 0 for r in rows)
    assert summary["models"].ref_unet is None if use_lora else summary["models"].ref_unet is not None
    if use_lora:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
        plain = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                     generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
        pipe.load_lora_weights(out)
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(out)
        trained = pipe.transformer.state_dict()
        assert any(not torch.equal(trained[k], base[k]) for k in base)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    if use_lora:
        assert not (image == plain).all()  # the adapter changes what the pipeline draws

    # the evaluation suite generates from the output (a LoRA on its base, or the pipeline folder) at
    # the pipeline's default size, read from the transformer's config
    from diffusion_dpo.evaluation.generate import (
        GenerationSettings,
        default_image_size,
        generate_images,
        resolve_model,
    )

    spec = resolve_model("trained", str(out))
    assert default_image_size(spec) == (32, 32)
    paths, made = generate_images(
        spec, ["a red circle"], [0, 1], GenerationSettings(num_inference_steps=2, guidance_scale=2.0),
        tmp_path / "images", progress=False,
    )  # fmt: skip
    assert made == 2 and all(p.is_file() for p in paths[0])


def test_sd3_without_t5_resumes_exactly_and_saves_a_pipeline_without_t5(tmp_path, tiny_sd3_path, pairs_path):
    from diffusers import DiffusionPipeline

    from diffusion_dpo.training.saving import load_trained_pipeline

    common = dict(max_train_steps=4, checkpointing_steps=2, train_batch_size=2, drop_t5=True)
    summary = _sd3_run(tiny_sd3_path, pairs_path, tmp_path / "straight", **common)
    straight = summary["models"]
    assert len(straight.components.text_encoders) == 2
    reset_accelerate()
    _sd3_run(tiny_sd3_path, pairs_path, tmp_path / "resumed", **{**common, "max_train_steps": 2})
    reset_accelerate()
    resumed = _sd3_run(
        tiny_sd3_path, pairs_path, tmp_path / "resumed", resume_from_checkpoint="latest", **common
    )
    a, b = straight.unet.state_dict(), resumed["models"].unet.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    index = json.loads((tmp_path / "straight" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]  # trained without T5, saved without it
    pipe = load_trained_pipeline(tmp_path / "straight")
    assert pipe.text_encoder_3 is None
    # the run's summary tells users how to load it
    from diffusion_dpo.training.summary import describe_run

    cfg = parse_config(tiny_run_flags(tiny_sd3_path, pairs_path, tmp_path / "straight", drop_t5=True))
    hint = describe_run(cfg, summary)
    assert "text_encoder_3=None, tokenizer_3=None" in hint
    with pytest.raises(ValueError):  # what a plain load says about such a folder: we pass the Nones
        DiffusionPipeline.from_pretrained(tmp_path / "straight")


def test_flow_sigma_draws_belong_to_rows_whatever_the_batching(tiny_sd3_path):
    """A row's σ is drawn from its own (seed, epoch, index) generator, like its noise: 2 processes with
    2 rows each draw what 1 process with 4 rows draws (end to end with accelerate launch:
    test_distributed.py::test_two_processes_train_the_sd3_transformer_that_one_process_trains), and rows
    draw distinct levels."""
    comps = load_components(str(tiny_sd3_path), load_unet=False)
    process = comps.family.process(comps.noise_scheduler)

    def draws(indices):
        return draw_for_rows(0, 2, indices, (16, 4, 4), 1000, 2, sample_timestep=process.sample_timestep)

    whole, first, second = draws([7, 3, 11, 0]), draws([7, 3]), draws([11, 0])
    assert torch.equal(whole.timesteps, torch.cat([first.timesteps, second.timesteps]))
    assert torch.equal(whole.noise, torch.cat([first.noise, second.noise]))
    assert len(set(whole.timesteps.tolist())) == 4
    # and not the uniform DDPM draw of the same generators
    assert not torch.equal(whole.timesteps, draw_for_rows(0, 2, [7, 3, 11, 0], (16, 4, 4), 1000, 2).timesteps)
