"""The trained model's outputs: the diffusers-format save, loading it back, and sampling images."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from diffusion_dpo.models.loading import SDComponents
from diffusion_dpo.models.pretrained import dtype_kwargs, quiet_loading
from diffusion_dpo.training.config import TrainConfig
from diffusion_dpo.training.models import Models

logger = logging.getLogger(__name__)

CONFIG_FILE = "training_config.yaml"


def pipeline_class(components: SDComponents):
    """The diffusers pipeline class of the components' family (SD, SDXL, SD3)."""
    return components.family.pipeline_class()


def pipeline_parts(comps: SDComponents, unet: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The in-memory modules to hand to ``Pipeline.from_pretrained`` instead of loading them again."""

    def cast(module):
        if dtype is None or next(module.parameters()).dtype == dtype:
            return module
        # diffusers' .to(dtype) warns about modules to keep in fp32, even when the cast is to fp32
        return module.float() if dtype == torch.float32 else module.to(dtype)

    return comps.family.pipeline_parts(comps, unet, cast)


def trained_family_options(output_dir: str | Path) -> dict:
    """The family options a trainer output was trained with (SD3: ``drop_t5``, ``max_sequence_length``;
    FLUX.1: ``max_sequence_length``, ``guidance_scale``),
    from its ``training_config.yaml``; {} for any other pipeline folder or hub id."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    saved = yaml.safe_load(path.read_text()) or {}
    keys = ("drop_t5", "max_sequence_length", "guidance_scale")
    return {key: saved[key] for key in keys if key in saved}


#: The sampling settings a trainer output records (its validation images were made so), which
#: ``eval/evaluate.py`` uses when it is not told otherwise.
SAMPLING_KEYS = ("num_inference_steps", "guidance_scale")


def trained_sampling_settings(output_dir: str | Path) -> dict:
    """``num_inference_steps`` and ``guidance_scale`` (when set) of a trainer output, from its
    ``training_config.yaml``; {} for any other pipeline folder or hub id."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    saved = yaml.safe_load(path.read_text()) or {}
    return {key: saved[key] for key in SAMPLING_KEYS if saved.get(key) is not None}


def save_final_model(
    cfg: TrainConfig, models: Models, unet: torch.nn.Module, state_dict: dict | None = None
) -> Path:
    """Write the result in diffusers format to ``output_dir``.

    Full fine-tune: a whole pipeline folder (``from_pretrained(output_dir)``). LoRA:
    ``pytorch_lora_weights.safetensors`` with the adapter's config (rank, alpha, targets) in its
    metadata, so ``pipe.load_lora_weights(output_dir)`` applies it at scale alpha/rank, as trained.
    Both get ``training_config.yaml``, which names the base model. ``unet`` is the unwrapped trained
    UNet; ``state_dict``, when given, holds its full fp32 weights (gathered from a sharding engine).
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = models.components.family
    pipeline_cls = family.pipeline_class()
    if state_dict is not None and not cfg.use_lora:
        whole = family.denoiser_class().from_config(unet.config)
        whole.load_state_dict(state_dict, strict=True)
        unet = whole
    if cfg.use_lora:
        from peft.utils import get_peft_model_state_dict

        lora_state = get_peft_model_state_dict(unet, state_dict=state_dict)
        pipeline_cls.save_lora_weights(
            out, safe_serialization=True,
            # the metadata: without it diffusers reloads the adapter at alpha = rank, i.e. scale 1,
            # whatever was trained
            **family.lora_save_kwargs(lora_state, unet.peft_config["default"].to_dict()),
        )  # fmt: skip
    else:
        # the saved pipeline is fp32, whatever precision the frozen parts were run in
        parts = pipeline_parts(models.components, unet.float(), torch.float32)
        with quiet_loading():
            pipe = pipeline_cls.from_pretrained(
                cfg.pretrained_model_name_or_path, revision=cfg.revision, **parts
            )
            pipe.save_pretrained(out)
    # with the family's resolved sampling settings (FLUX.1: T5 length and guidance, default None in the
    # config), which evaluation and validation sample with again
    settings = {k: v for k, v in family.sampling_kwargs().items() if k in cfg.to_dict()}
    (out / CONFIG_FILE).write_text(yaml.safe_dump({**cfg.to_dict(), **settings}, sort_keys=False))
    logger.info("saved the %s result to %s", "LoRA" if cfg.use_lora else "full", out)
    return out


def load_trained_pipeline(
    output_dir: str | Path, torch_dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None
):
    """Load what :func:`save_final_model` wrote: a pipeline folder, or the base + LoRA weights, in
    ``torch_dtype``; the VAE in ``vae_dtype`` when given (fp32 for SDXL's own VAE, which overflows in
    fp16)."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    from diffusion_dpo.models.families import pipeline_load_kwargs

    out = Path(output_dir)
    lora = not (out / "model_index.json").is_file()
    if lora and not (out / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(
            f"{out} holds neither a pipeline (model_index.json) nor pytorch_lora_weights.safetensors"
        )
    source = yaml.safe_load((out / CONFIG_FILE).read_text())["pretrained_model_name_or_path"] if lora else out
    parts = {}
    if vae_dtype is not None and vae_dtype != torch_dtype:  # loaded in its dtype, not cast after
        parts["vae"] = AutoencoderKL.from_pretrained(source, subfolder="vae", **dtype_kwargs(vae_dtype))
    # SD3 trained without T5: loaded without it, as trained
    parts.update(pipeline_load_kwargs(source, trained_family_options(out)))
    pipe = DiffusionPipeline.from_pretrained(source, **parts, **dtype_kwargs(torch_dtype))
    if lora:
        pipe.load_lora_weights(out)
    return pipe


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, resolution: int | None = None) -> list:
    """Scaled latents → PIL images, decoded by the VAE in its own dtype (SDXL's original VAE is kept
    in fp32: decoding it in fp16 overflows into black or NaN images). Packed latents ``[N, L, 4C]``
    (Qwen-Image's and FLUX.1's ``output_type="latent"``) are unpacked by the pipeline's own ``_unpack_latents`` at
    ``resolution``; its one-frame video latents ``[N, C, 1, h, w]`` decode to the frame."""
    vae = pipe.vae
    if latents.dim() == 3:
        latents = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
    latents = latents.to(vae.device, vae.dtype)
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        shape = (1, -1) + (1,) * (latents.dim() - 2)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents)
        std = torch.tensor(config.latents_std).view(shape).to(latents)
        latents = latents * std / getattr(config, "scaling_factor", 1.0) + mean
    elif getattr(config, "shift_factor", None) is not None:  # SD3's VAE
        latents = latents / config.scaling_factor + config.shift_factor
    else:
        latents = latents / config.scaling_factor
    images = vae.decode(latents).sample
    if images.dim() == 5:  # [N, 3, 1, H, W]
        images = images[:, :, 0]
    return pipe.image_processor.postprocess(images.float(), output_type="pil")


@torch.no_grad()
def sample_images(
    pipe,
    prompts,
    out_dir: Path,
    resolution: int,
    steps: int,
    seed: int,
    autocast_dtype: torch.dtype | None = None,
    pipeline_kwargs: dict | None = None,
    guidance_scale: float | None = None,
) -> list[Path]:
    """One image per prompt from ``torch.Generator("cpu").manual_seed(seed + i)`` (the same noise on any
    device), written as PNGs to ``out_dir``. ``autocast_dtype``: run the denoiser under autocast in the
    run's precision (bf16 or fp16, never autocast's fp16 default in a bf16 run); the VAE always
    decodes outside autocast, in its own dtype. ``pipeline_kwargs``: extra keywords of the pipeline
    call (default: the family's, e.g. SD3's T5 length). ``guidance_scale``: None for the pipeline's own."""
    from diffusion_dpo.models.families import family_for_pipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    device_type = pipe.device.type
    extra = family_for_pipeline(pipe).sampling_kwargs() if pipeline_kwargs is None else pipeline_kwargs
    if guidance_scale is not None:
        extra = {**extra, "guidance_scale": guidance_scale}
    paths = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            latents = pipe(
                prompt, num_inference_steps=steps, height=resolution, width=resolution, generator=gen,
                output_type="latent", **extra,
            ).images  # fmt: skip
        path = out_dir / f"{i:02d}.png"
        decode_latents(pipe, latents, resolution)[0].save(path)
        paths.append(path)
    return paths


def training_pipeline(cfg: TrainConfig, models: Models, unet: torch.nn.Module):
    """The family's pipeline around the in-memory models and ``unet`` (the current weights, unwrapped,
    or the reference): what validation samples with during training."""
    comps = models.components
    with quiet_loading():
        return pipeline_class(comps).from_pretrained(
            cfg.pretrained_model_name_or_path, revision=cfg.revision, **pipeline_parts(comps, unet)
        )


@torch.no_grad()
def sample_prompt_images(cfg: TrainConfig, models: Models, pipe, prompt: str, seeds: list[int]) -> list:
    """PIL images of one prompt, one per seed (``torch.Generator("cpu").manual_seed(seed)`` each), in
    one pipeline call with the run's sampling settings and precision, as :func:`validation_images`
    samples. The call's batch is the prompt's seeds whatever else is sampled, so an image does not
    depend on how prompts are split across processes."""
    pipe.set_progress_bar_config(disable=True)
    dtype = models.weight_dtype if models.weight_dtype != torch.float32 else None
    extra = dict(models.components.family.sampling_kwargs())
    if cfg.guidance_scale is not None:
        extra["guidance_scale"] = cfg.guidance_scale
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    with torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype is not None):
        latents = pipe(
            prompt, num_images_per_prompt=len(seeds), num_inference_steps=cfg.num_inference_steps,
            height=cfg.resolution, width=cfg.resolution, generator=generators, output_type="latent", **extra,
        ).images  # fmt: skip
    return decode_latents(pipe, latents, cfg.resolution)


def validation_images(
    cfg: TrainConfig, models: Models, unet: torch.nn.Module, step: int, device
) -> list[Path]:
    """Sample the validation prompts with the current weights (``unet`` unwrapped) into
    ``output_dir/validation/step-N``, in the run's precision."""
    comps = models.components
    pipe = training_pipeline(cfg, models, unet)
    was_training = unet.training
    unet.eval()
    try:
        paths = sample_images(
            pipe, cfg.validation_prompts, Path(cfg.output_dir) / "validation" / f"step-{step}",
            cfg.resolution, cfg.num_inference_steps, cfg.seed,
            autocast_dtype=models.weight_dtype if models.weight_dtype != torch.float32 else None,
            pipeline_kwargs=comps.family.sampling_kwargs(), guidance_scale=cfg.guidance_scale,
        )  # fmt: skip
    finally:
        unet.train(was_training)
    logger.info("step %d: wrote %d validation images to %s", step, len(paths), paths[0].parent)
    return paths


def final_samples(cfg: TrainConfig, models: Models, device) -> list[Path]:
    """Sample the validation prompts with the saved result, loaded back as users load it, on the
    training device and in the run's precision, into ``output_dir/samples``."""
    # SDXL's own VAE overflows in fp16: the family keeps it in fp32 whatever the run's precision
    vae_dtype = models.components.family.vae_dtype(
        models.weight_dtype, own_vae=not cfg.vae_model_name_or_path
    )
    with quiet_loading():
        pipe = load_trained_pipeline(
            cfg.output_dir,
            models.weight_dtype,
            vae_dtype=vae_dtype if vae_dtype != models.weight_dtype else None,
        ).to(device)
    return sample_images(
        pipe, cfg.validation_prompts, Path(cfg.output_dir) / "samples", cfg.resolution,
        cfg.num_inference_steps, cfg.seed, pipeline_kwargs=models.components.family.sampling_kwargs(),
        guidance_scale=cfg.guidance_scale,
    )  # fmt: skip
