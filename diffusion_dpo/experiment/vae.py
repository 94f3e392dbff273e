"""Fit the tiny VAE of the synthetic experiment, and build the untrained SD-shaped pipeline around it.

A random VAE does not reconstruct anything, so a base model trained in its latent space would make
images no scorer can read. :func:`fit_vae` trains the tiny ``AutoencoderKL``
(:func:`~diffusion_dpo.models.tiny.tiny_vae_config`) on renders of the shapes world with SD's
autoencoder objective reduced to its two essentials: a pixel reconstruction loss and a small KL term
towards N(0, I) (Rombach et al. 2022, arXiv 2112.10752, §3: "a slight KL-penalty towards a standard
normal"; no perceptual or adversarial loss — flat-coloured shapes do not need them).
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


def fit_vae(
    pixels: Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    log_every: int = 50,
):
    """Train a tiny ``AutoencoderKL`` on ``pixels`` ``[N, 3, H, W]`` in [−1, 1] and set its ``scaling_factor``.

    Loss per batch: ``mean((decode(z) − x)²) + kl_weight · KL(q(z|x) ‖ N(0, I)) / (C·h·w)`` with ``z`` a
    posterior sample (so the decoder learns to tolerate small latent errors, as a diffusion model's
    latents will have). AdamW with a one-cycle schedule (warm-up 5%, cosine decay), so a few hundred
    steps suffice. Returns the VAE in eval mode, with ``scaling_factor`` from
    :func:`latent_scaling_factor`.
    """
    from diffusers import AutoencoderKL

    from diffusion_dpo.models.tiny import tiny_vae_config

    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [N, 3, H, W], got shape {tuple(pixels.shape)}")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be > 0, got steps={steps}, batch_size={batch_size}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = dict(tiny_vae_config(), sample_size=pixels.shape[-1])
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
        latents = posterior.sample(generator=generator)  # [B, 4, h, w]
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
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, pixels[:512]))
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


def build_base_pipeline(vae, seed: int = 0, resolution: int = 32, prediction_type: str = "epsilon"):
    """The tiny SD1.5-shaped pipeline of :func:`~diffusion_dpo.models.tiny.build_tiny_pipeline` (random
    UNet, tiny CLIP text encoder and tokenizer, DDIM scheduler) with ``vae`` in place of its random VAE.

    ``prediction_type``: ``"epsilon"`` (SD1.x) or ``"v_prediction"`` (SD 2.x, Salimans & Ho 2022,
    arXiv 2202.00512), written into the scheduler config that the trainer and the sampler read.
    """
    from diffusion_dpo.models.tiny import build_tiny_pipeline

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    pipe = build_tiny_pipeline(seed=seed, resolution=resolution)
    pipe.register_modules(vae=vae)
    pipe.scheduler.register_to_config(prediction_type=prediction_type)
    return pipe
