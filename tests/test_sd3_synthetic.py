"""The synthetic experiment and the embedded default on the tiny SD3-shaped model: the 16-channel VAE fit
with SD3's latent normalisation, ``--arch sd3`` of data/synthetic_experiment.py, the SD3 stage configs,
which tiny base the embedded default builds, and sampling SD3 outputs as they were trained.

Slow (``pytest -m slow``): the --quick SD3 experiment end to end, DPO against the base."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_runs import load_synthetic_experiment

from diffusion_dpo import synthetic
from diffusion_dpo.synthetic.base import tiny_base_arch
from diffusion_dpo.synthetic.vae import build_base_pipeline, fit_vae, images_to_tensor
from diffusion_dpo.training.config import parse_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def _pixels(n: int = 12, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return images_to_tensor([synthetic.render(synthetic.sample_spec(rng), rng, 32) for _ in range(n)])


@pytest.fixture(scope="module")
def vae16():
    return fit_vae(_pixels(), steps=3, batch_size=4, seed=0, latent_channels=16)


def test_fit_vae_16_channels_sets_sd3_shift_and_scale(vae16):
    pixels = _pixels()
    assert vae16.config.latent_channels == 16
    assert not vae16.config.use_quant_conv and not vae16.config.use_post_quant_conv  # as SD3's VAE
    with torch.no_grad():
        means = vae16.encode(pixels).latent_dist.mean
    assert means.shape == (12, 16, 16, 16)
    # SD3 latents are (z − shift)·scale: zero mean and unit std on the images the factors came from
    z = (means - vae16.config.shift_factor) * vae16.config.scaling_factor
    assert abs(float(z.mean())) < 1e-4 and float(z.std()) == pytest.approx(1.0, abs=1e-4)
    assert vae16.config.shift_factor == pytest.approx(float(means.mean()), rel=1e-5)
    # the SD1.5 default: 4 channels, a scale and no shift
    vae4 = fit_vae(pixels, steps=1, batch_size=4, seed=0)
    assert vae4.config.latent_channels == 4 and vae4.config.shift_factor is None
    with pytest.raises(ValueError, match="latent_channels must be 4"):
        fit_vae(pixels, steps=1, latent_channels=8)


def test_build_base_pipeline_sd3_puts_the_fitted_vae_in(vae16):
    from diffusers import StableDiffusion3Pipeline

    pipe = build_base_pipeline(vae16, seed=0, resolution=32, arch="sd3")
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.vae is vae16
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.transformer.config.in_channels == 16
    # positions on a grid twice the 8×8 patch grid, not the tiny pipeline's 32 (speckled samples)
    assert pipe.transformer.config.pos_embed_max_size == 16
    with pytest.raises(ValueError, match="needs a VAE with 4 latent channels"):
        build_base_pipeline(vae16, arch="sd15")
    with pytest.raises(ValueError, match="arch must be one of"):
        build_base_pipeline(vae16, arch="flux")


def test_arch_argument_and_the_sd3_stage_configs(monkeypatch):
    exp = load_synthetic_experiment(monkeypatch)
    assert exp.parse_args(["--output_dir", "x"]).arch == "sd15"
    args = exp.parse_args(["--output_dir", "x", "--arch", "sd3", "--quick"])
    assert args.arch == "sd3" and exp.scale_for("sd3", True) is exp.SD3_QUICK
    assert exp.scale_for("sd15", True) is exp.QUICK and exp.scale_for("sd15", False) is exp.FULL
    with pytest.raises(SystemExit):
        exp.parse_args(["--output_dir", "x", "--arch", "sd3", "--world", "imperfect"])
    with pytest.raises(SystemExit):
        exp.parse_args(["--output_dir", "x", "--arch", "sdxl"])
    assert exp.stage_config("base", "sd15").name == "synthetic_pretrain.yaml"
    assert exp.stage_config("ipo", "sd15").name == "synthetic_dpo.yaml"
    for stage in ("base", *exp.WORLD_METHODS["shapes"]):
        path = exp.stage_config(stage, "sd3")
        assert path.name.startswith("synthetic_sd3_"), path
        cfg = parse_config(["--config", str(path)])
        assert cfg.max_sequence_length == 16  # the tiny T5's captions fit in 16 tokens
        assert "synthetic_sd3" in cfg.output_dir


def test_tiny_base_arch_is_read_from_the_model_path():
    assert tiny_base_arch("outputs/tiny/base_model") == "sd15"
    assert tiny_base_arch("outputs/tiny_sd3/base_model") == "sd3"
    assert tiny_base_arch("outputs/tiny/sd3-base") == "sd3"
    assert tiny_base_arch("/home/sd3/outputs/tiny/base_model") == "sd15"  # only the last two parts
    assert tiny_base_arch("outputs/tiny/msd35") == "sd15"  # a word, not a substring
    cfg = parse_config(["--config", str(ROOT / "configs/tiny_sd3.yaml")])
    assert cfg.create_tiny_assets and tiny_base_arch(cfg.pretrained_model_name_or_path) == "sd3"
    assert cfg.max_sequence_length == 16
    assert (
        tiny_base_arch(
            parse_config(["--config", str(ROOT / "configs/tiny.yaml")]).pretrained_model_name_or_path
        )
        == "sd15"
    )


def test_the_evaluation_suite_samples_trainer_outputs_as_they_were_trained(tmp_path):
    """StableDiffusion3Pipeline pads T5 prompts to 256 tokens by default; an SD3 trainer output (full or
    LoRA) is sampled with the max_sequence_length it was trained with, which is part of its images'
    cache key. UNet models and pipelines that are not trainer outputs keep their defaults and keys."""
    import json

    from diffusion_dpo.evaluation.generate import ModelSpec, model_identity, trained_sampling_kwargs

    def folder(name, index, config=None):
        path = tmp_path / name
        path.mkdir()
        (path / "model_index.json").write_text(json.dumps(index))
        if config is not None:
            (path / "training_config.yaml").write_text(config)
        return path

    sd3_index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
                 "text_encoder_3": ["transformers", "T5EncoderModel"]}  # fmt: skip
    trained = folder("trained", sd3_index, "max_sequence_length: 16\ndrop_t5: false\n")
    stock = folder("stock", sd3_index)
    sd15 = folder("sd15", {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
                  "max_sequence_length: 16\n")  # fmt: skip
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "training_config.yaml").write_text(
        f"pretrained_model_name_or_path: {stock}\nmax_sequence_length: 24\n"
    )
    assert trained_sampling_kwargs(ModelSpec("t", str(trained), "pipeline")) == {"max_sequence_length": 16}
    assert trained_sampling_kwargs(ModelSpec("l", str(lora), "lora", base=str(stock))) == {
        "max_sequence_length": 24
    }
    assert trained_sampling_kwargs(ModelSpec("s", str(stock), "pipeline")) == {}
    assert trained_sampling_kwargs(ModelSpec("u", str(sd15), "pipeline")) == {}
    assert "sampling" not in model_identity(
        ModelSpec("t", str(trained), "pipeline")
    )  # added by generate_images


def test_an_sd3_trainer_output_is_sampled_and_cached_at_its_trained_t5_length(
    tmp_path, tiny_sd3_path, monkeypatch
):
    """generate_images on a tiny SD3 trainer output: the pipeline is called with the T5 length of its
    training_config.yaml, and the images are cached under that length: retrained at another length,
    the same folder's images are generated again (not served from the other length's cache), and an
    image matches the pipeline sampled directly at the trained length, not at its default of 256."""
    import shutil

    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    from diffusion_dpo.evaluation import generate
    from diffusion_dpo.evaluation.generate import GenerationSettings, ModelSpec, generate_images

    model = tmp_path / "trained"
    shutil.copytree(tiny_sd3_path, model)
    config = model / "training_config.yaml"
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=1.0)
    spec, cache = ModelSpec("t", str(model), "pipeline"), tmp_path / "cache"
    lengths = []  # the max_sequence_length of every pipeline call generate_images makes
    real_load = generate.load_pipeline

    class Recording:
        def __init__(self, pipe):
            self.pipe = pipe

        def __call__(self, **kwargs):
            lengths.append(kwargs.get("max_sequence_length"))
            return self.pipe(**kwargs)

    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: Recording(real_load(*a, **k)))
    config.write_text("max_sequence_length: 16\n")
    paths16, n16 = generate_images(spec, ["a red circle"], [0], settings, cache, progress=False)
    assert (n16, lengths) == (1, [16])
    assert generate_images(spec, ["a red circle"], [0], settings, cache, progress=False)[1] == 0
    config.write_text("max_sequence_length: 24\n")
    paths24, n24 = generate_images(spec, ["a red circle"], [0], settings, cache, progress=False)
    assert (n24, lengths) == (1, [16, 24]), "the 24-token images were served from the 16-token cache"
    assert paths24[0][0] != paths16[0][0]

    # what the cache holds is what the pipeline draws at the trained length
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path).to("cpu")
    pipe.set_progress_bar_config(disable=True)

    def direct(**kwargs):
        out = pipe(prompt=["a red circle"], generator=[torch.Generator("cpu").manual_seed(0)],
                   num_inference_steps=2, guidance_scale=1.0, output_type="pil", **kwargs)  # fmt: skip
        return np.asarray(out.images[0])

    cached = np.asarray(Image.open(paths16[0][0]))
    assert np.array_equal(cached, direct(max_sequence_length=16))
    assert not np.array_equal(cached, direct())  # 256 tokens draw another image: the length matters


def test_the_experiments_interval_clears_a_coin_flip_only_when_dpo_wins_across_prompts():
    """The fast half of the slow test's check ``ci_low > 0.5``: the interval the experiment records for
    DPO (the evaluation's cluster bootstrap over prompts, through ``method_results``) on hand-made
    outcomes of the quick run's size (24 prompts x 9 seeds). Both models win 58-59% of the images; one
    wins 5-6 of 9 on every prompt (aligned: the interval clears 0.5), the other wins every image of 14
    prompts and none of 10 (a coin flip over prompts: its interval holds 0.5, though ``win_rate > 0.5``)."""
    from diffusion_dpo.evaluation.stats import win_rate
    from diffusion_dpo.synthetic.results import method_results

    baseline = np.full((24, 9), 0.5)  # a DPO score of 1 wins the image, 0 loses it
    spread = np.zeros((24, 9))
    spread[:, :5] = 1.0  # 5 of 9 seeds won on every prompt ...
    spread[::2, 5] = 1.0  # ... and a 6th on every other one: 0.61
    concentrated = np.zeros((24, 9))
    concentrated[:14] = 1.0  # 14 prompts won on every seed, 10 lost: 0.58

    def record(dpo_scores):
        rates = {
            m: {"shapes": win_rate(dpo_scores, baseline, seed=0).to_dict()} for m in ("dpo", "sft", "kto")
        }
        scores = {m: {"shapes": {"mean": 0.0}} for m in ("base", "dpo", "sft", "kto")}
        summary = {"baseline": "base", "models": list(scores), "scorers": ["shapes"], "scores": scores,
                   "win_rates": rates}  # fmt: skip
        return method_results(summary)["dpo"]

    aligned, coin_flip = record(spread), record(concentrated)
    assert aligned["win_rate"] > 0.5 and coin_flip["win_rate"] > 0.5  # the point estimates cannot tell
    assert aligned["ci_low"] > 0.5, aligned
    assert coin_flip["ci_low"] < 0.5 < coin_flip["ci_high"], coin_flip


@pytest.mark.slow
def test_quick_sd3_experiment_aligns(tmp_path):
    """--arch sd3 --quick end to end (measured: see configs/synthetic_sd3_dpo.yaml)."""
    sys.path.insert(0, str(ROOT / "data"))
    try:
        import synthetic_experiment
    finally:
        sys.path.remove(str(ROOT / "data"))
    record = synthetic_experiment.main(["--output_dir", str(tmp_path), "--arch", "sd3", "--quick"])
    assert json.loads((tmp_path / "results.json").read_text()) == record
    assert record["settings"]["arch"] == "sd3" and "vae_shift_factor" in record["settings"]
    dpo = record["dpo"]
    assert dpo["implicit_accuracy"] > 0.6
    # aligned: the win rate's 95% interval lies above a coin flip, not just its point estimate
    assert dpo["ci_low"] > 0.5, (dpo["win_rate"], dpo["ci_low"], dpo["ci_high"])
