"""The random draws of a training step, made per row from ``(seed, epoch, row index)`` only.

Every row of a batch gets its own generator, keyed like its augmentation
(:func:`diffusion_dpo.data.transforms.row_rng`) but with another purpose tag, and draws from it in a
fixed order: its timestep, its noise (shared by the winner and the loser of a pair), then the VAE
posterior noise of each of its images. Nothing comes from the global RNG, so:

- processes draw distinct noise, because they hold distinct rows (seeding every process alike, as
  ``set_seed(seed)`` does, gives every GPU the same stream: N GPUs pay for N draws and get one);
- N processes with B rows each draw exactly what one process with N·B rows draws, whatever the
  gradient accumulation, so a multi-GPU run can be checked against a single-process run;
- a resumed run redraws what the uninterrupted run drew, without saving any RNG state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffusion_dpo.transfer import to_device

Tensor = torch.Tensor

#: Separates these draws from the augmentation generator of the same (seed, epoch, index).
_PURPOSE_TRAIN = 0x5EED_D1FF
#: Held-out implicit accuracy: noise per (pair, timestep), the same for every model and process.
_PURPOSE_HELDOUT = 0x4E1D_0A7


def row_generator(*key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by a hash of the integers ``key``."""
    hi, lo = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(hi) << 32) | int(lo))


@dataclass
class RowDraws:
    """What one micro-batch draws, on the CPU in float32 (move with ``.to``)."""

    timesteps: Tensor  # [B] long in {0..T-1}: uniform (DDPM) or the flow process's σ draw
    noise: Tensor  # [B, C, h, w], ε ~ N(0, I), shared by both images of a pair
    posterior: Tensor  # [K, B, C, h, w]: N(0, I) for the VAE posterior sample of each of K images

    def to(self, device, dtype) -> RowDraws:
        return RowDraws(
            to_device(self.timesteps, device),
            to_device(self.noise, device, dtype),
            to_device(self.posterior, device, dtype),
        )


def draw_for_rows(
    seed: int,
    epoch: int,
    indices: Tensor | list[int],
    latent_shape: tuple[int, int, int],
    num_train_timesteps: int,
    images_per_row: int,
    sample_timestep: Callable[[torch.Generator], Tensor] | None = None,
) -> RowDraws:
    """Draw timestep, noise and posterior noise for each row ``(seed, epoch, index)``.

    ``indices`` ``[B]``: the rows' indices in the epoch (unique within an epoch, across processes).
    ``latent_shape``: ``(C, h, w)`` of one image's latents. ``images_per_row``: 2 for a pair
    (winner, loser), 1 for KTO and SFT. ``sample_timestep``: the process's timestep draw from a
    generator (``[1]`` long; a flow model's weighting scheme); None: uniform over ``num_train_timesteps``.
    """
    timesteps, noise, posterior = [], [], []
    index_list = indices.tolist() if isinstance(indices, Tensor) else list(indices)
    for index in index_list:
        g = row_generator(seed, epoch, index, _PURPOSE_TRAIN)
        if sample_timestep is None:
            timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        else:
            timesteps.append(sample_timestep(g))
        noise.append(torch.randn(latent_shape, generator=g))
        posterior.append(torch.randn((images_per_row, *latent_shape), generator=g))
    return RowDraws(torch.cat(timesteps), torch.stack(noise), torch.stack(posterior, dim=1))


def heldout_noise(seed: int, pair_indices: list[int], timestep: int, latent_shape: tuple[int, ...]) -> Tensor:
    """``[B, C, h, w]`` noise for held-out pairs at one fixed timestep, keyed by (seed, pair, timestep):
    every model, checkpoint and process sees the same draw for the same pair."""
    return torch.stack(
        [
            torch.randn(latent_shape, generator=row_generator(seed, index, timestep, _PURPOSE_HELDOUT))
            for index in pair_indices
        ]
    )
