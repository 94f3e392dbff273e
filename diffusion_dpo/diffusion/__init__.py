"""Diffusion objectives: the log-ratio surrogate, DPO/SFT/KTO pieces, implicit-reward accuracy, and
the per-row random draws of a training step."""

from diffusion_dpo.diffusion.draws import RowDraws, draw_for_rows, heldout_noise, row_generator
from diffusion_dpo.diffusion.objective import (
    adapters_disabled,
    denoising_errors,
    denoising_target,
    implicit_reward_accuracy,
    implicit_reward_scores,
    logratios_from_errors,
    pair_denoising_errors,
    pair_logratios,
    per_sample_mse,
    sft_losses,
)

__all__ = [
    "RowDraws",
    "adapters_disabled",
    "denoising_errors",
    "denoising_target",
    "draw_for_rows",
    "heldout_noise",
    "implicit_reward_accuracy",
    "implicit_reward_scores",
    "logratios_from_errors",
    "pair_denoising_errors",
    "pair_logratios",
    "per_sample_mse",
    "row_generator",
    "sft_losses",
]
