"""Pairwise preference losses over policy/reference log-likelihoods (docs/objectives.md#the-pairwise-losses-of-the-core).

Every loss here is a pure function of the per-example log-ratios

    rc = log πθ(chosen) − log πref(chosen)      [B]
    rr = log πθ(rejected) − log πref(rejected)  [B]

and returns per-example losses ``[B]``; the caller reduces. The same functions serve text models
(summed token log-probs) and diffusion models (the surrogate ``−0.5·(eθ − eref)`` of
:func:`diffusion_dpo.diffusion.pair_logratios`, docs/objectives.md#diffusion-dpo).

All arithmetic is done in float32 whatever the input dtype, and every ``log σ`` goes through
``F.logsigmoid`` so that β·δ in the thousands (diffusion-sized β) never produces NaN or inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffusion_dpo.losses.soft_labels import check_label_probabilities, expected_pairwise_loss

Tensor = torch.Tensor

DISCOPOP_TAU = 0.05


def _sigmoid(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # DPO (Rafailov et al. 2023, Eq. 7); eps > 0 is conservative DPO (cDPO, Mitchell 2023).
    z = beta * (rc - rr)
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _robust(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # Provably robust DPO (Chowdhury et al. 2024, Eq. 7): unbiased under label-flip rate eps.
    z = beta * (rc - rr)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _hinge(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # SLiC-HF (Zhao et al. 2023): hinge on the scaled margin.
    return torch.relu(1.0 - beta * (rc - rr))


def _ipo(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # IPO (Azar et al. 2023, Eq. 17) with τ = β: regress the margin to 1/(2β).
    return (rc - rr - 1.0 / (2.0 * beta)) ** 2


def _exo_pair(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # EXO (Ji et al. 2024, Eq. 13 with K = 2): reverse KL between the model's pair distribution
    # σ(βδ) and the smoothed label distribution (1 − eps, eps).
    z = beta * (rc - rr)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1.0 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # NCA (Chen et al. 2024, Eq. 9 for a pair): absolute rewards, pushes rc up and both below 0.
    return -F.logsigmoid(beta * rc) - 0.5 * F.logsigmoid(-beta * rc) - 0.5 * F.logsigmoid(-beta * rr)


def _bco_pair(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # BCO (Jung et al. 2024) on pairs, without a running-mean shift (as TRL >= 0.29).
    return -F.logsigmoid(beta * rc) - F.logsigmoid(-beta * rr)


def _sppo_hard(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # SPPO (Wu et al. 2024) with hard win probabilities 1 and 0: regress rc to +1/(2β), rr to −1/(2β).
    return (rc - 1.0 / (2.0 * beta)) ** 2 + (rr + 1.0 / (2.0 * beta)) ** 2


def _apo_zero(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # APO-zero (D'Oosterlinck et al. 2024): chosen better than the reference, rejected worse.
    return 1.0 - torch.sigmoid(beta * rc) + torch.sigmoid(beta * rr)


def _apo_down(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # APO-down (same paper): both go down, the rejected one more.
    return torch.sigmoid(beta * rc) + 1.0 - torch.sigmoid(beta * (rc - rr))


def _discopop(rc: Tensor, rr: Tensor, beta: float, eps: float) -> Tensor:
    # DiscoPOP / LRML (Lu et al. 2024, arXiv 2406.08414): a sigmoid-gated blend of the DPO and an
    # exponential loss.
    rho = beta * (rc - rr)
    mix = torch.sigmoid(rho / DISCOPOP_TAU)
    # exp(-rho) overflows for very negative rho; the blend weight there is 0, so clamp is exact.
    exp_term = torch.exp(-rho.clamp(min=-80.0))
    return (1.0 - mix) * -F.logsigmoid(rho) + mix * exp_term


PAIRWISE_LOSSES: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
}

#: Loss types that read ``label_smoothing`` (ε) and the range it must lie in.
_SMOOTHING_RANGE = {
    "sigmoid": ("0 <= label_smoothing < 0.5", lambda e: 0.0 <= e < 0.5),
    "robust": ("0 <= label_smoothing < 0.5", lambda e: 0.0 <= e < 0.5),
    "exo_pair": ("0 < label_smoothing < 1", lambda e: 0.0 < e < 1.0),
}


def check_pairwise_args(loss_type: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Raise ``ValueError`` naming the parameter if (loss_type, beta, label_smoothing) is invalid."""
    if loss_type not in PAIRWISE_LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; choose one of {sorted(PAIRWISE_LOSSES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta!r}")
    if loss_type in _SMOOTHING_RANGE:
        allowed, ok = _SMOOTHING_RANGE[loss_type]
        if not ok(label_smoothing):
            raise ValueError(
                f"label_smoothing={label_smoothing!r} is invalid for loss_type={loss_type!r}; allowed: {allowed}"
            )
    elif label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing!r} has no meaning for loss_type={loss_type!r}; "
            f"it is used only by {sorted(_SMOOTHING_RANGE)} (leave it at 0.0)"
        )


def pairwise_loss_from_logratios(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    label_p: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairwise preference loss from log-ratios ``rc`` and ``rr`` (each ``[B]``).

    ``label_p``: ``[B]`` P(chosen preferred), soft labels; the loss is then the expected loss
    ``p·ℓ(rc, rr) + (1 − p)·ℓ(rr, rc)`` (:func:`~diffusion_dpo.losses.soft_labels.expected_pairwise_loss`).
    None: every chosen side was preferred (p = 1).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]`` float32, where the rewards
    are the detached implicit rewards ``β·rc`` and ``β·rr``.
    """
    check_pairwise_args(loss_type, beta, label_smoothing)
    if chosen_logratios.shape != rejected_logratios.shape:
        raise ValueError(
            f"chosen and rejected log-ratios must have the same shape, got "
            f"{tuple(chosen_logratios.shape)} and {tuple(rejected_logratios.shape)}"
        )
    rc = chosen_logratios.float()
    rr = rejected_logratios.float()
    loss = PAIRWISE_LOSSES[loss_type]
    if label_p is None:
        losses = loss(rc, rr, float(beta), float(label_smoothing))
    else:
        check_label_probabilities(label_p, rc.shape[0])
        losses = expected_pairwise_loss(loss, rc, rr, label_p, float(beta), float(label_smoothing))
    return losses, (beta * rc).detach(), (beta * rr).detach()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    label_p: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO and its pairwise variants, per example (docs/objectives.md#the-pairwise-losses-of-the-core; TRL's argument names).

    Args:
        policy_chosen_logps: ``[B]`` log πθ(chosen | prompt) (summed, or averaged for IPO-style use).
        policy_rejected_logps: ``[B]`` log πθ(rejected | prompt).
        reference_chosen_logps: ``[B]`` log πref(chosen | prompt), computed without gradient.
        reference_rejected_logps: ``[B]`` log πref(rejected | prompt).
        beta: β > 0, the KL strength (IPO's τ for ``ipo``). 0.1 is the LM default; diffusion uses
            the paper's ``beta_dpo`` (e.g. 5000).
        loss_type: one of ``PAIRWISE_LOSSES``: sigmoid, robust, hinge, ipo, exo_pair, nca_pair,
            bco_pair, sppo_hard, apo_zero, apo_down, discopop.
        label_smoothing: ε, the assumed label-flip rate; used by sigmoid (cDPO) and robust
            (0 <= ε < 0.5) and exo_pair (0 < ε < 1).
        label_p: ``[B]`` P(chosen preferred) for soft labels (vote shares); None: hard labels.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]`` float32; rewards are
        ``β·(policy − reference)`` and detached.
    """
    return pairwise_loss_from_logratios(
        policy_chosen_logps.float() - reference_chosen_logps.float(),
        policy_rejected_logps.float() - reference_rejected_logps.float(),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        label_p=label_p,
    )
