"""Fit the tiny VAE of the synthetic experiment, and build the untrained SD-shaped pipeline around it.

A random VAE does not reconstruct anything, so a base model trained in its latent space would make
images no scorer can read. :func:`fit_vae` trains the tiny ``AutoencoderKL``
(:func:`~diffusion_dpo.models.tiny.tiny_vae_config`) on renders of the shapes world with SD's
autoencoder objective reduced to its two essentials: a pixel reconstruction loss and a small KL term
towards N(0, I) (Rombach et al. 2022, arXiv 2112.10752, §3: "a slight KL-penalty towards a standard
normal"; no perceptual or adversarial loss — flat-coloured shapes do not need them).

SD1.x/2.x/XL latents have 4 channels and are ``z·scaling_factor``; SD3's have 16 and are
``(z − shift_factor)·scaling_factor`` (its VAE config: shift 0.0609, scale 1.5305). ``fit_vae(...,
latent_channels=16)`` fits the SD3-shaped VAE (:func:`~diffusion_dpo.models.tiny.tiny_sd3_vae_config`)
and sets both factors from the fitted posterior means.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


def images_to_tensor(images) -> Tensor:
    """PIL images (RGB, all the same size) → ``[N, 3, H, W]`` float32 in [−1, 1], as the trainer feeds
    the VAE (``diffusion_dpo.data.transforms``)."""
    if not images:
        raise ValueError("images is empty")
    arrays = [np.array(image.convert("RGB"), dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def latent_scaling_factor(vae, pixels: Tensor, batch_size: int = 64) -> float:
    """``1 / std`` of the posterior means of ``pixels`` ``[N, 3, H, W]``: scaled latents have unit variance,
    as SD's 0.18215 was chosen (Rombach et al. 2022, §G), so the image is not drowned by (or does not
    drown) the unit-variance diffusion noise."""
    means = torch.cat(
        [vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)]
    )
    return float(1.0 / means.std())


@torch.no_grad()
def latent_shift_and_scale(vae, pixels: Tensor, batch_size: int = 64) -> tuple[float, float]:
    """SD3's latent normalisation ``(shift_factor, scaling_factor)`` = (mean, ``1 / std``) of the
    posterior means of ``pixels`` ``[N, 3, H, W]``: ``(z − shift)·scale`` has zero mean and unit variance
    on them."""
    means = torch.cat(
        [vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)]
    )
    return float(means.mean()), float(1.0 / means.std())


#: ``fit_vae(latent_channels=...)``: the SD1.5-shaped (4) and the SD3-shaped (16) tiny VAE.
LATENT_CHANNELS = (4, 16)


def fit_vae(
    pixels: Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    log_every: int = 50,
    latent_channels: int = 4,
):
    """Train a tiny ``AutoencoderKL`` on ``pixels`` ``[N, 3, H, W]`` in [−1, 1] and set its latent normalisation.

    Loss per batch: ``mean((decode(z) − x)²) + kl_weight · KL(q(z|x) ‖ N(0, I)) / (C·h·w)`` with ``z`` a
    posterior sample (so the decoder learns to tolerate small latent errors, as a diffusion model's
    latents will have). AdamW with a one-cycle schedule (warm-up 5%, cosine decay), so a few hundred
    steps suffice. Returns the VAE in eval mode.

    ``latent_channels``: 4, SD1.5's tiny VAE (:func:`~diffusion_dpo.models.tiny.tiny_vae_config`), with
    ``scaling_factor`` from :func:`latent_scaling_factor`; or 16, SD3's
    (:func:`~diffusion_dpo.models.tiny.tiny_sd3_vae_config`: no quant convolutions), with
    ``shift_factor`` and ``scaling_factor`` from :func:`latent_shift_and_scale`.
    """
    from diffusers import AutoencoderKL

    from diffusion_dpo.models.tiny import tiny_sd3_vae_config, tiny_vae_config

    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [N, 3, H, W], got shape {tuple(pixels.shape)}")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be > 0, got steps={steps}, batch_size={batch_size}")
    if latent_channels not in LATENT_CHANNELS:
        raise ValueError(f"latent_channels must be 4 (SD1.5) or 16 (SD3), got {latent_channels}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base_config = tiny_vae_config() if latent_channels == 4 else tiny_sd3_vae_config()
    config = dict(base_config, sample_size=pixels.shape[-1])
    vae = AutoencoderKL(**config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05
    )
    vae.train()
    started = time.time()
    for step in range(1, steps + 1):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.sample(generator=generator)  # [B, latent_channels, h, w]
        reconstruction = vae.decode(latents).sample
        mse = (reconstruction - batch).pow(2).mean()
        kl = posterior.kl().mean() / latents[0].numel()  # per latent element, like the pixel MSE
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            logger.info(
                "vae step %d/%d: reconstruction mse %.4f, kl %.3f (%.0f s)",
                step, steps, mse.item(), kl.item(), time.time() - started,
            )  # fmt: skip
    vae.eval()
    if latent_channels == 4:
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, pixels[:512]))
    else:
        shift, scale = latent_shift_and_scale(vae, pixels[:512])
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


@torch.no_grad()
def reconstruct(vae, pixels: Tensor) -> Tensor:
    """Decode the posterior means of ``pixels`` ``[N, 3, H, W]`` → ``[N, 3, H, W]`` clamped to [−1, 1]."""
    return vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)


def tensor_to_images(pixels: Tensor) -> list:
    """``[N, 3, H, W]`` in [−1, 1] → PIL images."""
    from PIL import Image

    array = ((pixels.permute(0, 2, 3, 1).float().numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in array]


#: ``build_base_pipeline(arch=...)``: the tiny pipelines a fitted VAE can be put into, and the VAE's
#: latent channels each needs (``fit_vae(latent_channels=...)``).
ARCH_LATENT_CHANNELS = {"sd15": 4, "sd3": 16}


def sd3_transformer_config(resolution: int) -> dict:
    """The tiny SD3 transformer (:func:`~diffusion_dpo.models.tiny.tiny_sd3_transformer_config`) with its
    position-embedding grid twice the patch grid of ``resolution``-pixel images (16 for 32 px).

    SD3 crops the patches' sin-cos positions from a ``pos_embed_max_size``² grid whose unit is
    ``patch grid / pos_embed_max_size`` patches, so a grid much larger than the image packs the
    patches' positions close together: at 32 (the tiny pipeline's floor) neighbouring patches of a
    32 px image are 0.25 apart, and the two-block transformer hardly tells them apart. Measured on the
    shapes world (full scale, 2000 pretraining steps): its samples are scattered speckles of the named
    colour, mean faithfulness 0.115 (the grid of 32), against one blob per image and 0.227 (16); final
    training loss 0.54 vs 0.48, and four blocks instead of two did not lower it (0.485). Twice the patch
    grid still renders twice the resolution, as the tiny pipeline's own grid is meant to.
    """
    from diffusion_dpo.models.tiny import tiny_sd3_transformer_config

    config = tiny_sd3_transformer_config(sample_size=resolution // 2)
    config["pos_embed_max_size"] = 2 * config["sample_size"] // config["patch_size"]
    return config


def build_base_pipeline(
    vae, seed: int = 0, resolution: int = 32, prediction_type: str = "epsilon", arch: str = "sd15"
):
    """A tiny pipeline with random denoiser weights and ``vae`` in place of its random VAE.

    ``arch="sd15"``: the SD1.5-shaped pipeline of :func:`~diffusion_dpo.models.tiny.build_tiny_pipeline`
    (random UNet, tiny CLIP text encoder and tokenizer, DDIM scheduler); ``prediction_type``:
    ``"epsilon"`` (SD1.x) or ``"v_prediction"`` (SD 2.x, Salimans & Ho 2022, arXiv 2202.00512), written
    into the scheduler config that the trainer and the sampler read.

    ``arch="sd3"``: the SD3-shaped pipeline of :func:`~diffusion_dpo.models.tiny.build_tiny_sd3_pipeline`
    (random MMDiT, two tiny CLIPs and a tiny T5, flow-matching Euler scheduler with shift 3) with the
    transformer of :func:`sd3_transformer_config`; ``vae`` must have 16 latent channels
    (``fit_vae(latent_channels=16)``). ``prediction_type`` does not apply: a flow model predicts the
    velocity ``ε − x0``.
    """
    if arch not in ARCH_LATENT_CHANNELS:
        raise ValueError(f"arch must be one of {tuple(ARCH_LATENT_CHANNELS)}, got {arch!r}")
    if vae.config.latent_channels != ARCH_LATENT_CHANNELS[arch]:
        raise ValueError(
            f"a {arch} pipeline needs a VAE with {ARCH_LATENT_CHANNELS[arch]} latent channels, got "
            f"{vae.config.latent_channels} (fit_vae(latent_channels={ARCH_LATENT_CHANNELS[arch]}))"
        )
    if arch == "sd3":
        from diffusers import SD3Transformer2DModel

        from diffusion_dpo.models.tiny import build_tiny_sd3_pipeline

        pipe = build_tiny_sd3_pipeline(seed=seed, resolution=resolution)
        config = sd3_transformer_config(resolution)
        if dict(pipe.transformer.config)["pos_embed_max_size"] != config["pos_embed_max_size"]:
            torch.manual_seed(seed)
            pipe.register_modules(transformer=SD3Transformer2DModel(**config))
        pipe.register_modules(vae=vae)
        return pipe

    from diffusion_dpo.models.tiny import build_tiny_pipeline

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    pipe = build_tiny_pipeline(seed=seed, resolution=resolution)
    pipe.register_modules(vae=vae)
    pipe.scheduler.register_to_config(prediction_type=prediction_type)
    return pipe
