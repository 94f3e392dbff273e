"""The shared loss core, pinned to hand-derived values (docs/objectives.md)."""

import math

import pytest
import torch

from diffusion_dpo.losses import (
    PAIRWISE_LOSSES,
    dpo_loss,
    kto_loss,
    orpo_loss,
    pairwise_loss_from_logratios,
    preference_metrics,
    simpo_loss,
)

LN2 = math.log(2.0)


def _pair(rc: float, rr: float, n: int = 3):
    """Policy/reference log-probs whose log-ratios are rc and rr (reference values are arbitrary)."""
    ref_c = torch.linspace(-30.0, -10.0, n)
    ref_r = torch.linspace(-25.0, -12.0, n)
    return ref_c + rc, ref_r + rr, ref_c, ref_r


# docs/objectives.md#the-pairwise-losses-of-the-core: values at initialisation (policy = reference), β = 0.1.
AT_INIT = {
    "sigmoid": LN2,
    "robust": LN2,
    "hinge": 1.0,
    "ipo": 25.0,
    "exo_pair": None,  # depends on ε; checked below
    "nca_pair": 2 * LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 50.0,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.846574,
}


@pytest.mark.parametrize("loss_type", sorted(PAIRWISE_LOSSES))
def test_value_at_initialisation(loss_type):
    expected = AT_INIT[loss_type]
    smoothing = 0.1 if loss_type == "exo_pair" else 0.0
    if loss_type == "exo_pair":
        # σ(0) = ½: ½(ln½ − ln0.9) + ½(ln½ − ln0.1) = ln½ − ½ln(0.09)
        expected = math.log(0.5) - 0.5 * math.log(0.09)
    losses, cr, rr = dpo_loss(*_pair(0.0, 0.0), beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, torch.full((3,), expected), atol=1e-5, rtol=1e-5)
    assert torch.all(cr == 0) and torch.all(rr == 0)


# A non-trivial point: rc = 1, rr = −1 (δ = 2), β = 0.5 unless stated, so βδ = 1, β·rc = 0.5, β·rr = −0.5.
# Hand derivations (σ(1) = 0.731059, σ(0.5) = 0.622459, −logσ(1) = ln(1 + e⁻¹) = 0.313262,
# −logσ(−1) = 1 + 0.313262 = 1.313262, −logσ(0.5) = 0.474077, −logσ(−0.5) = 0.974077):
NON_TRIVIAL = [
    # sigmoid: −logσ(1) = 0.313262
    ("sigmoid", 0.5, 0.0, 0.313262),
    # cDPO ε=0.1: 0.9·0.313262 + 0.1·1.313262 = 0.413262
    ("sigmoid", 0.5, 0.1, 0.413262),
    # robust ε=0.1: (0.9·0.313262 − 0.1·1.313262) / 0.8 = 0.150609 / 0.8 = 0.188262
    ("robust", 0.5, 0.1, 0.188262),
    # hinge β=0.25: relu(1 − 0.25·2) = 0.5
    ("hinge", 0.25, 0.0, 0.5),
    # ipo β=0.5: (2 − 1/(2·0.5))² = 1
    ("ipo", 0.5, 0.0, 1.0),
    # exo ε=0.1: 0.731059·(−0.313262 + 0.105361) + 0.268941·(−1.313262 + 2.302585)
    #          = −0.151988 + 0.266070 = 0.114082
    ("exo_pair", 0.5, 0.1, 0.114082),
    # nca: 0.474077 + ½·0.974077 + ½·0.474077 = 1.198154
    ("nca_pair", 0.5, 0.0, 1.198154),
    # bco: −logσ(0.5) − logσ(0.5) = 0.948154
    ("bco_pair", 0.5, 0.0, 0.948154),
    # sppo_hard β=0.25 (1/(2β) = 2): (1 − 2)² + (−1 + 2)² = 2
    ("sppo_hard", 0.25, 0.0, 2.0),
    # apo_zero: 1 − σ(0.5) + σ(−0.5) = 1 − 0.622459 + 0.377541 = 0.755082
    ("apo_zero", 0.5, 0.0, 0.755082),
    # apo_down: σ(0.5) + 1 − σ(1) = 0.622459 + 1 − 0.731059 = 0.891401
    ("apo_down", 0.5, 0.0, 0.891401),
    # discopop: ρ = 1, m = σ(1/0.05) = σ(20) ≈ 1 − 2e−9, so the loss is e⁻¹ = 0.367879
    ("discopop", 0.5, 0.0, 0.367879),
]


@pytest.mark.parametrize(("loss_type", "beta", "eps", "expected"), NON_TRIVIAL)
def test_value_at_non_trivial_point(loss_type, beta, eps, expected):
    losses, cr, rr = dpo_loss(*_pair(1.0, -1.0), beta=beta, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses, torch.full((3,), expected), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(cr, torch.full((3,), beta * 1.0))
    torch.testing.assert_close(rr, torch.full((3,), beta * -1.0))


def test_sigmoid_gradient_matches_closed_form():
    """dL/dδ = −β·σ(−βδ) (docs/objectives.md#the-pairwise-losses-of-the-core), checked through rc (dδ/drc = 1) and rr (dδ/drr = −1)."""
    beta = 0.3
    rc = torch.tensor([0.7, -2.0, 5.0], requires_grad=True)
    rr = torch.tensor([0.1, 1.0, -3.0], requires_grad=True)
    losses, _, _ = pairwise_loss_from_logratios(rc, rr, beta=beta)
    losses.sum().backward()
    delta = (rc - rr).detach()
    expected = -beta * torch.sigmoid(-beta * delta)
    torch.testing.assert_close(rc.grad, expected)
    torch.testing.assert_close(rr.grad, -expected)


def test_label_smoothing_is_a_mixture_of_both_directions():
    """cDPO = (1−ε)·DPO(δ) + ε·DPO(−δ): swapping chosen/rejected at ε mirrors the loss at 1−ε's weights."""
    args = _pair(0.4, -0.9)
    plain, _, _ = dpo_loss(*args, beta=0.7)
    flipped, _, _ = dpo_loss(args[1], args[0], args[3], args[2], beta=0.7)
    smoothed, _, _ = dpo_loss(*args, beta=0.7, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, 0.8 * plain + 0.2 * flipped)


def test_large_beta_diffusion_margins_stay_finite_in_low_precision():
    """β = 5000 with diffusion-sized margins: |βδ| in the thousands must give finite losses and grads."""
    for dtype in (torch.float16, torch.bfloat16):
        rc = torch.tensor([0.5, -0.5, 0.02, 0.0], dtype=dtype, requires_grad=True)
        rr = torch.tensor([-0.5, 0.5, 0.0, 0.0], dtype=dtype, requires_grad=True)
        for loss_type in PAIRWISE_LOSSES:
            eps = 0.1 if loss_type in ("exo_pair", "robust") else 0.0
            losses, cr, rej = pairwise_loss_from_logratios(
                rc, rr, beta=5000.0, loss_type=loss_type, label_smoothing=eps
            )
            assert losses.dtype == torch.float32
            assert torch.isfinite(losses).all(), (loss_type, dtype, losses)
            grads = torch.autograd.grad(losses.sum(), (rc, rr))
            assert all(torch.isfinite(g.float()).all() for g in grads), loss_type
    # sigmoid: a margin of −1 at β = 5000 costs exactly βδ... −logσ(−5000) = 5000.
    losses, _, _ = pairwise_loss_from_logratios(torch.tensor([-0.5]), torch.tensor([0.5]), beta=5000.0)
    torch.testing.assert_close(losses, torch.tensor([5000.0]))


def test_ipo_with_length_averaged_logps():
    """IPO uses per-token averaged log-probs (TRL): with summed logps of 4 and 2 tokens, averaging
    turns rc = 2/4 = 0.5 and rr = −1/2 = −0.5, δ = 1; β = 0.5 → (1 − 1)² = 0, while the summed
    δ = 3 would give (3 − 1)² = 4."""
    summed = (torch.tensor([2.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1))
    losses_sum, _, _ = dpo_loss(*summed, beta=0.5, loss_type="ipo")
    averaged = (summed[0] / 4, summed[1] / 2, summed[2], summed[3])
    losses_avg, _, _ = dpo_loss(*averaged, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(losses_sum, torch.tensor([4.0]))
    torch.testing.assert_close(losses_avg, torch.tensor([0.0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "nope"}, "loss_type='nope' is not supported; choose one of"),
        ({"beta": 0.0}, "beta must be a finite number > 0"),
        ({"beta": -1.0}, "beta must be a finite number > 0"),
        ({"beta": float("nan")}, "beta must be a finite number > 0"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "allowed: 0 < label_smoothing < 1"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "allowed: 0 <= label_smoothing < 0.5"),
        ({"loss_type": "sigmoid", "label_smoothing": -0.1}, "allowed: 0 <= label_smoothing < 0.5"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "has no meaning for loss_type='hinge'"),
    ],
)
def test_bad_parameters_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dpo_loss(*_pair(0.1, 0.0), **kwargs)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        pairwise_loss_from_logratios(torch.zeros(3), torch.zeros(2))


def test_kto_at_initialisation_is_half_times_weight():
    """docs/objectives.md#kto: with z0 = 0 and policy = reference every loss is 0.5 times its λ."""
    logps = torch.tensor([-5.0, -7.0, -1.0])
    desirable = torch.tensor([True, False, True])
    losses, rewards = kto_loss(logps, logps, desirable, 0.0, desirable_weight=2.0, undesirable_weight=3.0)
    torch.testing.assert_close(losses, torch.tensor([1.0, 1.5, 1.0]))
    torch.testing.assert_close(rewards, torch.zeros(3))


def test_kto_non_trivial_point_and_reference_point_handling():
    """r = [2, 2], β = 0.5, z0 = 1: desirable 1 − σ(0.5·(2 − 1)) = 1 − 0.622459 = 0.377541;
    undesirable 1 − σ(0.5·(1 − 2)) = 1 − 0.377541 = 0.622459. A negative KL estimate is clamped to 0:
    desirable 1 − σ(1) = 0.268941."""
    pol = torch.tensor([-3.0, -3.0])
    ref = torch.tensor([-5.0, -5.0])
    desirable = torch.tensor([True, False])
    losses, rewards = kto_loss(pol, ref, desirable, torch.tensor(1.0), beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.377541, 0.622459]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rewards, torch.tensor([1.0, 1.0]))
    clamped, _ = kto_loss(pol, ref, desirable, torch.tensor(-4.0), beta=0.5)
    torch.testing.assert_close(clamped[0], torch.tensor(0.268941), atol=1e-6, rtol=1e-6)


def test_kto_reference_point_carries_no_gradient():
    pol = torch.tensor([-3.0, -2.0], requires_grad=True)
    kl = (pol.exp().sum() * 0 + 0.5).requires_grad_()  # a KL that would otherwise pass a gradient
    losses, _ = kto_loss(pol, torch.tensor([-3.0, -2.0]), torch.tensor([True, False]), kl)
    (g_kl,) = torch.autograd.grad(losses.sum(), kl, allow_unused=True)
    assert g_kl is None


def test_kto_bad_inputs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        kto_loss(x, x, torch.tensor([1, 0]), 0.0)
    with pytest.raises(ValueError, match="beta must be"):
        kto_loss(x, x, torch.tensor([True, False]), 0.0, beta=0)
    with pytest.raises(ValueError, match="undesirable_weight must be"):
        kto_loss(x, x, torch.tensor([True, False]), 0.0, undesirable_weight=-1)


def test_simpo_value():
    """avg_c = −1, avg_r = −2, β = 2, γ/β = 0.5 → z = 2·1 − 1 = 1 → −logσ(1) = 0.313262."""
    losses, cr, rr = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.313262]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cr, torch.tensor([-2.0]))
    torch.testing.assert_close(rr, torch.tensor([-4.0]))


def test_orpo_value():
    """log p_c = ln 0.5 → odds 1 → log odds 0; log p_r = ln 0.2 → odds 0.25 → log odds −1.386294.
    Ratio term −logσ(1.386294) = ln(1 + 0.25) = 0.223144; λ = 0.1, NLL = 0.7 → 0.7 + 0.0223144."""
    losses, _, _ = orpo_loss(
        torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), torch.tensor([0.7]), lam=0.1
    )
    torch.testing.assert_close(losses, torch.tensor([0.7223144]), atol=1e-6, rtol=1e-6)


def test_metrics_named_as_trl_with_ties_as_half():
    cr = torch.tensor([1.0, 0.0, -1.0, 2.0])
    rr = torch.tensor([0.0, 0.0, 1.0, 1.0])
    m = preference_metrics(
        cr, rr, chosen_logps=torch.tensor([-1.0, -3.0]), rejected_logps=torch.tensor([-2.0])
    )
    assert set(m) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
    assert m["rewards/accuracies"].item() == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["rewards/margins"].item() == pytest.approx((1 + 0 - 2 + 1) / 4)
    assert m["logps/chosen"].item() == pytest.approx(-2.0)
