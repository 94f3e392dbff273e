"""Diffusion objectives: the log-ratio surrogate, DPO/SFT/KTO pieces and implicit-reward accuracy."""

from diffusion_dpo.diffusion.objective import (
    adapters_disabled,
    denoising_errors,
    denoising_target,
    implicit_reward_accuracy,
    logratios_from_errors,
    pair_denoising_errors,
    pair_logratios,
    per_sample_mse,
    sample_noise_and_timesteps,
    sft_losses,
)

__all__ = [
    "adapters_disabled",
    "denoising_errors",
    "denoising_target",
    "implicit_reward_accuracy",
    "logratios_from_errors",
    "pair_denoising_errors",
    "pair_logratios",
    "per_sample_mse",
    "sample_noise_and_timesteps",
    "sft_losses",
]
