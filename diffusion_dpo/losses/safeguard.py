"""Diffusion-SDPO's winner safeguard (Fu et al. 2025, arXiv 2511.03317): a closed-form scale on the
loser's gradient so that, to first order, an update does not raise the winner's denoising error.

Plain Diffusion-DPO can widen the margin while *both* errors rise (the loser's faster): the loss only
sees their difference. The safeguard looks at the update a step would make in output space. With
``r = prediction − target`` (per element, weighted as the error is), a pairwise loss ``L(e_w, e_l)``
moves the winner's prediction along ``−(a·r_w + λ·b·r_l)`` where ``a = ∂L/∂e_w`` and ``b = ∂L/∂e_l``;
identifying the winner's and the loser's output spaces (same noise, timestep and caption, the paper's
"output-space approximation"), the first-order change of the winner's mean error is proportional to

    −(u + λ·v),   u = Σ_i a_i·‖r_w,i‖²,   v = Σ_i b_i·⟨r_w,i, r_l,i⟩.

Asking for a decrease of at least ``μ·u`` gives, when ``v < 0`` (the loser's push raises the winner's
error), ``λ ≤ (1 − μ)·u / (−v)``; λ is clamped to [0, 1] and is 1 when ``v ≥ 0``. For DPO with equal
pair weights this is the paper code's ``get_adaptive_lose_l_scale`` (``λ = (1 − μ)‖g_A‖²/(g_B·g_A)``,
its training scripts use μ = 0.9); the loss derivatives ``a_i, b_i`` make it apply to every pairwise
loss of the core. One λ per (global) micro-batch, as in the paper.
"""

from __future__ import annotations

import torch

from diffusion_dpo.losses.pairwise import pairwise_loss_from_logratios

Tensor = torch.Tensor


def pairwise_logratio_gradients(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    weights: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    label_p: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(∂L/∂rc, ∂L/∂rr)``, each ``[B]``, of ``L = Σ weights·loss_i`` for the pairwise ``loss_type``
    (``weights`` ``[B]``: how much each pair's loss counts, 0 for a skipped row). Detached; computed
    by autograd on a copy of the log-ratios, so it needs no closed form per loss."""
    rc = chosen_logratios.detach().float().requires_grad_(True)
    rr = rejected_logratios.detach().float().requires_grad_(True)
    with torch.enable_grad():
        losses, _, _ = pairwise_loss_from_logratios(
            rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, label_p=label_p
        )
        grad_c, grad_r = torch.autograd.grad((losses * weights.float()).sum(), (rc, rr))
    return grad_c, grad_r


def safeguard_terms(
    grad_winner_errors: Tensor, grad_loser_errors: Tensor, winner_sq: Tensor, winner_loser_dot: Tensor
) -> Tensor:
    """``[2]``: ``(u, v)`` above from ``a = ∂L/∂e_w`` ``[B]``, ``b = ∂L/∂e_l`` ``[B]``, ``‖r_w‖²``
    ``[B]`` and ``⟨r_w, r_l⟩`` ``[B]`` (any common positive scale: λ is a ratio). Sums, so that the
    terms of several processes add up to those of their global batch."""
    u = (grad_winner_errors.float() * winner_sq.float()).sum()
    v = (grad_loser_errors.float() * winner_loser_dot.float()).sum()
    return torch.stack([u, v])


def loser_gradient_scale(terms: Tensor, mu: float = 0.9, max_scale: float = 1.0) -> Tensor:
    """λ (0-dim) from ``terms = (u, v)``: ``clamp((1 − μ)·u / (−v), 0, max_scale)`` when ``v < 0``,
    else ``max_scale``. ``μ`` in [0, 1]: the share of the winner branch's own decrease that must
    survive (0: the winner's error just must not rise)."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must be in [0, 1], got {mu}")
    u, v = terms[0], terms[1]
    capped = (1.0 - mu) * u / torch.where(v < 0, -v, torch.ones_like(v))
    return torch.where(v < 0, capped.clamp(0.0, max_scale), torch.full_like(v, max_scale))


def scale_gradient(values: Tensor, scale: Tensor | float) -> Tensor:
    """``values`` unchanged, their gradient multiplied by ``scale`` (which gets none)."""
    if isinstance(scale, Tensor):
        scale = scale.detach()
    return values.detach() + scale * (values - values.detach())
