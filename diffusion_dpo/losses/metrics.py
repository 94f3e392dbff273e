"""TRL-named preference metrics (MATH.md §2, "Metrics")."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def preference_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_logps: Tensor | None = None,
    rejected_logps: Tensor | None = None,
    prefix: str = "",
) -> dict[str, Tensor]:
    """Batch means of the implicit rewards, named as TRL names them.

    ``rewards/accuracies`` is the share of pairs whose chosen reward exceeds the rejected one;
    an exact tie counts as 0.5 (neither right nor wrong). Values are 0-dim detached tensors, so the
    caller can gather them across processes and call ``.item()`` only when it logs.
    """
    c = chosen_rewards.detach().float()
    r = rejected_rewards.detach().float()
    accuracies = (c > r).float() + 0.5 * (c == r).float()
    out = {
        f"{prefix}rewards/chosen": c.mean(),
        f"{prefix}rewards/rejected": r.mean(),
        f"{prefix}rewards/margins": (c - r).mean(),
        f"{prefix}rewards/accuracies": accuracies.mean(),
    }
    if chosen_logps is not None:
        out[f"{prefix}logps/chosen"] = chosen_logps.detach().float().mean()
    if rejected_logps is not None:
        out[f"{prefix}logps/rejected"] = rejected_logps.detach().float().mean()
    return out
