"""KTO: Kahneman–Tversky optimisation on unpaired binary feedback (Ethayarajh et al. 2024; docs/objectives.md#kto)."""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO loss (arXiv 2402.01306, Eq. 8).

    With ``r = log πθ(y|x) − log πref(y|x)`` and the reference point ``z0 = max(0, kl)`` (detached):
    desirable examples cost ``λD·(1 − σ(β(r − z0)))``, undesirable ones ``λU·(1 − σ(β(z0 − r)))``.

    Args:
        policy_logps: ``[B]`` log πθ of each completion.
        reference_logps: ``[B]`` log πref of each completion.
        desirable: ``[B]`` bool, True where the completion is desirable.
        kl: scalar KL estimate (e.g. :func:`diffusion_dpo.lm.kto_kl_estimate`, already averaged
            across processes); clamped at 0 and detached here.
        beta: β > 0.
        desirable_weight: λD >= 0.
        undesirable_weight: λU >= 0. Choose the weights so that λD·nD / (λU·nU) ∈ [1, 4/3].

    Returns:
        ``(losses, rewards)``, each ``[B]`` float32; ``rewards = β·r`` detached.
    """
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta!r}")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {name}={w!r}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got dtype {desirable.dtype}")
    if not (policy_logps.shape == reference_logps.shape == desirable.shape):
        raise ValueError(
            "policy_logps, reference_logps and desirable must share one shape [B], got "
            f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)}, {tuple(desirable.shape)}"
        )
    r = policy_logps.float() - reference_logps.float()
    z0 = torch.as_tensor(kl, dtype=torch.float32, device=r.device).detach().clamp(min=0)
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, (beta * r).detach()
