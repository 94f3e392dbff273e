"""Load Stable Diffusion (SD1.x/2.x) and SDXL components and turn captions/images into UNet inputs.

Everything goes through ``from_pretrained``, so a hub id (e.g. ``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``) and a local diffusers folder take the same path.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion pipeline the trainer needs (SDXL: two tokenizers/encoders)."""

    unet: torch.nn.Module | None  # None when loaded with load_unet=False
    vae: torch.nn.Module
    noise_scheduler: object
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def read_model_index(pretrained_model_name_or_path: str, revision: str | None = None) -> dict:
    """``model_index.json`` of a local folder or a hub repository, with a clear error if absent."""
    local = Path(pretrained_model_name_or_path)
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{local} is not a diffusers pipeline folder: it has no model_index.json "
                "(expected subfolders unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        return json.loads(index.read_text())
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision)
    except Exception as err:  # hub errors come in many types; say what was asked for
        raise FileNotFoundError(
            f"could not read model_index.json of {pretrained_model_name_or_path!r}: it is neither a local "
            f"folder nor a reachable hub repository ({type(err).__name__}: {err})"
        ) from err


def dtype_kwargs(dtype: torch.dtype, library: str = "diffusers") -> dict:
    """The keyword that makes ``from_pretrained`` of ``library`` (diffusers or transformers) load in ``dtype``.

    Both renamed ``torch_dtype`` to ``dtype`` (transformers 4.56, diffusers 0.42) and warn on the old
    name; older versions know only ``torch_dtype``. Loading in the dtype, rather than casting after,
    also keeps diffusers from warning about ``to(dtype)`` on every load.
    """
    if library == "transformers":
        import transformers
        from packaging.version import Version

        new = Version(transformers.__version__) >= Version("4.56")
    else:  # diffusers' helper that resolves the two names exists exactly in the versions taking dtype
        from diffusers.utils import deprecation_utils

        new = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


@contextlib.contextmanager
def quiet_loading():
    """Hide diffusers' and transformers' progress bars ("Loading pipeline components", "Loading weights",
    "Writing model shards") inside the block: loads and saves a run makes for itself take milliseconds
    to seconds and say nothing a user acts on. Hub downloads keep their progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    shown = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    hub_shown = not are_progress_bars_disabled()
    for lib, _ in shown:
        lib.disable_progress_bar()
    if hub_shown:  # transformers' switch turns the hub's download bars off too: a download must show
        enable_progress_bars()
    try:
        yield
    finally:
        for lib, was_shown in shown:
            if was_shown:
                lib.enable_progress_bar()
        if not hub_shown:
            disable_progress_bars()


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    vae_model_name_or_path: str | None = None,
    *,
    frozen_dtype: torch.dtype = torch.float32,
    unet_dtype: torch.dtype = torch.float32,
    load_unet: bool = True,
) -> SDComponents:
    """Load UNet, VAE, DDPM noise scheduler, tokenizer(s) and text encoder(s) on CPU.

    Each part is loaded in the dtype it is used in (casting after loading makes diffusers warn):
    the UNet in ``unet_dtype``, the frozen text encoders and VAE in ``frozen_dtype``, except SDXL's
    own VAE, which overflows in fp16 and stays fp32. SDXL is recognised by a second text encoder in
    ``model_index.json``. ``vae_model_name_or_path`` swaps in another VAE (e.g.
    ``madebyollin/sdxl-vae-fp16-fix``, which is stable in fp16). ``load_unet=False`` leaves the UNet
    out (``unet`` is None), for encoding data only.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    index = read_model_index(pretrained_model_name_or_path, revision)
    sdxl = "text_encoder_2" in index and index["text_encoder_2"][0] is not None
    vae_dtype = torch.float32 if (sdxl and not vae_model_name_or_path) else frozen_dtype
    kw = dict(revision=revision)
    encoder_kw = dict(variant=variant, **kw, **dtype_kwargs(frozen_dtype, "transformers"))
    src = pretrained_model_name_or_path
    with quiet_loading():
        # The DDPM scheduler defines the forward process q used in training, whatever sampler is saved.
        noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        tokenizers = [AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)]
        text_encoders = [CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **encoder_kw)]
        if sdxl:
            tokenizers.append(AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw))
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **encoder_kw)
            )
        if vae_model_name_or_path:
            vae = AutoencoderKL.from_pretrained(vae_model_name_or_path, **dtype_kwargs(vae_dtype))
        else:
            vae = AutoencoderKL.from_pretrained(
                src, subfolder="vae", variant=variant, **kw, **dtype_kwargs(vae_dtype)
            )
        unet = None
        if load_unet:
            unet = UNet2DConditionModel.from_pretrained(
                src, subfolder="unet", variant=variant, **kw, **dtype_kwargs(unet_dtype)
            )
    logger.info(
        "loaded %s (%s): UNet in %s, text encoder%s in %s, VAE in %s",
        src, "SDXL" if sdxl else "SD", _name(unet_dtype) if load_unet else "(not loaded)", "s" if sdxl else "",
        _name(frozen_dtype), _name(vae_dtype),
    )  # fmt: skip
    for module in [vae, *text_encoders]:
        module.requires_grad_(False)
        module.eval()
    return SDComponents(
        unet=unet,
        vae=vae,
        noise_scheduler=noise_scheduler,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def encode_prompts(
    components: SDComponents, captions: list[str], device: torch.device | str
) -> tuple[Tensor, Tensor | None]:
    """Captions → ``(encoder_hidden_states [B, L, D], pooled [B, D] or None)``.

    SD1.x/2.x: the last hidden state of the one CLIP text encoder. SDXL (MATH.md §4): the penultimate
    hidden states of both encoders concatenated on the feature axis, and the pooled (projected)
    output of the second encoder.
    """

    def token_ids(tokenizer):
        return tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

    if not components.is_sdxl:
        return components.text_encoders[0](token_ids(components.tokenizers[0]))[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        ids = token_ids(tokenizer)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the second encoder)
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Tensor:
    """SDXL micro-conditioning ``[N, 6]``: (original h, w, crop top, left, target h, w)."""
    target = torch.tensor([resolution, resolution], device=original_sizes.device).expand(
        original_sizes.shape[0], 2
    )
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1).float()


def latent_shape(vae: torch.nn.Module, height: int, width: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latents the VAE makes from a ``height × width`` image."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, height // factor, width // factor)


@torch.no_grad()
def encode_images(
    vae: torch.nn.Module, pixel_values: Tensor, posterior_noise: Tensor | None = None
) -> Tensor:
    """Images ``[N, 3, H, W]`` in [−1, 1] → scaled VAE latents ``[N, C, H/f, W/f]``, a posterior sample.

    ``posterior_noise`` ``[N, C, H/f, W/f]``: the N(0, I) draw of the sample (``mean + std · noise``),
    so that the caller decides where randomness comes from; None draws it from the global RNG.
    """
    dtype = next(vae.parameters()).dtype
    dist = vae.encode(pixel_values.to(dtype)).latent_dist
    if posterior_noise is None:
        return dist.sample() * vae.config.scaling_factor
    return posterior_latents(dist.mean, dist.std, posterior_noise, vae.config.scaling_factor)


def posterior_latents(mean: Tensor, std: Tensor, posterior_noise: Tensor, scaling_factor: float) -> Tensor:
    """Scaled latents ``(mean + std · noise) · scaling_factor`` ``[N, C, h, w]`` of VAE posteriors
    ``N(mean, std²)``, computed in ``mean``'s dtype: :func:`encode_images` and a batch read from a latent
    cache (:mod:`diffusion_dpo.data.latent_cache`, which stores ``mean`` and ``std``) take this one path."""
    return (mean + std * posterior_noise.to(mean.device, mean.dtype)) * scaling_factor
