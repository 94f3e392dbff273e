"""Precomputed latents and text embeddings (``data/precompute_latents.py``, ``--latents_cache``).

Training from the cache must be training from the images, minus the encoders: the same rows at the
same positions, the same flips and caption dropout (drawn by each row's generator), the same posterior
noise applied to the cached mean and std. The images are 32 × 37, so the center crop of a 32 px run has
an odd slack (5 px): the crop of a flipped image is then not the flip of the crop, and only encoding
each orientation as the transform makes it gives the on-the-fly latents.
"""

import contextlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from trainer_runs import flags, reset_accelerate

from diffusion_dpo import synthetic
from diffusion_dpo.data.latent_cache import CachedPairTransform, open_latent_cache
from diffusion_dpo.data.latent_cache_writer import write_latent_cache
from diffusion_dpo.data.transforms import BadRowError, row_rng
from diffusion_dpo.models.loading import encode_prompts, load_components
from diffusion_dpo.training import loop
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.data_setup import build_train_data
from diffusion_dpo.training.loop import train
from diffusion_dpo.training.models import setup_models
from diffusion_dpo.training.step import compute_batch_loss

RESOLUTION = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _widened(png: bytes) -> bytes:
    # 32 × 32 -> 32 high × 37 wide: the 32 px center crop then starts at column round(5 / 2) = 2
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).resize((37, 32), Image.Resampling.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    # 16 pairs of 32 × 37 images, 2 of them ties (dropped: 14 rows), 7 with the second image winning
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    table = pq.read_table(synthetic.write_pair_dataset(path, 16, seed=0, resolution=32, tie_fraction=0.25))
    for column in ("jpg_0", "jpg_1"):
        wide = pa.array([_widened(png) for png in table[column].to_pylist()], pa.binary())
        table = table.set_column(table.schema.get_field_index(column), column, wide)
    pq.write_table(table, path)
    return path


def _write(model, data, out, **kw) -> str:
    """Encode ``data`` with ``model`` into the cache folder ``out``; returns the folder."""
    args = dict(resolution=RESOLUTION, batch_size=3, shard_size=4)
    args.update(kw)
    write_latent_cache(out, pretrained_model_name_or_path=model, dataset_name=data, **args)
    return str(out)


def _manifest(cache: str) -> dict:
    return json.loads((Path(cache) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def sd_cache(tiny_sd_path, pairs_path, tmp_path_factory):
    return _write(tiny_sd_path, pairs_path, tmp_path_factory.mktemp("cache") / "sd")


@pytest.fixture(scope="module")
def sdxl_cache(tiny_sdxl_path, pairs_path, tmp_path_factory):
    return _write(tiny_sdxl_path, pairs_path, tmp_path_factory.mktemp("cache") / "sdxl")


SD3_T5_LENGTH = 16  # the tiny T5's captions fit; the trainer's default (77) would only cost time


@pytest.fixture(scope="module")
def sd3_cache(tiny_sd3_path, pairs_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "sd3"
    return _write(tiny_sd3_path, pairs_path, out, max_sequence_length=SD3_T5_LENGTH)


def _arch(request, arch: str) -> tuple[str, str, dict]:
    """(model path, its cache, the run's extra flags) of a parametrised family."""
    model, cache = {"sd15": ("tiny_sd_path", "sd_cache"), "sdxl": ("tiny_sdxl_path", "sdxl_cache"),
                    "sd3": ("tiny_sd3_path", "sd3_cache")}[arch]  # fmt: skip
    flags = {"max_sequence_length": SD3_T5_LENGTH} if arch == "sd3" else {}
    return request.getfixturevalue(model), request.getfixturevalue(cache), flags


def _argv(model, out, **overrides):
    values = dict(
        pretrained_model_name_or_path=model,
        output_dir=out,
        resolution=RESOLUTION,
        train_batch_size=4,
        max_train_steps=3,
        learning_rate=1e-2,
        adam_epsilon=1.0,  # updates linear in the gradient: float noise does not flip near-zero updates
        lr_warmup_steps=0,
        checkpointing_steps=100,
        beta_dpo=500,
        seed=0,
    )
    values.update(overrides)
    return flags(values)


def _cfg(model, out, **overrides):
    return parse_config(_argv(model, out, **overrides))


def test_the_command_writes_the_rows_the_trainer_loads(sd_cache, pairs_path):
    """14 rows (2 ties dropped), in shards of 4, each with both orientations, and a manifest that says
    what made it."""
    manifest = _manifest(sd_cache)
    settings = manifest["settings"]
    assert manifest["complete"] and manifest["num_rows"] == 14
    assert manifest["shards"] == [f"shard-0000{i}.arrow" for i in range(4)]
    assert manifest["stats"]["ties_dropped"] == 2 and manifest["stats"]["bad_rows"] == 0
    assert settings["resolution"] == RESOLUTION and settings["hflip"] and settings["format"] == 2
    assert settings["model"]["family"] == "sd" and not settings["model"]["micro_conditioning"]
    assert settings["model"]["text_encoding"] == {}
    assert settings["source"]["dataset_name"] == str(pairs_path.resolve())
    assert settings["source"]["fingerprint"]
    assert manifest["vae_scaling_factor"] > 0
    row = open_latent_cache(sd_cache).rows()[0]
    assert len(row["latents_w"]) == 2 * 2 * 4 * 16 * 16 * 4  # (mean, std) x 2 flips x [4, 16, 16] fp32


def _perturbed(models):
    # At initialisation the policy equals the reference and every DPO loss is ln 2 whatever the inputs;
    # a perturbed policy makes the loss depend on the latents and embeddings.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in models.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return models


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3"])
def test_cached_batches_give_the_image_batches_loss(request, tmp_path, pairs_path, arch):
    """(a) Row for row, two epochs of batches with flips and caption dropout on: the cached batch and the
    image batch hold the same rows and give the same loss and metrics, the same latents and embeddings
    (SD3: its shifted latents, both CLIPs and T5, and the pooled projection)."""
    from diffusion_dpo.training.step import _unet_inputs

    model, cache, common = _arch(request, arch)
    sdxl = arch == "sdxl"
    common = dict(common, proportion_empty_prompts=0.3)
    from_images = _cfg(model, tmp_path / "a", dataset_name=pairs_path, **common)
    from_cache = _cfg(model, tmp_path / "b", latents_cache=cache, **common)
    models = _perturbed(setup_models(from_images, "cpu"))
    images, cached = build_train_data(from_images, sdxl), build_train_data(from_cache, sdxl)
    flips, dropped = set(), set()
    for epoch in (0, 1):
        images.start_epoch(epoch)
        cached.start_epoch(epoch)
        pairs = list(zip(images.loader, cached.loader, strict=True))
        assert len(pairs) == 3  # 14 rows, batches of 4
        for a, b in pairs:
            assert torch.equal(a["indices"], b["indices"]) and a["captions"] == b["captions"]
            for batch in (a, b):
                batch["epoch"] = epoch
            assert "pixel_values_w" not in b and "prompt_embeds" not in a
            if sdxl:
                for key in ("original_sizes_w", "original_sizes_l", "crop_top_lefts_w", "crop_top_lefts_l"):
                    assert torch.equal(a[key], b[key]), key
            shape = b["latents_mean_w"].shape
            noise = torch.randn(2 * shape[0], *shape[1:], generator=torch.Generator().manual_seed(epoch))
            with torch.no_grad():
                for x, y in zip(
                    _unet_inputs(models, a, ["_w", "_l"], noise, "cpu"),
                    _unet_inputs(models, b, ["_w", "_l"], noise, "cpu"),
                    strict=True,
                ):
                    if x is not None or y is not None:
                        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
            with torch.no_grad():
                loss_a, metrics_a = compute_batch_loss(models, a, from_images)
                loss_b, metrics_b = compute_batch_loss(models, b, from_cache)
            # The encoders batch other images together than on the fly, which moves latents and denoising
            # errors in the last float bits (~1e-7); the loss and rewards see β/2 = 250 times a difference
            # of two errors, hence their absolute tolerance.
            assert loss_a.item() != pytest.approx(0.6931, abs=1e-3)  # the loss depends on the inputs
            for key, value in {"loss": loss_a, **metrics_a}.items():
                other = loss_b if key == "loss" else metrics_b[key]
                atol = 1e-6 if key.startswith("mse/") else 1e-4
                torch.testing.assert_close(value, other, rtol=1e-5, atol=atol, msg=key)
            for index in a["indices"].tolist():
                rng = row_rng(0, epoch, index)
                dropped.add(rng.random() < 0.3)
                flips.update(rng.random(3)[2] < 0.5 for _ in range(2))
    assert flips == {True, False} and dropped == {True, False}  # both cases of each draw were checked


@pytest.mark.parametrize("arch", ["sd15", "sd3"])
def test_a_run_from_the_cache_trains_the_weights_a_run_from_images_trains(
    request, tmp_path, pairs_path, arch
):
    """(b) Three optimizer steps through train(), flips and caption dropout on, gradient accumulation:
    the final UNet (SD3: transformer) weights agree to float tolerance, and so do the logged losses."""
    model, cache, flags = _arch(request, arch)
    common = dict(flags, max_train_steps=3, train_batch_size=2, gradient_accumulation_steps=2)
    images = train(_cfg(model, tmp_path / "images", dataset_name=pairs_path, **common))
    reset_accelerate()
    cached = train(_cfg(model, tmp_path / "cached", latents_cache=cache, **common))
    a, b = images["models"].unet.state_dict(), cached["models"].unet.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the run from the cache loaded no text encoder; its saved pipeline has the base model's
    assert cached["models"].components.text_encoders == []
    saved = sorted(p.name for p in (tmp_path / "cached").iterdir() if p.name.startswith("text_encoder"))
    assert saved == sorted(p.name for p in Path(model).iterdir() if p.name.startswith("text_encoder")) != []
    base = setup_models(
        _cfg(model, tmp_path / "x", dataset_name=pairs_path, **flags), "cpu"
    ).unet.state_dict()
    moved = sum(not torch.equal(base[k], a[k]) for k in a)
    assert moved > len(a) // 2  # the runs trained
    rows = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("images", "cached")
    ]
    assert rows[0] == pytest.approx(rows[1], abs=1e-4)  # β-amplified float noise, as in the test above


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3"])
def test_caption_dropout_uses_the_empty_prompt_embedding(request, tmp_path, arch):
    """(c) A dropped caption trains on the empty caption's embeddings (hidden states, and SDXL's or SD3's
    pooled one) as the text encoder(s) make them; a kept one on its own caption's."""
    model, cache_dir, flags = _arch(request, arch)
    cache = open_latent_cache(cache_dir)
    transform = CachedPairTransform(cache, seed=0, proportion_empty_prompts=0.5)
    # the encoders as the trainer loads them when it encodes captions (from a cache it loads none)
    components = load_components(str(model), load_unet=False, family_options=flags)
    rows = cache.rows()
    seen = set()
    for index in range(len(rows)):
        example = transform(rows[index], index=index, epoch=0)
        dropped = row_rng(0, 0, index).random() < 0.5
        seen.add(dropped)
        caption = "" if dropped else rows[index]["caption"]
        assert example["caption"] == caption
        hidden, pooled = encode_prompts(components, [caption], "cpu")
        torch.testing.assert_close(example["prompt_embeds"], hidden[0], rtol=1e-5, atol=1e-5)
        assert ("pooled_prompt_embeds" in example) == (arch != "sd15")
        if pooled is not None:
            torch.testing.assert_close(example["pooled_prompt_embeds"], pooled[0], rtol=1e-5, atol=1e-5)
    assert seen == {True, False}
    always = CachedPairTransform(cache, seed=0, proportion_empty_prompts=1.0)
    empty, _ = encode_prompts(components, [""], "cpu")
    for index in range(3):
        torch.testing.assert_close(
            always(rows[index], index=index)["prompt_embeds"], empty[0], rtol=1e-5, atol=1e-5
        )


def test_a_cache_of_another_model_resolution_or_setting_is_refused(
    tmp_path, tiny_sd_path, tiny_sdxl_path, pairs_path, sd_cache
):
    """(d) Clear errors naming both sides, before any training."""
    cache = sd_cache

    def refused(model, **overrides):
        cfg = _cfg(model, tmp_path / "o", latents_cache=cache, **overrides)
        with pytest.raises(ValueError) as info:
            build_train_data(cfg, model == tiny_sdxl_path)
        return str(info.value)

    message = refused(tiny_sdxl_path)
    assert "encoded with model" in message and str(tiny_sd_path) in message and str(tiny_sdxl_path) in message
    message = refused(tiny_sd_path, resolution=64)
    assert "resolution 32" in message and "--resolution 64" in message
    assert "--keep_ties" in refused(tiny_sd_path, keep_ties=True)
    assert "--dataset_name is" in refused(tiny_sd_path, dataset_name=tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="--random_crop cannot be used with --latents_cache"):
        _cfg(tiny_sd_path, tmp_path / "o", latents_cache=cache, random_crop=True)
    with pytest.raises(ValueError, match="--objective kto"):
        _cfg(tiny_sd_path, tmp_path / "o", latents_cache=cache, objective="kto")
    with pytest.raises(FileNotFoundError, match="make it with `python data/precompute_latents.py"):
        build_train_data(_cfg(tiny_sd_path, tmp_path / "o", latents_cache=tmp_path / "nope"), False)
    unflipped = _write(tiny_sd_path, pairs_path, tmp_path / "unflipped", hflip=False)
    with pytest.raises(ValueError, match="unflipped images only"):
        build_train_data(_cfg(tiny_sd_path, tmp_path / "o", latents_cache=unflipped), False)
    build_train_data(_cfg(tiny_sd_path, tmp_path / "o", latents_cache=unflipped, no_hflip=True), False)


def test_an_sd3_cache_of_another_t5_setting_is_refused(tmp_path, tiny_sd3_path, sd3_cache):
    """SD3's text embeddings depend on T5 and its length, not only on the model: a run with another
    --max_sequence_length or with --drop_t5 is refused, naming both settings."""

    def refused(**flags):
        with pytest.raises(ValueError) as info:
            build_train_data(_cfg(tiny_sd3_path, tmp_path / "o", latents_cache=sd3_cache, **flags), False)
        return str(info.value)

    def loads_nothing(*args, **kwargs):
        raise AssertionError("the models were loaded before the cache was checked")

    with pytest.MonkeyPatch.context() as patch:  # train() refuses it before loading any model
        patch.setattr("diffusion_dpo.training.loop.setup_models", loads_nothing)
        with pytest.raises(ValueError, match="with T5 at --max_sequence_length 16"):
            train(_cfg(tiny_sd3_path, tmp_path / "t", latents_cache=sd3_cache, max_sequence_length=77))
    message = refused(max_sequence_length=77)
    assert "with T5 at --max_sequence_length 16" in message and "--max_sequence_length 77" in message
    assert "without T5 (--drop_t5)" in refused(max_sequence_length=SD3_T5_LENGTH, drop_t5=True)
    data = build_train_data(
        _cfg(tiny_sd3_path, tmp_path / "o", latents_cache=sd3_cache, max_sequence_length=SD3_T5_LENGTH), False
    )
    data.start_epoch(0)
    batch = next(iter(data.loader))
    from transformers import AutoTokenizer

    clip_positions = AutoTokenizer.from_pretrained(tiny_sd3_path, subfolder="tokenizer").model_max_length
    assert batch["prompt_embeds"].shape[1] == clip_positions + SD3_T5_LENGTH  # CLIP's positions, then T5's
    assert batch["pooled_prompt_embeds"].ndim == 2 and "original_sizes_w" not in batch


def test_bf16_is_stored_as_its_16_bits_and_format_1_caches_still_read(
    tmp_path, tiny_sd_path, pairs_path, sd_cache
):
    """Format 2 stores a bf16 array as its 16 bits (half of format 1's fp32 copy, both exact); a format-1
    cache (the ``sdxl`` flag, bf16 as fp32) is still read, into the same values."""
    import shutil

    from diffusion_dpo.data.latent_cache import from_bytes, to_bytes

    values = torch.randn(3, 5).to(torch.bfloat16)
    stored = to_bytes(values, "bfloat16")
    assert len(stored) == values.numel() * 2
    assert torch.equal(from_bytes(stored, "bfloat16", (3, 5)), values)
    as_fp32 = values.float().numpy().tobytes()  # what format 1 wrote
    assert torch.equal(from_bytes(as_fp32, "bfloat16", (3, 5), format_version=1), values)

    bf16 = open_latent_cache(_write(tiny_sd_path, pairs_path, tmp_path / "bf16", mixed_precision="bf16"))
    assert bf16.settings["dtypes"] == {"latents": "bfloat16", "text": "bfloat16"}
    # (mean, std) x 2 flips x [4, 16, 16] in bf16
    assert len(bf16.rows()[0]["latents_w"]) == 2 * 2 * 4 * 16 * 16 * 2
    example = CachedPairTransform(bf16)(bf16.rows()[0], index=0)
    assert example["latents_mean_w"].dtype == example["prompt_embeds"].dtype == torch.bfloat16

    old = tmp_path / "format1"
    shutil.copytree(sd_cache, old)
    manifest = _manifest(str(old))
    model = open_latent_cache(sd_cache).model_identity
    manifest["settings"].update(format=1, model={**model, "sdxl": False})
    (old / "manifest.json").write_text(json.dumps(manifest))
    data = build_train_data(_cfg(tiny_sd_path, tmp_path / "o", latents_cache=old), False)
    new = build_train_data(_cfg(tiny_sd_path, tmp_path / "o", latents_cache=sd_cache), False)
    for data_ in (data, new):
        data_.start_epoch(0)
    a, b = next(iter(data.loader)), next(iter(new.loader))
    for key in ("latents_mean_w", "latents_std_l", "prompt_embeds"):
        assert torch.equal(a[key], b[key]), key


def test_a_run_from_the_cache_keeps_its_encoders_off_the_device(
    tmp_path, tiny_sd_path, pairs_path, sd_cache, monkeypatch
):
    """The step never encodes from a cache: without validation no text encoder is loaded at all, and the
    VAE stays in CPU memory (the meta device stands in for a GPU); with validation the text encoder is
    loaded, in CPU memory too, and both visit the device for held-out pairs and validation images."""
    from diffusion_dpo.training.models import encoders_on

    models = setup_models(_cfg(tiny_sd_path, tmp_path / "m", latents_cache=sd_cache), "meta")
    assert next(models.unet.parameters()).device.type == "meta"
    assert next(models.ref_unet.parameters()).device.type == "meta"
    assert models.components.text_encoders == [] and models.components.tokenizers == []
    assert next(models.components.vae.parameters()).device.type == "cpu"
    validating = _cfg(
        tiny_sd_path, tmp_path / "m", latents_cache=sd_cache, validation_prompts=["a red circle"]
    )
    models = setup_models(validating, "meta")
    encoders = [models.components.vae, *models.components.text_encoders]
    assert len(encoders) == 2 and {next(m.parameters()).device.type for m in encoders} == {"cpu"}
    images = setup_models(_cfg(tiny_sd_path, tmp_path / "m", dataset_name=pairs_path), "cpu")
    with encoders_on(images, "cpu"):  # already there: nothing moves
        pass
    assert next(images.components.vae.parameters()).device.type == "cpu"

    # the loop puts the encoders on its device for the held-out pairs and for the validation images
    visits = []

    @contextlib.contextmanager
    def recording(models, device):
        with encoders_on(models, device):
            visits.append({next(m.parameters()).device.type for m in _encoders_of(models)})
            yield

    monkeypatch.setattr(loop, "encoders_on", recording)
    summary = train(
        _cfg(
            tiny_sd_path, tmp_path / "v", latents_cache=sd_cache, max_train_steps=2, validation_steps=2,
            validation_prompts=["a red circle"], validation_dataset_name=pairs_path, num_validation_pairs=4,
            num_inference_steps=2,
        )
    )  # fmt: skip
    assert (tmp_path / "v" / "validation" / "step-2" / "00.png").is_file()
    assert 0.0 <= summary["last_metrics"]["eval/implicit_acc"] <= 1.0
    assert visits == [{"cpu"}, {"cpu"}]  # held-out pairs once, validation images at step 2


def _encoders_of(models) -> list[torch.nn.Module]:
    return [models.components.vae, *models.components.text_encoders]


def test_encoders_on_moves_the_encoders_to_the_device_and_back(tmp_path, tiny_sd_path, sd_cache, monkeypatch):
    """A run from a cache keeps the VAE and text encoder in CPU memory; ``encoders_on`` puts every one
    of their parameters and buffers on the device inside the block, and back in CPU memory after it,
    also when the block raises. The meta device stands in for a GPU: a module on meta has no values to
    copy back, so each encoder's ``.to`` is replaced by ``to_empty``, which moves every tensor of the
    module to the device asked for (values uninitialised), so the devices reported are those asked for."""
    from diffusion_dpo.training.models import encoders_on

    cfg = _cfg(tiny_sd_path, tmp_path / "m", latents_cache=sd_cache, validation_prompts=["a red circle"])
    models = setup_models(cfg, "meta")
    encoders = _encoders_of(models)
    assert len(encoders) == 2
    for module in encoders:
        monkeypatch.setattr(module, "to", lambda device, m=module: m.to_empty(device=device))

    def devices():
        return [{t.device.type for t in (*m.parameters(), *m.buffers())} for m in encoders]

    assert devices() == [{"cpu"}, {"cpu"}]
    with encoders_on(models, "meta"):
        assert devices() == [{"meta"}, {"meta"}], "the encoders were not moved to the device"
    assert devices() == [{"cpu"}, {"cpu"}], "the encoders were not moved back to CPU memory"
    with pytest.raises(RuntimeError, match="validation failed"), encoders_on(models, "meta"):
        raise RuntimeError("validation failed")
    assert devices() == [{"cpu"}, {"cpu"}]
    assert next(models.unet.parameters()).device.type == "meta"  # the UNet stays where it trains


def test_streaming_from_the_cache(tmp_path, tiny_sd_path, sd_cache):
    """(e) --streaming reads the cache's shards as a stream: one epoch yields every cached row once, and
    training runs."""
    cfg = _cfg(
        tiny_sd_path, tmp_path / "s", latents_cache=sd_cache, streaming=True, train_batch_size=2,
        shuffle_buffer_size=3, proportion_empty_prompts=0.0,
    )  # fmt: skip
    data = build_train_data(cfg, False)
    data.start_epoch(0)
    captions = [c for batch in data.loader for c in batch["captions"]]
    rows = open_latent_cache(sd_cache).rows()
    assert sorted(captions) == sorted(rows["caption"])
    summary = train(cfg)
    assert summary["global_step"] == 3
    assert summary["last_metrics"]["loss"] is not None


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 36), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_rows_are_reported_kept_marked_and_skipped(tmp_path, tiny_sd_path):
    """A corrupt image stays a row marked bad (so later rows keep their positions), named by the command;
    a bad label_0 is left out and counted, as loading the images does. Training skips the bad row."""
    path = tmp_path / "bad.parquet"
    table = {
        "caption": ["a red circle", "a blue square", "a green star", "a cat"],
        "jpg_0": [_png("red"), b"not an image", _png("green"), _png("white")],
        "jpg_1": [_png("blue"), _png("blue"), _png("black"), _png("gray")],
        "label_0": [1.0, 0.0, 7.0, 1.0],
    }
    pq.write_table(pa.table(table), path)
    cache_dir = _write(tiny_sd_path, path, tmp_path / "cache")
    manifest = _manifest(cache_dir)
    assert manifest["num_rows"] == 3 and manifest["stats"]["bad_labels"] == 1
    assert manifest["stats"]["bad_rows"] == 1
    assert "row 1, image_l: cannot decode image" in manifest["stats"]["bad_row_examples"][0]
    cache = open_latent_cache(cache_dir)
    rows = cache.rows()
    assert rows["caption"] == ["a red circle", "", "a cat"]
    transform = CachedPairTransform(cache)
    with pytest.raises(BadRowError, match="row 1, image_l"):
        transform(rows[1], index=1)
    # training counts and names both as training from the images does (one at load time, one in a batch)
    common = dict(train_batch_size=3, max_train_steps=1, max_bad_row_fraction=1.0)
    cached = train(_cfg(tiny_sd_path, tmp_path / "c", latents_cache=cache_dir, **common))
    reset_accelerate()
    images = train(_cfg(tiny_sd_path, tmp_path / "i", dataset_name=path, **common))
    reset_accelerate()
    assert cached["data/skipped_rows"] == images["data/skipped_rows"] == 2
    named = [[(r["index"], r["reason"][:40]) for r in run["data/bad_rows"]] for run in (cached, images)]
    assert named[0] == named[1] and [i for i, _ in named[0]] == [2, 1]  # the bad label, the bad image
    with pytest.raises(ValueError, match="have a bad label"):
        build_train_data(
            _cfg(tiny_sd_path, tmp_path / "o", latents_cache=cache_dir, on_bad_example="error"), False
        )


def test_an_interrupted_encoding_resumes(tmp_path, tiny_sd_path, pairs_path, sd_cache):
    """Rerunning the command after it stopped keeps the complete shards and writes the same cache; a
    finished cache is left alone; other settings in the same folder are refused."""
    out = tmp_path / "cache"
    _write(tiny_sd_path, pairs_path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (out / "shard-00003.arrow").unlink()
    (out / "shard-00002.arrow").unlink()
    kept = (out / "shard-00000.arrow").stat().st_mtime_ns
    with pytest.raises(ValueError, match="incomplete"):
        open_latent_cache(out)
    _write(tiny_sd_path, pairs_path, out)
    again = _manifest(out)
    assert (out / "shard-00000.arrow").stat().st_mtime_ns == kept
    assert again["num_rows"] == 14 and again["shards"] == manifest["shards"]
    assert again["stats"] == manifest["stats"]
    resumed, straight = open_latent_cache(out), open_latent_cache(sd_cache)
    assert resumed.rows()["caption"] == straight.rows()["caption"]
    a, b = CachedPairTransform(resumed), CachedPairTransform(straight)
    for index in range(14):
        x, y = a(resumed.rows()[index], index=index), b(straight.rows()[index], index=index)
        for key in ("latents_mean_w", "latents_std_l", "prompt_embeds"):
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)
    last = (out / "shard-00003.arrow").stat().st_mtime_ns
    _write(tiny_sd_path, pairs_path, out)  # finished: left as it is
    assert (out / "shard-00003.arrow").stat().st_mtime_ns == last
    with pytest.raises(ValueError, match="other settings"):
        _write(tiny_sd_path, pairs_path, out, resolution=64)


def test_a_streamed_source_or_decoding_workers_give_the_same_cache(
    tmp_path, tiny_sd_path, pairs_path, sd_cache
):
    """--streaming reads the source in order (ties left out as they pass) and --dataloader_num_workers
    decodes in other processes: both write the rows of the plain command, in the same positions."""
    straight = open_latent_cache(sd_cache)
    for name, kw in (("streamed", dict(streaming=True)), ("workers", dict(num_workers=1))):
        other = open_latent_cache(_write(tiny_sd_path, pairs_path, tmp_path / name, **kw))
        assert other.num_rows == 14 and other.manifest["stats"]["ties_dropped"] == 2
        assert other.rows()["caption"] == straight.rows()["caption"], name
        a, b = CachedPairTransform(other), CachedPairTransform(straight)
        for index in (0, 7, 13):
            x, y = a(other.rows()[index], index=index), b(straight.rows()[index], index=index)
            torch.testing.assert_close(x["latents_mean_l"], y["latents_mean_l"], rtol=1e-5, atol=1e-6)
