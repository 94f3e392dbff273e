"""Load Stable Diffusion (SD1.x/2.x, SDXL, SD3) components and turn captions/images into denoiser inputs.

Everything goes through ``from_pretrained``, so a hub id (e.g. ``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``) and a local diffusers folder take the same path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from diffusion_dpo.models.families import ModelFamily, SDFamily, SDXLFamily, family_for_index
from diffusion_dpo.models.pretrained import dtype_kwargs, quiet_loading, read_model_index

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion pipeline the trainer needs, and the family that knows how to use
    them (SDXL: two tokenizers/encoders; SD3: two CLIPs and T5, and a transformer as ``unet``)."""

    unet: torch.nn.Module | None  # the denoiser (UNet or transformer); None when loaded with load_unet=False
    vae: torch.nn.Module
    noise_scheduler: object
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    family: ModelFamily | None = None  # None: told by the number of text encoders (1: SD, 2: SDXL)

    def __post_init__(self):
        if self.family is None:
            self.family = SDXLFamily() if len(self.text_encoders) == 2 else SDFamily()


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    vae_model_name_or_path: str | None = None,
    *,
    frozen_dtype: torch.dtype = torch.float32,
    unet_dtype: torch.dtype = torch.float32,
    load_unet: bool = True,
    load_text_encoders: bool = True,
    family_options: dict | None = None,
) -> SDComponents:
    """Load the denoiser (UNet or transformer), VAE, training noise scheduler, tokenizer(s) and text
    encoder(s) on CPU, as the model's family (:mod:`diffusion_dpo.models.families`, recognised from
    ``model_index.json``) says.

    Each part is loaded in the dtype it is used in (casting after loading makes diffusers warn):
    the denoiser in ``unet_dtype``, the frozen text encoders and VAE in ``frozen_dtype``, except SDXL's
    own VAE, which overflows in fp16 and stays fp32. ``vae_model_name_or_path`` swaps in another VAE
    (e.g. ``madebyollin/sdxl-vae-fp16-fix``, which is stable in fp16). ``load_unet=False`` leaves the
    denoiser out (``unet`` is None), for encoding data only; ``load_text_encoders=False`` the tokenizers
    and text encoders (empty lists), for training from precomputed text embeddings. ``family_options``:
    ``drop_t5``, ``max_sequence_length`` and the flow process's options (SD3).
    """
    from diffusers import AutoencoderKL

    index = read_model_index(pretrained_model_name_or_path, revision)
    family = family_for_index(index, pretrained_model_name_or_path, **(family_options or {}))
    vae_dtype = family.vae_dtype(frozen_dtype, own_vae=not vae_model_name_or_path)
    src = pretrained_model_name_or_path
    with quiet_loading():
        noise_scheduler = family.load_noise_scheduler(src, revision=revision)
        tokenizers, text_encoders = (
            family.load_text_encoders(src, revision, variant, frozen_dtype)
            if load_text_encoders
            else ([], [])
        )
        if vae_model_name_or_path:
            vae = AutoencoderKL.from_pretrained(vae_model_name_or_path, **dtype_kwargs(vae_dtype))
        else:
            vae = family.load_vae(src, revision, variant, vae_dtype)
        unet = family.load_denoiser(src, unet_dtype, revision, variant) if load_unet else None
    logger.info(
        "loaded %s (%s): %s in %s, text encoder%s in %s, VAE in %s",
        src, family.label, family.denoiser_label, _name(unet_dtype) if load_unet else "(not loaded)",
        "s" if len(text_encoders) > 1 else "", _name(frozen_dtype) if text_encoders else "(not loaded)",
        _name(vae_dtype),
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
        family=family,
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def encode_prompts(
    components: SDComponents, captions: list[str], device: torch.device | str
) -> tuple[Tensor, Tensor | None]:
    """Captions → ``(encoder_hidden_states [B, L, D], pooled [B, D] or None)``, as the family encodes
    them. SD1.x/2.x: the last hidden state of the one CLIP text encoder. SDXL (MATH.md §4): the
    penultimate hidden states of both encoders concatenated on the feature axis, and the pooled
    (projected) output of the second encoder. SD3: :mod:`diffusion_dpo.models.families.sd3`."""
    return components.family.encode_prompts(components, captions, device)


def latent_shape(vae: torch.nn.Module, height: int, width: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latents the VAE makes from a ``height × width`` image."""
    factor = getattr(vae, "spatial_compression_ratio", None) or 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, height // factor, width // factor)


def to_unit_range(pixels: Tensor) -> Tensor:
    """Image pixels as the VAE takes them: uint8 ``0..255`` → float32 ``x / 127.5 − 1`` in [−1, 1]; a
    float tensor is taken to be in [−1, 1] already and returned as it is.

    The data loader hands images over as uint8 and the step scales them where they are used (on the
    GPU): a quarter of the bytes through the workers' shared memory and the host-to-device copy, and
    the same float32 values, op for op, as scaling them in the loader."""
    return pixels.float() / 127.5 - 1.0 if pixels.dtype == torch.uint8 else pixels


@torch.no_grad()
def encode_images(
    vae: torch.nn.Module, pixel_values: Tensor, posterior_noise: Tensor | None = None
) -> Tensor:
    """Images ``[N, 3, H, W]`` (uint8, or float in [−1, 1]: :func:`to_unit_range`) → scaled VAE latents
    ``[N, C, H/f, W/f]``, a posterior sample.

    ``posterior_noise`` ``[N, C, H/f, W/f]``: the N(0, I) draw of the sample (``mean + std · noise``),
    so that the caller decides where randomness comes from; None draws it from the global RNG.
    """
    dtype = next(vae.parameters()).dtype
    dist = vae.encode(to_unit_range(pixel_values).to(dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None)
    if posterior_noise is None:
        return scaled_latents(dist.sample(), vae.config.scaling_factor, shift)
    return posterior_latents(dist.mean, dist.std, posterior_noise, vae.config.scaling_factor, shift)


def scaled_latents(z: Tensor, scaling_factor: float, shift_factor: float | None = None) -> Tensor:
    """The denoiser's latents of VAE latents ``z``: ``z · scaling_factor``, or ``(z − shift_factor) ·
    scaling_factor`` for VAEs with a shift (SD3's)."""
    return z * scaling_factor if shift_factor is None else (z - shift_factor) * scaling_factor


def posterior_latents(
    mean: Tensor,
    std: Tensor,
    posterior_noise: Tensor,
    scaling_factor: float,
    shift_factor: float | None = None,
) -> Tensor:
    """Scaled latents of a sample ``mean + std · noise`` ``[N, C, h, w]`` of VAE posteriors
    ``N(mean, std²)`` (:func:`scaled_latents`), computed in ``mean``'s dtype: :func:`encode_images` and a
    batch read from a latent cache (:mod:`diffusion_dpo.data.latent_cache`, which stores ``mean`` and
    ``std``) take this one path."""
    return scaled_latents(
        mean + std * posterior_noise.to(mean.device, mean.dtype), scaling_factor, shift_factor
    )
