"""Diffusion objectives: the log-ratio surrogate, DPO/SFT/KTO pieces, implicit-reward accuracy, the
forward processes of the model families (DDPM, rectified flow), and the per-row random draws of a
training step.

May import: :mod:`diffusion_dpo.transfer` only: pure tensor code, family-agnostic (the families
hand it their process and prediction).
"""

from diffusion_dpo.diffusion.adapters import adapters_disabled
from diffusion_dpo.diffusion.draws import RowDraws, draw_for_rows, heldout_noise, row_generator
from diffusion_dpo.diffusion.objective import (
    PairOutputs,
    denoising_errors,
    denoising_target,
    implicit_reward_accuracy,
    implicit_reward_scores,
    logratios_from_errors,
    pair_denoising_errors,
    pair_denoising_outputs,
    pair_logratios,
    per_sample_mse,
    sft_losses,
)
from diffusion_dpo.diffusion.processes import DDPMProcess, FlowMatchProcess, as_process

__all__ = [
    "DDPMProcess",
    "FlowMatchProcess",
    "PairOutputs",
    "RowDraws",
    "as_process",
    "adapters_disabled",
    "denoising_errors",
    "denoising_target",
    "draw_for_rows",
    "heldout_noise",
    "implicit_reward_accuracy",
    "implicit_reward_scores",
    "logratios_from_errors",
    "pair_denoising_errors",
    "pair_denoising_outputs",
    "pair_logratios",
    "per_sample_mse",
    "row_generator",
    "sft_losses",
]
