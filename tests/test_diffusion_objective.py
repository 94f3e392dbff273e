"""The diffusion log-ratio surrogate, pinned to the Diffusion-DPO paper code's formula (docs/objectives.md#diffusion-dpo)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from diffusion_dpo.diffusion import (
    denoising_errors,
    heldout_noise,
    implicit_reward_accuracy,
    pair_logratios,
)
from diffusion_dpo.losses import pairwise_loss_from_logratios
from diffusion_dpo.models.tiny import tiny_unet_config


def _unets(seed=0, prediction_type="epsilon"):
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**tiny_unet_config(sample_size=8)).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # a policy that differs from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type
    )
    return policy, ref, sched


def _batch(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    lw = torch.randn(b, 4, 8, 8, generator=g)
    ll = torch.randn(b, 4, 8, 8, generator=g)
    ehs = torch.randn(b, 5, 32, generator=g)
    noise = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999])[:b]
    return lw, ll, ehs, noise, t


def _paper_loss(policy, ref, sched, lw, ll, ehs, noise, t, beta):
    """The paper's train.py, restated: winners stacked on losers, shared noise and timestep,
    per-sample mean errors, inside = −0.5·β·(model_diff − ref_diff), loss = −logσ(inside)."""
    latents = torch.cat([lw, ll])
    noise2 = torch.cat([noise, noise])
    t2 = torch.cat([t, t])
    noisy = sched.add_noise(latents, noise2, t2)
    ehs2 = torch.cat([ehs, ehs])
    model_losses = (policy(noisy, t2, ehs2).sample - noise2).pow(2).mean(dim=[1, 2, 3])
    with torch.no_grad():
        ref_losses = (ref(noisy, t2, ehs2).sample - noise2).pow(2).mean(dim=[1, 2, 3])
    mw, ml = model_losses.chunk(2)
    rw, rl = ref_losses.chunk(2)
    inside = -0.5 * beta * ((mw - ml) - (rw - rl))
    return -F.logsigmoid(inside), inside


def test_pair_logratios_with_sigmoid_core_equals_paper_loss():
    policy, ref, sched = _unets()
    batch = _batch()
    beta = 5000.0
    rc, rr = pair_logratios(policy, ref, sched, *batch)
    ours, chosen_rewards, rejected_rewards = pairwise_loss_from_logratios(rc, rr, beta=beta)
    paper, inside = _paper_loss(policy, ref, sched, *batch, beta=beta)
    torch.testing.assert_close(ours, paper, rtol=1e-5, atol=1e-5)
    # the implicit-reward margin is the paper's `inside` term, and its sign is implicit_acc
    torch.testing.assert_close(chosen_rewards - rejected_rewards, inside.detach(), rtol=1e-5, atol=1e-4)
    assert not torch.all(inside == 0)  # the two UNets really differ
    # gradients flow into the policy only
    ours.mean().backward()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_logratios_are_zero_when_policy_equals_reference():
    _, ref, sched = _unets()
    rc, rr = pair_logratios(ref, copy.deepcopy(ref), sched, *_batch())
    torch.testing.assert_close(rc, torch.zeros(3))
    torch.testing.assert_close(rr, torch.zeros(3))


def test_v_prediction_target_is_the_velocity():
    policy, ref, sched = _unets(prediction_type="v_prediction")
    lw, ll, ehs, noise, t = _batch()
    me, re = denoising_errors(policy, ref, sched, lw, ehs, noise, t)
    noisy = sched.add_noise(lw, noise, t)
    v = sched.get_velocity(lw, noise, t)
    expected = (policy(noisy, t, ehs).sample - v).pow(2).mean(dim=[1, 2, 3])
    torch.testing.assert_close(me, expected.detach(), rtol=1e-5, atol=1e-6)


def test_lora_reference_is_the_unet_with_adapters_disabled():
    from peft import LoraConfig

    policy, ref, sched = _unets()
    lora = copy.deepcopy(ref)
    lora.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    with torch.no_grad():  # LoRA B starts at zero; give the adapters an effect, as training would
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch()
    rc_lora, rr_lora = pair_logratios(lora, None, sched, *batch)
    rc_sep, rr_sep = pair_logratios(lora, ref, sched, *batch)
    torch.testing.assert_close(rc_lora, rc_sep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rr_lora, rr_sep, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rc_lora, torch.zeros(3))  # the adapters change the output
    with pytest.raises(ValueError, match="has no adapters"):
        pair_logratios(policy, None, sched, *batch)


def test_implicit_accuracy_counts_pairs_where_winner_is_preferred():
    policy, ref, sched = _unets()
    lw, ll, ehs, _, _ = _batch()
    acc = implicit_reward_accuracy(policy, ref, sched, lw, ll, ehs, timesteps=(200, 600), seed=3)
    # independent recomputation with the same seeded noise: pair i at timestep t draws from (3, i, t)
    hits = []
    for t in (200, 600):
        noise = heldout_noise(3, [0, 1, 2], t, tuple(lw.shape[1:]))
        _, inside = _paper_loss(policy, ref, sched, lw, ll, ehs, noise, torch.full((3,), t), beta=1.0)
        hits.append((inside > 0).float())
    assert acc.item() == pytest.approx(torch.cat(hits).mean().item())
    # swapping winners and losers mirrors the accuracy
    flipped = implicit_reward_accuracy(policy, ref, sched, ll, lw, ehs, timesteps=(200, 600), seed=3)
    assert flipped.item() == pytest.approx(1.0 - acc.item())
