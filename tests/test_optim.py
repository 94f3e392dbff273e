"""The AdamW kernels ``--adam_implementation auto`` picks on CPU give PyTorch's own CPU update bit for bit."""

import pytest
import torch

from diffusion_dpo.training.config import TrainConfig
from diffusion_dpo.training.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _train(implementation: str, steps: int = 6) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """``steps`` AdamW steps (weight decay, a learning rate that changes every step, gradients clipped
    as the loop clips them) on a small conv net, one weight of which never gets a gradient (a frozen
    part, as under LoRA: AdamW skips it)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
        torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5),
    )  # fmt: skip
    unused = torch.nn.Parameter(torch.randn(7))
    params = [*net.parameters(), unused]
    cfg = TrainConfig(
        pretrained_model_name_or_path="m", dataset_name="d", adam_implementation=implementation,
        adam_weight_decay=1e-2, adam_epsilon=1e-8,
    )  # fmt: skip
    optimizer = make_optimizer(cfg, params, 1e-3, "cpu")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / max(steps, 1))
    inputs = torch.randn(steps, 4, 3, 6, 6)
    for x in inputs:
        net(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params], optimizer


def test_auto_on_cpu_is_the_for_loop_update_bit_for_bit():
    """``auto`` (foreach on CPU) against ``for_loop`` (what PyTorch picks on CPU, the paper's ``train.py``
    included): the same weights and moments after six updates, to the last bit; and the weights moved."""
    auto, auto_opt = _train("auto")
    loop, loop_opt = _train("for_loop")
    assert auto_opt.defaults["foreach"] is True and loop_opt.defaults["foreach"] is False
    for a, b in zip(auto, loop, strict=True):
        assert torch.equal(a, b)
    for state_a, state_b in zip(auto_opt.state.values(), loop_opt.state.values(), strict=True):
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    start, _ = _train("for_loop", steps=0)
    assert all(not torch.equal(a, s) for a, s in zip(auto[:-1], start[:-1], strict=True))
    assert torch.equal(auto[-1], start[-1])  # no gradient, no update
