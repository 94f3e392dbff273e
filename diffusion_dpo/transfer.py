"""Host-to-device copies that leave the host free to queue the GPU's next work."""

from __future__ import annotations

import torch


def to_device(
    tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``tensor`` on ``device``, then in ``dtype`` (converted there).

    A CPU tensor bound for a CUDA device is copied from page-locked memory without blocking (pinned
    here unless the DataLoader pinned it): a copy from pageable memory makes the host wait until the
    GPU has finished everything queued before it, so during a step's data and noise transfers the host
    could not queue the step's kernels and the GPU would idle. Elsewhere a plain ``.to``.
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
        tensor = pinned.to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)
