"""MaPO: margin-aware preference optimisation without a reference model (docs/objectives.md#mapo).

Hong et al. 2024, "Margin-aware Preference Optimization for Aligning Diffusion Models without
Reference", arXiv 2406.06424. The formula is the one of the authors' code (mapo-t2i/mapo, ``utils.py``
``compute_loss``; flags ``--beta_mapo`` and ``--snr_value`` in ``args.py``), written here as a pure
per-example function on denoising errors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Below this x the closed form x/(eˣ − 1) is 0/0-prone; its Taylor series 1 − x/2 + x²/12 is exact to
# x⁴/720 < 2e-15 there, far below float32 resolution.
_SMALL_X = 1e-3


def check_mapo_args(beta_mapo: float, snr_value: float, num_train_timesteps: int = 1000) -> None:
    """Raise ``ValueError`` naming the parameter if MaPO's hyperparameters are out of range."""
    if not (math.isfinite(beta_mapo) and beta_mapo >= 0):
        raise ValueError(f"beta_mapo must be a finite number >= 0, got beta_mapo={beta_mapo!r}")
    if not (math.isfinite(snr_value) and snr_value > 0):
        # s(L) is decreasing in L only for γ > 0: with γ <= 0 the margin term would reward the loser
        raise ValueError(f"snr_value must be a finite number > 0, got snr_value={snr_value!r}")
    if not num_train_timesteps > 0:
        raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps!r}")


def mapo_score(errors: Tensor, snr_value: float = 0.5) -> Tensor:
    """MaPO's bounded score of an image, ``s(L) = γL / (exp(γL) − 1)`` with ``γ = snr_value``.

    ``errors`` ``[N]``: per-image denoising errors ``L >= 0``. Returns ``[N]`` float32 in ``(0, 1]``:
    ``s(0) = 1``, strictly decreasing in ``L``, ``→ 0`` as ``L → ∞`` (a lower error scores higher).
    Computed as ``x·e⁻ˣ / (1 − e⁻ˣ)`` (finite value and gradient for large ``x``, where the authors'
    ``x / (exp(x) − 1)`` overflows) and by its Taylor series near 0 (where it is 0/0).
    """
    x = snr_value * errors.float()
    small = x.abs() < _SMALL_X
    safe = torch.where(small, torch.ones_like(x), x)  # keeps the unused branch's gradient finite
    closed = safe * torch.exp(-safe) / -torch.expm1(-safe)
    series = 1.0 - x / 2.0 + x * x / 12.0
    return torch.where(small, series, closed)


def mapo_loss(
    chosen_errors: Tensor,
    rejected_errors: Tensor,
    *,
    beta_mapo: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> tuple[Tensor, Tensor, Tensor]:
    """MaPO (Hong et al. 2024, arXiv 2406.06424), per example:

        loss = L_w − β · log σ( T · (s(L_w) − s(L_l)) ),   s(L) = γL / (exp(γL) − 1)

    Args:
        chosen_errors: ``[B]`` per-image denoising errors ``L_w`` of the preferred images (mean over
            C×H×W of the squared prediction error; :func:`diffusion_dpo.diffusion.per_sample_mse`).
        rejected_errors: ``[B]`` errors ``L_l`` of the rejected images, on the same noise and
            timestep as their winners.
        beta_mapo: β, the weight of the margin term (authors' ``--beta_mapo``, default 0.1).
        snr_value: γ of the score (authors' ``--snr_value``, default 0.5).
        num_train_timesteps: T, the scheduler's number of training timesteps (1000 for SD); the
            authors multiply the log-odds by it "to maximize the margin throughout the overall
            denoising process".

    Returns:
        ``(losses, chosen_scores, rejected_scores)``, each ``[B]`` float32. ``losses`` carries the
        gradient (the mean over a batch is the authors' ``model_losses_w.mean() − ratio_losses.mean()``);
        the scores ``s(L_w)``, ``s(L_l)`` are detached (the authors log their means as "Win Score" and
        "Lose Score"), and their difference is the log-odds. The margin term's derivative is
        positive in ``L_w`` and negative in ``L_l``: it lowers the winner's error and raises the
        loser's (diffusers' research ``diffusion_orpo`` script, whose log-odds is ``L_w − L_l``, does
        the opposite in its margin term; docs/objectives.md#mapo).
    """
    check_mapo_args(beta_mapo, snr_value, num_train_timesteps)
    if chosen_errors.shape != rejected_errors.shape:
        raise ValueError(
            f"chosen_errors {tuple(chosen_errors.shape)} and rejected_errors "
            f"{tuple(rejected_errors.shape)} must have the same shape"
        )
    lw = chosen_errors.float()
    sw = mapo_score(lw, snr_value)
    sl = mapo_score(rejected_errors.float(), snr_value)
    losses = lw - beta_mapo * F.logsigmoid(num_train_timesteps * (sw - sl))
    return losses, sw.detach(), sl.detach()
