"""TRL-named preference metrics (docs/metrics.md)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` ``[B]`` over the entries where ``mask`` ``[B]`` is True (all if None), in
    float32; 0 when the mask is empty. Masked-out entries never leak in, not even as NaN."""
    values = values.float()
    if mask is None:
        return values.mean()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def preference_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_logps: Tensor | None = None,
    rejected_logps: Tensor | None = None,
    prefix: str = "",
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Batch means of the implicit rewards, named as TRL names them.

    ``rewards/accuracies`` is the share of pairs whose chosen reward exceeds the rejected one;
    an exact tie counts as 0.5 (neither right nor wrong). ``mask`` ``[B]`` bool: average over these
    pairs only (the trainer's placeholders for skipped bad rows are left out). Values are 0-dim
    detached tensors, so the caller can gather them across processes and call ``.item()`` only when
    it logs.
    """
    c = chosen_rewards.detach().float()
    r = rejected_rewards.detach().float()
    accuracies = (c > r).float() + 0.5 * (c == r).float()
    out = {
        f"{prefix}rewards/chosen": masked_mean(c, mask),
        f"{prefix}rewards/rejected": masked_mean(r, mask),
        f"{prefix}rewards/margins": masked_mean(c - r, mask),
        f"{prefix}rewards/accuracies": masked_mean(accuracies, mask),
    }
    if chosen_logps is not None:
        out[f"{prefix}logps/chosen"] = masked_mean(chosen_logps.detach(), mask)
    if rejected_logps is not None:
        out[f"{prefix}logps/rejected"] = masked_mean(rejected_logps.detach(), mask)
    return out
