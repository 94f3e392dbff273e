"""The expected pairwise loss under a soft label (docs/data.md#soft-labels).

A pair's label is ``p = P(chosen preferred)``: 1 for a decided pair, a vote share (7 of 10 annotators:
0.7) for a split one, 0.5 for a tie. Under a Bradley–Terry model the pair's expected loss is

    L = p·ℓ(rc, rr) + (1 − p)·ℓ(rr, rc)

— the loss of the pair as labelled, plus the loss of the same pair with the roles swapped, weighted by
how many annotators would have labelled it each way. For the sigmoid loss this is the cross-entropy of
σ(βδ) against p (ℓ(rr, rc) = −logσ(−βδ)), i.e. cDPO's smoothing with a per-pair ε = 1 − p, and a tie
(p = 0.5) pulls the margin toward 0 instead of being dropped. SmPO-Diffusion (arXiv 2506.02698) argues
for such soft labels on near-ties, where hard labels make DPO overfit. For losses that treat the two
sides differently (nca_pair, bco_pair, sppo_hard, apo_*) ``ℓ(rr, rc)`` is the loss had the other image
been chosen, the same reading.

Pure: tensors and floats in, per-example losses out. ``p ∈ {0, 1}`` gives exactly the hard losses (a
``where``, not a product, so an infinite loss on the unweighted side cannot make a NaN).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def check_label_probabilities(p: Tensor, n: int) -> None:
    """Raise ``ValueError`` unless ``p`` is ``[n]``. (Values are checked in [0, 1] where the data is
    loaded; checking them here would cost a device sync every step.)"""
    if tuple(p.shape) != (n,):
        raise ValueError(f"label probabilities must have shape ({n},), got {tuple(p.shape)}")


def expected_pairwise_loss(
    loss: Callable[[Tensor, Tensor, float, float], Tensor],
    rc: Tensor,
    rr: Tensor,
    p: Tensor,
    beta: float,
    eps: float = 0.0,
) -> Tensor:
    """``p·loss(rc, rr) + (1 − p)·loss(rr, rc)`` per example ``[B]`` (float32).

    ``loss``: one of :data:`~diffusion_dpo.losses.pairwise.PAIRWISE_LOSSES`; ``rc``, ``rr``: ``[B]``
    log-ratios of the chosen (``image_w``) and rejected sides; ``p``: ``[B]`` P(chosen preferred).
    """
    p = p.to(rc.device, torch.float32)
    as_labelled = loss(rc, rr, beta, eps)
    swapped = loss(rr, rc, beta, eps)
    mixed = p * as_labelled + (1.0 - p) * swapped
    return torch.where(p == 1.0, as_labelled, torch.where(p == 0.0, swapped, mixed))
