"""Qwen-Image (diffusion_dpo/models/families/qwen_image.py) on a tiny pipeline built offline: recognised,
its prompt encoding and latents equal the pipeline's, the packed objective equals the unpacked formula
written out by hand, and the trainer trains it (every objective, LoRA and full, from images and from a
latent cache, resumed), saves what QwenImagePipeline loads, and the evaluation suite samples it."""

import copy
import json

import pytest
import torch
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.diffusion import pair_logratios
from diffusion_dpo.diffusion.processes import FlowMatchProcess
from diffusion_dpo.models.families import QwenImageFamily, family_for_index
from diffusion_dpo.models.families.qwen_image import QwenImageVAE
from diffusion_dpo.models.loading import encode_images, load_components
from diffusion_dpo.models.tiny import save_tiny_pipeline
from diffusion_dpo.models.tiny_qwen_image import TEMPLATE_DROP, build_tiny_qwen_tokenizer
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

L = 16  # text tokens per caption in these tests: the synthetic captions are at most 9 with the template tail
CAPTIONS = ["a red circle on a blue background", "", "a big green square"]


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("qwen") / "model", arch="qwen_image")


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return synthetic.write_pair_dataset(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 16, seed=0)


@pytest.fixture(scope="module")
def pipe(qwen_path):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(qwen_path)


@pytest.fixture(scope="module")
def comps(qwen_path):
    return load_components(str(qwen_path), family_options={"max_sequence_length": L})


def test_recognised_from_model_index_and_its_misuse_named(qwen_path):
    index = json.loads((qwen_path / "model_index.json").read_text())
    family = family_for_index(index)
    assert type(family) is QwenImageFamily and family.max_sequence_length == 512
    with pytest.raises(ValueError, match="only the text-to-image QwenImagePipeline"):
        family_for_index({**index, "_class_name": "QwenImageEditPipeline"})
    with pytest.raises(ValueError, match="--drop_t5: Qwen-Image has no T5"):
        family_for_index(index, drop_t5=True)
    with pytest.raises(ValueError, match="1 to 1024 text tokens"):
        family_for_index(index, max_sequence_length=2000)


def test_the_template_prefix_is_the_34_tokens_the_pipeline_drops(pipe):
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_DROP == 34
    assert len(build_tiny_qwen_tokenizer()(prefix).input_ids) == 34
    # so the states kept are the caption's (and the template's tail): different captions differ
    a, _ = pipe.encode_prompt(["a red circle"], device="cpu", max_sequence_length=L)
    b, _ = pipe.encode_prompt(["a green circle"], device="cpu", max_sequence_length=L)
    assert a.shape == b.shape and not torch.allclose(a[:, 1], b[:, 1])


def test_prompt_encoding_equals_the_pipelines_masks_included(comps, pipe):
    hidden, mask = comps.family.encode_prompts(comps, CAPTIONS, "cpu")
    assert hidden.shape == (3, L, 32) and mask.shape == (3, L)
    expected, expected_mask = pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=L)
    n = expected.shape[1]  # the pipeline pads to its batch's longest caption; the family to L
    torch.testing.assert_close(hidden[:, :n], expected, rtol=0, atol=0)
    assert torch.equal(mask[:, :n], expected_mask) and not mask[:, n:].any() and not hidden[:, n:].any()
    # and by hand: the template around each caption, the last hidden state, its first 34 tokens dropped
    for i, caption in enumerate(CAPTIONS):
        ids = pipe.tokenizer(pipe.prompt_template_encode.format(caption), return_tensors="pt").input_ids
        states = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 34:]
        assert int(mask[i].sum()) == len(states) and mask[i, : len(states)].all()
        torch.testing.assert_close(hidden[i, : len(states)], states, rtol=1e-5, atol=1e-6)


def test_latents_are_the_pipelines_per_channel_normalisation(comps, pipe):
    assert isinstance(comps.vae, QwenImageVAE)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    latents = encode_images(comps.vae, pixels, noise)
    dist = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist  # [2, 16, 1, 16, 16]
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    # diffusers' Qwen-Image LoRA script: (z − latents_mean) · (1 / latents_std)
    z = dist.mean + dist.std * noise.unsqueeze(2)
    torch.testing.assert_close(latents, ((z - mean) * (1.0 / std)).squeeze(2), rtol=1e-5, atol=1e-5)


def _perturbed(comps):
    policy = comps.unet.eval()
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref


def _pack_by_hand(x):
    # token (i, j) holds, channel by channel, the 2×2 patch [2i:2i+2, 2j:2j+2] in row-major order
    n, c, h, w = x.shape
    out = torch.empty(n, (h // 2) * (w // 2), 4 * c, dtype=x.dtype)
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, i * (w // 2) + j] = x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(n, 4 * c)
    return out


def _unpack_by_hand(tokens, c, h, w):
    n = tokens.shape[0]
    out = torch.empty(n, c, h, w, dtype=tokens.dtype)
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = tokens[:, i * (w // 2) + j].reshape(n, c, 2, 2)
    return out


def test_packed_objective_equals_the_unpacked_formula_by_hand(comps):
    torch.manual_seed(0)
    policy, ref = _perturbed(comps)
    process = comps.family.process(comps.noise_scheduler)
    assert isinstance(process, FlowMatchProcess)
    g = torch.Generator().manual_seed(2)
    b = 3
    lw, ll, noise = (torch.randn(b, 16, 16, 16, generator=g) for _ in range(3))
    hidden, mask = comps.family.encode_prompts(comps, CAPTIONS, "cpu")
    t = torch.tensor([30, 500, 990])
    rc, rr = pair_logratios(
        policy, ref, process, lw, ll, hidden, noise, t, {"encoder_hidden_states_mask": mask}
    )

    # by hand: σ = t'/1000 on the unshifted training grid (use_dynamic_shifting); the transformer takes σ
    T = 1000
    sigma = comps.noise_scheduler.sigmas[T - 1 - t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sigma.flatten(), (t.float() + 1) / T)  # index 0 = least noise

    def logratio(x0):
        xt = (1 - sigma) * x0 + sigma * noise
        v = noise - x0
        out = []
        for model in (policy, ref):
            pred = model(
                hidden_states=_pack_by_hand(xt),
                timestep=sigma.flatten(),
                encoder_hidden_states=hidden,
                encoder_hidden_states_mask=mask.bool(),
                img_shapes=[(1, 8, 8)] * b,
            ).sample
            # the mean over the unpacked [C, h, w] is the mean over the packed [h·w/4, 4C]
            err = (_unpack_by_hand(pred, 16, 16, 16).float() - v).pow(2).mean(dim=(1, 2, 3))
            torch.testing.assert_close(err, (pred.float() - _pack_by_hand(v)).pow(2).mean(dim=(1, 2)))
            out.append(err)
        return -0.5 * (out[0] - out[1])

    torch.testing.assert_close(rc, logratio(lw), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rr, logratio(ll), rtol=1e-5, atol=1e-7)
    assert rc.requires_grad and not (rc - rr).eq(0).all()


def test_the_padding_to_max_sequence_length_is_masked_out(comps, pipe):
    """The trainer pads every caption to L; the pipeline samples with its batch's own length: the image
    prediction is the same."""
    hidden, mask = comps.family.encode_prompts(comps, ["a red circle"], "cpu")
    short, short_mask = pipe.encode_prompt(["a red circle"], device="cpu", max_sequence_length=L)
    assert short_mask is None and short.shape[1] < L  # one caption: no padding at all in the pipeline
    x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(hidden_states=x, timestep=torch.tensor([0.5]), img_shapes=[(1, 8, 8)])
    with torch.no_grad():
        padded = pipe.transformer(encoder_hidden_states=hidden, encoder_hidden_states_mask=mask.bool(), **kw)
        plain = pipe.transformer(encoder_hidden_states=short, **kw)
    torch.testing.assert_close(padded.sample, plain.sample, rtol=1e-5, atol=1e-6)


# ---- Qwen-Image in the trainer ----------------------------------------------------------------------


def _run(model, data, out, **overrides):
    argv = tiny_run_flags(model, data, out, max_sequence_length=L, beta_dpo=500, **overrides)
    return train(parse_config(argv))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_trains_saves_and_the_output_loads_and_samples_in_qwen_image_pipeline(
    tmp_path, qwen_path, pairs_path, use_lora
):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    base = QwenImageTransformer2DModel.from_pretrained(qwen_path, subfolder="transformer").state_dict()
    out = tmp_path / "out"
    extra = dict(use_lora=True, rank=4) if use_lora else {}
    summary = _run(qwen_path, pairs_path, out, validation_dataset_name=pairs_path, num_validation_pairs=8,
                   validation_steps=2, validation_prompts=["a red circle"], num_inference_steps=2,
                   **extra)  # fmt: skip
    rows = _metrics(out)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # policy == reference at step 1
    assert rows[0]["rewards/accuracies"] == 0.5
    assert any(r["loss"] != pytest.approx(0.693147, abs=1e-4) for r in rows[1:])
    assert 0.0 <= summary["last_metrics"]["eval/implicit_acc"] <= 1.0  # held-out implicit accuracy
    assert (out / "validation" / "step-2" / "00.png").is_file()
    kw = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=L, negative_prompt=" ",
              true_cfg_scale=4.0, output_type="np")  # fmt: skip
    if use_lora:
        assert summary["models"].ref_unet is None
        pipe = QwenImagePipeline.from_pretrained(qwen_path)
        plain = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        pipe.load_lora_weights(out)
        assert sum("lora" in n for n, _ in pipe.transformer.named_parameters()) == 2 * 4 * 2  # 2 blocks
    else:
        assert summary["models"].ref_unet is not None
        pipe = QwenImagePipeline.from_pretrained(out)
        trained = pipe.transformer.state_dict()
        assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    if use_lora:
        assert not (image == plain).all()  # the adapter changes what the pipeline draws

    # eval/evaluate.py --implicit_pairs: the saved output's held-out implicit accuracy (LoRA: against its
    # adapters-disabled base; full: against the base model)
    from diffusion_dpo.training.validation import heldout_implicit_accuracy

    reference = None if use_lora else qwen_path
    accuracy = heldout_implicit_accuracy(
        out, str(pairs_path), reference=reference, resolution=32, max_pairs=4
    )
    assert 0.0 <= accuracy <= 1.0

    # the evaluation suite samples the output with the trained settings (text length, real CFG)
    from diffusion_dpo.evaluation.generate import (
        GenerationSettings,
        generate_images,
        resolve_model,
        trained_sampling_kwargs,
    )

    spec = resolve_model("trained", str(out))
    assert trained_sampling_kwargs(spec) == {
        "max_sequence_length": L,
        "true_cfg_scale": 4.0,
        "negative_prompt": " ",
    }
    # a base Qwen-Image folder samples with the same real CFG (only the text length is the pipeline's)
    base_kwargs = trained_sampling_kwargs(resolve_model("base", str(qwen_path)))
    assert base_kwargs == {"true_cfg_scale": 4.0, "negative_prompt": " "}
    paths, made = generate_images(
        spec, ["a red circle"], [0, 1], GenerationSettings(num_inference_steps=2, resolution=32),
        tmp_path / "images", progress=False,
    )  # fmt: skip
    assert made == 2 and all(p.is_file() for p in paths[0])


@pytest.mark.parametrize(
    "objective", ["sft", "mapo", "kto", "hinge", "ipo", "robust", "apo_zero", "discopop"]
)
def test_every_objective_runs(tmp_path, qwen_path, pairs_path, objective):
    if objective == "kto":
        data = synthetic.write_unpaired_dataset(tmp_path / "kto.parquet", 16, seed=0)
        extra = dict(objective="kto", use_lora=True)
    elif objective in ("sft", "mapo"):
        data, extra = pairs_path, dict(objective=objective)
    else:
        data, extra = pairs_path, dict(loss_type=objective, use_lora=True)
    summary = _run(qwen_path, data, tmp_path / "o", max_train_steps=2, **extra)
    metrics = summary["last_metrics"]
    assert torch.isfinite(torch.tensor(metrics["loss"])), metrics
    assert (summary["models"].ref_unet is None) == (
        objective in ("sft", "mapo") or extra.get("use_lora", False)
    )


def test_resumes_exactly(tmp_path, qwen_path, pairs_path):
    common = dict(max_train_steps=4, checkpointing_steps=2, train_batch_size=2, use_lora=True, rank=4)
    straight = _run(qwen_path, pairs_path, tmp_path / "straight", **common)["models"]
    reset_accelerate()
    _run(qwen_path, pairs_path, tmp_path / "resumed", **{**common, "max_train_steps": 2})
    reset_accelerate()
    resumed = _run(qwen_path, pairs_path, tmp_path / "resumed", resume_from_checkpoint="latest", **common)
    a, b = straight.unet.state_dict(), resumed["models"].unet.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["loss"] for r in _metrics(tmp_path / "straight")][2:] == pytest.approx(
        [r["loss"] for r in _metrics(tmp_path / "resumed")][-2:], abs=1e-5
    )


def test_a_run_from_the_latent_cache_trains_what_a_run_from_images_trains(tmp_path, qwen_path, pairs_path):
    from diffusion_dpo.data.latent_cache_writer import write_latent_cache

    cache = tmp_path / "cache"
    write_latent_cache(
        cache, pretrained_model_name_or_path=str(qwen_path), dataset_name=str(pairs_path), resolution=32,
        batch_size=3, shard_size=4, max_sequence_length=L,
    )  # fmt: skip
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["settings"]["model"]["family"] == "qwen_image"
    assert manifest["shapes"] == {
        "latents": [16, 16, 16],
        "prompt_embeds": [L, 32],
        "pooled_prompt_embeds": [L],
    }
    common = dict(max_train_steps=3, train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                  adam_epsilon=1.0, proportion_empty_prompts=0.3)  # fmt: skip
    images = _run(qwen_path, pairs_path, tmp_path / "images", **common)
    reset_accelerate()
    cached = _run(qwen_path, pairs_path, tmp_path / "cached", latents_cache=str(cache), **common)
    assert cached["models"].components.text_encoders == []
    a, b = images["models"].unet.state_dict(), cached["models"].unet.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    losses = [[r["loss"] for r in _metrics(tmp_path / name)] for name in ("images", "cached")]
    assert losses[0][0] == pytest.approx(0.693147, abs=1e-6)
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    # the run from the cache saved a whole pipeline with the base model's text encoder
    assert (tmp_path / "cached" / "text_encoder").is_dir()


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, qwen_path, pairs_path):
    """2 CPU processes (gloo, ``accelerate launch``) with 1 row each train the weights of 1 process with
    2 rows: the masked, padded text states and the packed latents batch like every other family's."""
    from safetensors.torch import load_file
    from test_distributed import _rows, _train

    common = dict(
        pretrained_model_name_or_path=qwen_path, dataset_name=pairs_path, resolution=32, max_train_steps=3,
        gradient_accumulation_steps=2, learning_rate=1e-2, adam_epsilon=1.0, lr_warmup_steps=0,
        checkpointing_steps=100, seed=0, max_sequence_length=L, beta_dpo=500, use_lora=True, rank=4,
        validation_dataset_name=pairs_path, num_validation_pairs=6, validation_steps=3,
    )  # fmt: skip
    _train(1, output_dir=tmp_path / "one", train_batch_size=2, **common)
    _train(2, output_dir=tmp_path / "two", train_batch_size=1, **common)
    a, b = (load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("one", "two"))
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # lora_B starts at zero
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4 and diff < 1e-3 * moved, (diff, moved)
    for r1, r2 in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two"), strict=True):
        for key in ("loss", "rewards/accuracies", "eval/implicit_acc"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-3, abs=1e-4), (r1["step"], key)


# ---- the benchmark's architectures --------------------------------------------------------------------


def test_bench_tiny_qwen_image_step_flops_on_meta_equal_a_real_step(tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffusion_dpo.bench import archs
    from diffusion_dpo.bench.measure import cached_shapes, count_flops, make_batch, step_flops
    from diffusion_dpo.training.config import TrainConfig
    from diffusion_dpo.training.models import setup_models
    from diffusion_dpo.training.step import compute_batch_loss

    path = archs.ensure_model("tiny_qwen_image", tmp_path)
    options = archs.ARCHS["tiny_qwen_image"].train_options
    cfg = TrainConfig(
        pretrained_model_name_or_path=str(path),
        dataset_name="x",
        resolution=32,
        train_batch_size=2,
        **options,
    )
    models = setup_models(cfg, "cpu")
    shapes = cached_shapes(cfg)
    assert shapes == {"latent": [16, 16, 16], "text": [L, 32], "pooled": [L]}  # "pooled": the text mask
    counts = []
    for cached in (False, True):
        batch = make_batch(cfg, micro_conditioning=False, shapes=shapes if cached else None)

        def step(batch=batch):
            loss, _ = compute_batch_loss(models, batch, cfg)
            loss.backward()

        with sdpa_kernel([SDPBackend.MATH]):  # counted as the meta device counts attention
            counts.append(count_flops(step))
            # uncached: the text encoder on the meta device runs without encode_prompt's data-dependent
            # steps (families/qwen_image.py::_meta_encoding), the same products
            assert counts[-1] == step_flops(cfg, cached=cached) > 0
    assert counts[1] < counts[0]  # no VAE or text encoder in a cached step


def test_bench_qwen_image_is_the_published_architecture_and_its_flops_count_right():
    """Qwen/Qwen-Image's configs, instantiated on the meta device only: 20.4B transformer parameters, 8.3B
    in the text encoder. The forward FLOPs of a pair at 1024 px (4096 image and 128 text tokens) are the
    hand count: every block's linear layers on its stream's tokens, joint attention over both."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from diffusion_dpo.bench import archs
    from diffusion_dpo.bench.measure import count_flops

    arch = archs.ARCHS["qwen_image"]
    assert arch.family == "qwen_image" and arch.resolution == 1024
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**archs.QWEN_IMAGE_TRANSFORMER).requires_grad_(False)
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**archs.QWEN25_VL_7B))
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(20.43e9, rel=1e-3)
    assert sum(p.numel() for p in text_encoder.parameters()) == pytest.approx(8.29e9, rel=1e-3)
    n, image, text, width, blocks = 2, 4096, 128, 3072, 60
    kw = dict(
        hidden_states=torch.empty(n, image, 64, device="meta"),
        encoder_hidden_states=torch.empty(n, text, 3584, device="meta"),
        encoder_hidden_states_mask=torch.ones(n, text, dtype=torch.bool, device="meta"),
        timestep=torch.full((n,), 0.5, device="meta"), img_shapes=[(1, 64, 64)] * n,
    )  # fmt: skip
    flops = count_flops(lambda: transformer(**kw))
    per_token = 4 * width * width + 2 * width * 4 * width  # q, k, v, out + the 4×-wide MLP, per stream
    attention = 2 * 2 * (image + text) ** 2 * width  # QKᵀ and AV over the joint sequence
    by_hand = n * blocks * (2 * (image + text) * per_token + attention)
    assert flops == pytest.approx(by_hand, rel=0.02)  # the rest: embeddings, modulation, the output layer


def test_heldout_accuracy_of_the_base_against_itself_is_one_half(qwen_path, pairs_path):
    """Every pair ties when the model is its own reference: the held-out scoring is wired (VAE wrapper,
    mask, packed call) so that nothing but the weights separates model and reference."""
    from diffusion_dpo.training.validation import heldout_implicit_accuracy

    accuracy = heldout_implicit_accuracy(
        qwen_path, str(pairs_path), reference=qwen_path, resolution=32, max_pairs=4
    )
    assert accuracy == 0.5
    with pytest.raises(ValueError, match="no default image size: pass a resolution"):
        heldout_implicit_accuracy(qwen_path, str(pairs_path), reference=qwen_path)


def test_lora_dpo_learns_the_pairs_it_trains_on(tmp_path, qwen_path):
    """A real learning signal: 50 LoRA steps on 16 pairs and the implicit reward prefers the winner on
    almost all of them (exactly 0.5 at the start, where the adapters do nothing). Measured: 0.975."""
    data = synthetic.write_pair_dataset(tmp_path / "few.parquet", 16, seed=3, tie_fraction=0.0)
    summary = _run(
        qwen_path, data, tmp_path / "out", validation_dataset_name=data, num_validation_pairs=16,
        validation_steps=1000, max_train_steps=50, train_batch_size=16, learning_rate=1e-3,
        proportion_empty_prompts=0.0, no_hflip=True, use_lora=True, rank=8,
    )  # fmt: skip
    assert summary["last_metrics"]["eval/implicit_acc"] >= 0.75
