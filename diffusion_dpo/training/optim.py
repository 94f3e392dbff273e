"""The optimizer of the trained weights: AdamW with the kernels ``--adam_implementation`` picks,
bitsandbytes' 8-bit AdamW (``--use_8bit_adam``) or Adafactor (``--use_adafactor``). The loop and the
benchmark build it here."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from diffusion_dpo.training.config import TrainConfig


def adam_kernel_kwargs(implementation: str, device: torch.device | str) -> dict:
    """``torch.optim.AdamW`` keyword for ``--adam_implementation`` on ``device``.

    ``auto`` is ``fused`` on CUDA (one kernel launch for all weights instead of a few per tensor;
    without it the optimizer step of a small model is launch-bound) and ``foreach`` elsewhere: on CPU
    PyTorch's own choice is the weight-by-weight loop, whose Python work per tensor is most of a small
    model's optimizer step, and ``foreach`` does the same float operations in the same order, so it
    gives that loop's update bit for bit (tests/test_optim.py), where CPU ``fused`` rounds differently.
    """
    if implementation == "auto":
        implementation = "fused" if torch.device(device).type == "cuda" else "foreach"
    return {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for_loop": {"foreach": False},
    }[implementation]


def make_optimizer(
    cfg: TrainConfig, params: Iterable[torch.nn.Parameter], lr: float, device: torch.device | str
) -> torch.optim.Optimizer:
    """AdamW over ``params`` with ``cfg``'s betas, weight decay and ε at learning rate ``lr``; or, with
    ``--use_adafactor``, Adafactor set up as the paper's ``train.py`` does (``lr`` as given, no relative
    step or parameter scaling, updates clipped at RMS 1, ``cfg``'s weight decay)."""
    params = list(params)
    if cfg.use_adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, weight_decay=cfg.adam_weight_decay, clip_threshold=1.0, scale_parameter=False,
            relative_step=False,
        )  # fmt: skip
    kwargs = dict(
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    if cfg.use_8bit_adam:
        check_8bit_adam(device)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs, **adam_kernel_kwargs(cfg.adam_implementation, device))


def check_8bit_adam(device: torch.device | str) -> None:
    """Raise ``ValueError`` saying why ``--use_8bit_adam`` cannot run here."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "--use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes, on a CUDA machine); "
            "without it drop the flag (the default AdamW keeps fp32 states, fused on CUDA)"
        )
    if torch.device(device).type != "cuda":
        raise ValueError(
            f"--use_8bit_adam runs bitsandbytes' CUDA kernels, and this run is on {torch.device(device).type}; "
            "drop the flag there"
        )
