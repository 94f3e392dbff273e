"""Reference-free preference losses: SimPO and ORPO (docs/objectives.md#reference-free-relatives-simpo-and-orpo-text-models)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def simpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, Eq. 6): ``−logσ(β·(avg_c − avg_r) − γ)`` with ``γ = β·gamma_beta_ratio``.

    Inputs are per-token **averaged** log-probs ``[B]``; no reference model. ``label_smoothing``
    gives the cDPO-style smoothed variant. Returns ``(losses, chosen_rewards, rejected_rewards)``
    with rewards ``β·avg_logp`` (detached).
    """
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must satisfy 0 <= label_smoothing < 0.5, got {label_smoothing!r}")
    c = policy_chosen_avg_logps.float()
    r = policy_rejected_avg_logps.float()
    z = beta * (c - r) - beta * gamma_beta_ratio
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, (beta * c).detach(), (beta * r).detach()


def _log1mexp(x: Tensor) -> Tensor:
    # log(1 − exp(x)) for x < 0, stable near 0 and for very negative x (Mächler 2012).
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    chosen_nll: Tensor,
    *,
    lam: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, Eq. 6–7): ``NLL(chosen) − λ·logσ(log odds_c − log odds_r)``.

    ``log odds(y) = log p − log(1 − p)`` with ``log p`` the per-token **averaged** log-prob ``[B]``
    (must be < 0). ``chosen_nll`` ``[B]`` is the SFT term (per-token averaged NLL of the chosen
    completion). Returns ``(losses, chosen_rewards, rejected_rewards)`` with rewards ``λ·avg_logp``
    (detached), as TRL reports them.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got lam={lam!r}")
    c = policy_chosen_avg_logps.float()
    r = policy_rejected_avg_logps.float()
    log_odds = (c - _log1mexp(c)) - (r - _log1mexp(r))
    losses = chosen_nll.float() - lam * F.logsigmoid(log_odds)
    return losses, (lam * c).detach(), (lam * r).detach()
