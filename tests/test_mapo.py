"""MaPO (Hong et al. 2024, arXiv 2406.06424; docs/objectives.md#mapo): the loss against hand-derived numbers and the
authors' formula, the direction of its gradients, and the trainer's ``--objective mapo`` (no reference
model, the dpo branch's draws, placeholder rows masked, a learning signal on a fixed set of pairs).

With γ = snr_value and s(L) = γL / (exp(γL) − 1), errors chosen so that γL is ln 2 or ln 3 give
exp(γL) − 1 = 1 or 2, hence s = ln 2 and s = ln 3 / 2 exactly; at γ = 0.5 that is L = 2 ln 2 and 2 ln 3.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.diffusion import heldout_noise
from diffusion_dpo.diffusion import objective as objective_module
from diffusion_dpo.diffusion.objective import pair_model_errors
from diffusion_dpo.losses import mapo_loss, mapo_score
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.data_setup import make_loader
from diffusion_dpo.training.loop import setup_models, train
from diffusion_dpo.training.step import compute_batch_loss
from diffusion_dpo.training.validation import encode_heldout_pairs

LN2, LN3 = math.log(2.0), math.log(3.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# the loss


def test_score_is_one_at_zero_bounded_and_decreasing():
    errors = torch.cat([torch.zeros(1), torch.logspace(-9, 3, 200)])
    s = mapo_score(errors, 0.5)
    assert s[0].item() == 1.0 and s[1].item() == pytest.approx(1.0, abs=1e-7)
    assert ((s > 0) | (errors > 150)).all() and (s <= 1).all()  # exp(−γL) underflows past L ≈ 200
    moderate = (errors > 1e-5) & (errors < 100)  # where float32 can tell neighbours apart
    assert (s[moderate][1:] < s[moderate][:-1]).all()
    # the authors' x / (exp(x) − 1) (utils.py compute_loss), in float64 where it is accurate
    x = 0.5 * errors[1:].double()
    authors = x / torch.expm1(x)
    torch.testing.assert_close(s[1:].double(), authors, rtol=2e-6, atol=1e-30)
    # value and gradient finite where the authors' form is 0/0 (L = 0) or overflows (γL > 88)
    e = _t(0.0, 1e-12, 0.5, 200.0, 1e4).requires_grad_()
    mapo_score(e, 0.5).sum().backward()
    assert torch.isfinite(e.grad).all()
    assert e.grad[0].item() == pytest.approx(-0.25)  # s'(x) → −1/2 at 0, times γ
    assert torch.isnan(torch.tensor(0.0) / torch.expm1(torch.tensor(0.0)))  # why the series is there


def test_hand_derived_values():
    """β = 0.1, γ = 0.5. L_w = 2 ln 2 (s_w = ln 2), L_l = 2 ln 3 (s_l = ln 3 / 2); log-odds
    z = ln 2 − ln 3 / 2 = ln(2/√3) ≈ 0.143841.

    - T = 1: σ(z) = (2/√3) / (1 + 2/√3) = 2/(2 + √3), so loss = 2 ln 2 − 0.1·(ln 2 − ln(2 + √3))
      = 1.386294 + 0.062381 = 1.448675.
    - T = 1000, the pair swapped (L_w = 2 ln 3): T·z' = −143.84, log σ(−143.84) = −143.84 to float
      precision, so loss = 2 ln 3 + 0.1·1000·ln(2/√3) = 2.197225 + 14.384104 = 16.581329 (finite: the
      log σ never goes through exp(143)).
    - T = 1000, equal errors L_w = L_l = 2 ln 2: log σ(0) = −ln 2, loss = 2 ln 2 + 0.1 ln 2 = 2.1 ln 2.
    """
    lw, ll = _t(2 * LN2), _t(2 * LN3)
    losses, sw, sl = mapo_loss(lw, ll, beta_mapo=0.1, snr_value=0.5, num_train_timesteps=1)
    assert losses.item() == pytest.approx(2 * LN2 - 0.1 * (LN2 - math.log(2 + math.sqrt(3))), rel=1e-6)
    assert losses.item() == pytest.approx(1.448675, abs=1e-6)
    assert sw.item() == pytest.approx(LN2, rel=1e-6) and sl.item() == pytest.approx(LN3 / 2, rel=1e-6)

    swapped, _, _ = mapo_loss(ll, lw)  # defaults: β = 0.1, γ = 0.5, T = 1000
    assert swapped.item() == pytest.approx(2 * LN3 + 100 * math.log(2 / math.sqrt(3)), rel=1e-6)
    assert swapped.item() == pytest.approx(16.581329, rel=1e-6)

    tie, sw, sl = mapo_loss(lw, lw)
    assert tie.item() == pytest.approx(2.1 * LN2, rel=1e-6) and torch.equal(sw, sl)


def test_matches_the_authors_batch_loss():
    """The batch mean of our per-example losses is the authors' ``model_losses_w.mean() −
    (beta_mapo · logsigmoid(log_odds · T)).mean()`` (mapo-t2i/mapo utils.py compute_loss), here
    evaluated in float64 on errors of the size SD produces."""
    g = torch.Generator().manual_seed(0)
    lw = torch.rand(64, generator=g, dtype=torch.float64) * 0.3 + 0.01
    ll = lw + 0.02 * torch.randn(64, generator=g, dtype=torch.float64)
    snr, beta, T = 0.5, 0.1, 1000
    log_odds = (snr * lw) / (torch.exp(snr * lw) - 1) - (snr * ll) / (torch.exp(snr * ll) - 1)
    authors = lw.mean() - (beta * F.logsigmoid(log_odds * T)).mean()
    losses, sw, sl = mapo_loss(lw.float(), ll.float())
    assert losses.mean().item() == pytest.approx(authors.item(), rel=1e-5)
    torch.testing.assert_close((sw - sl).double(), log_odds, rtol=0, atol=1e-6)


def test_gradients_lower_the_winners_error_and_raise_the_losers():
    """∂loss/∂L_w = 1 − β·σ(−Tz)·T·γ·s'(γL_w) and ∂loss/∂L_l = β·σ(−Tz)·T·γ·s'(γL_l), with
    s'(x) = (eˣ − 1 − x·eˣ)/(eˣ − 1)² < 0. At the first point of test_hand_derived_values (T = 1):
    s'(ln 2) = 1 − 2 ln 2 = −0.386294, s'(ln 3) = (2 − 3 ln 3)/4 = −0.323959, σ(−z) = √3/(2 + √3)
    = 0.464102, so ∂/∂L_w = 1 + 0.1·0.464102·0.5·0.386294 = 1.008964 and
    ∂/∂L_l = −0.1·0.464102·0.5·0.323959 = −0.007518."""
    lw, ll = _t(2 * LN2).requires_grad_(), _t(2 * LN3).requires_grad_()
    losses, _, _ = mapo_loss(lw, ll, num_train_timesteps=1)
    losses.sum().backward()
    sig = math.sqrt(3) / (2 + math.sqrt(3))
    assert lw.grad.item() == pytest.approx(1 - 0.1 * sig * 0.5 * (1 - 2 * LN2), rel=1e-5)
    assert lw.grad.item() == pytest.approx(1.008964, abs=1e-6)
    assert ll.grad.item() == pytest.approx(0.1 * sig * 0.5 * (2 - 3 * LN3) / 4, rel=1e-5)
    assert ll.grad.item() == pytest.approx(-0.007518, abs=1e-6)

    # the margin term alone, at T = 1000 on errors of SD's size, right and wrong pairs alike
    g = torch.Generator().manual_seed(1)
    lw = (0.1 + 0.02 * torch.randn(256, generator=g)).clamp(min=0).requires_grad_()
    ll = (0.1 + 0.02 * torch.randn(256, generator=g)).clamp(min=0).requires_grad_()
    losses, _, _ = mapo_loss(lw, ll)
    (losses - lw).sum().backward()
    assert (lw.grad > 0).all() and (ll.grad < 0).all()


def test_diffusers_orpo_scripts_log_odds_has_the_opposite_direction():
    """diffusers' research script (examples/research_projects/diffusion_orpo/
    train_diffusion_orpo_sdxl_lora.py) writes ``log_odds = model_losses_w − model_losses_l`` and
    ``loss = model_losses_w.mean() − (beta_orpo · logsigmoid(log_odds)).mean()``. Read literally, its
    margin term raises the winner's error and lowers the loser's; MaPO's does the reverse."""
    lw, ll = _t(0.1, 0.12).requires_grad_(), _t(0.11, 0.1).requires_grad_()
    (-0.1 * F.logsigmoid(lw - ll)).sum().backward()
    assert (lw.grad < 0).all() and (ll.grad > 0).all()  # descent raises L_w, lowers L_l
    mw, ml = lw.detach().clone().requires_grad_(), ll.detach().clone().requires_grad_()
    losses, _, _ = mapo_loss(mw, ml)
    (losses - mw).sum().backward()
    assert (mw.grad > 0).all() and (ml.grad < 0).all()


def test_swapping_winner_and_loser_and_bad_input():
    lw, ll = _t(0.1, 0.3, 0.0), _t(0.2, 0.1, 0.05)
    _, sw, sl = mapo_loss(lw, ll)
    _, sw2, sl2 = mapo_loss(ll, lw)
    assert torch.equal(sw, sl2) and torch.equal(sl, sw2)
    assert not sw.requires_grad
    assert mapo_loss(lw.double(), ll.double())[0].dtype == torch.float32
    with pytest.raises(ValueError, match="beta_mapo must be a finite number >= 0"):
        mapo_loss(lw, ll, beta_mapo=-1.0)
    with pytest.raises(ValueError, match="snr_value must be a finite number > 0"):
        mapo_loss(lw, ll, snr_value=0.0)
    with pytest.raises(ValueError, match="same shape"):
        mapo_loss(lw, ll[:2])
    assert mapo_loss(lw, ll, beta_mapo=0.0)[0].tolist() == lw.tolist()  # β = 0: SFT on winners


# ----------------------------------------------------------------------------------------------
# the trainer


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return synthetic.write_pair_dataset(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 12, seed=0)


def _argv(model, data, out, **overrides):
    return tiny_run_flags(model, data, out, **{"objective": "mapo", **overrides})


def _no_reference_run(*args, **kwargs):
    raise AssertionError("MaPO ran a reference forward")


def test_flags_and_their_validation(tmp_path):
    cfg = parse_config(_argv("x", "y", "o", beta_mapo=0.5, snr_value=0.25))
    assert (cfg.objective, cfg.beta_mapo, cfg.snr_value) == ("mapo", 0.5, 0.25)
    assert parse_config(_argv("x", "y", "o")).beta_mapo == 0.1  # the authors' defaults
    assert parse_config(_argv("x", "y", "o")).snr_value == 0.5
    with pytest.raises(ValueError, match="--beta_mapo must be a finite number >= 0"):
        parse_config(_argv("x", "y", "o", beta_mapo=-0.1))
    with pytest.raises(ValueError, match="--snr_value must be a finite number > 0"):
        parse_config(_argv("x", "y", "o", snr_value=0))
    with pytest.raises(ValueError, match="--validation_dataset_name .* full --objective mapo"):
        parse_config(_argv("x", "y", "o", validation_dataset_name="v"))
    assert parse_config(_argv("x", "y", "o", validation_dataset_name="v", use_lora=True)).use_lora
    with pytest.raises(ValueError, match="--sft contradicts --objective mapo"):
        parse_config(_argv("x", "y", "o", sft=True))
    # flags of an objective not in use are not checked (as --beta_dpo is not under mapo)
    assert parse_config(_argv("x", "y", "o", objective="dpo", beta_mapo=-1.0)).objective == "dpo"


def test_batch_loss_uses_the_dpo_draws_masks_placeholders_and_runs_no_reference(
    tmp_path, tiny_sd_path, pairs_path, monkeypatch
):
    """On one batch and one model, the mapo branch's errors are the dpo branch's model errors bit for
    bit (same per-row draws, same VAE encoding), its loss is mapo_loss of them, and a placeholder row
    adds nothing to loss or metrics (the sum over valid rows is divided by the nominal B)."""
    dpo_cfg = parse_config(_argv(tiny_sd_path, pairs_path, tmp_path / "o", objective="dpo"))
    mapo_cfg = parse_config(_argv(tiny_sd_path, pairs_path, tmp_path / "o", beta_mapo=0.3, snr_value=0.7))
    models = setup_models(dpo_cfg, "cpu")  # with a reference: the dpo branch needs one
    g = torch.Generator().manual_seed(5)
    batch = {
        "pixel_values_w": torch.rand(3, 3, 32, 32, generator=g) * 2 - 1,
        "pixel_values_l": torch.rand(3, 3, 32, 32, generator=g) * 2 - 1,
        "captions": ["a red circle", "a blue square on a green background", ""],
        "indices": torch.tensor([4, 1, 7]),
        "epoch": 2,
    }
    with torch.no_grad():
        _, dpo = compute_batch_loss(models, batch, dpo_cfg)
        monkeypatch.setattr(objective_module, "_reference_prediction", _no_reference_run)
        loss, mapo = compute_batch_loss(models, batch, mapo_cfg)
        for key in ("mse/model_chosen", "mse/model_rejected"):
            assert torch.equal(mapo[key], dpo[key]), key

        # the per-row losses, one row at a time (a row's draws depend on its index, not its batch)
        rows = []
        for i in range(3):
            one = {k: (v[i : i + 1] if k != "epoch" else v) for k, v in batch.items()}
            rows.append(compute_batch_loss(models, one, mapo_cfg)[1])
        assert loss.item() == pytest.approx(sum(r["loss"].item() for r in rows) / 3, rel=1e-5)
        assert mapo["rewards/accuracies"].item() == pytest.approx(
            sum(r["rewards/accuracies"].item() for r in rows) / 3, abs=1e-6
        )
        # the loss is mapo_loss of the row's errors, with the objective's flags and T of the scheduler
        r = rows[0]
        expected, _, _ = mapo_loss(
            r["mse/model_chosen"].view(1), r["mse/model_rejected"].view(1), beta_mapo=0.3, snr_value=0.7,
            num_train_timesteps=1000,
        )  # fmt: skip
        assert r["loss"].item() == pytest.approx(expected.item(), rel=1e-5)

        masked = {**batch, "valid": torch.tensor([True, False, True])}
        loss_m, metrics_m = compute_batch_loss(models, masked, mapo_cfg)
        assert loss_m.item() == pytest.approx((rows[0]["loss"] + rows[2]["loss"]).item() / 3, rel=1e-5)
        assert metrics_m["mse/model_chosen"].item() == pytest.approx(
            (rows[0]["mse/model_chosen"] + rows[2]["mse/model_chosen"]).item() / 2, rel=1e-5
        )
        garbage = {**masked, "pixel_values_w": masked["pixel_values_w"].clone()}
        garbage["pixel_values_w"][1] = float("nan")  # whatever a placeholder holds never leaks in
        loss_g, metrics_g = compute_batch_loss(models, garbage, mapo_cfg)
        assert torch.equal(loss_g, loss_m)
        assert all(torch.equal(metrics_g[k], metrics_m[k]) for k in metrics_m)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_trainer_runs_mapo_without_a_reference(tmp_path, tiny_sd_path, pairs_path, use_lora, monkeypatch):
    """End to end: no reference model is made, none is run (not even LoRA's adapters-disabled base),
    every trainable weight moves, the metrics are written."""
    monkeypatch.setattr(objective_module, "_reference_prediction", _no_reference_run)
    out = tmp_path / "out"
    argv = _argv(tiny_sd_path, pairs_path, out, use_lora=use_lora, rank=4)
    from accelerate.utils import set_seed

    set_seed(0)  # train() seeds the same way before it builds the models: same LoRA init
    initial = {
        k: p.detach().clone() for k, p in setup_models(parse_config(argv), "cpu").unet.named_parameters()
    }
    summary = train(parse_config(argv))
    models = summary["models"]
    assert models.ref_unet is None
    trainable = {k: p for k, p in models.unet.named_parameters() if p.requires_grad}
    assert trainable and (
        all("lora_" in k for k in trainable) if use_lora else len(trainable) == len(initial)
    )
    unchanged = [k for k, p in trainable.items() if torch.equal(p.detach().float(), initial[k].float())]
    assert not unchanged, f"trainable weights that did not change: {unchanged[:5]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = ("loss", "mse/model_chosen", "mse/model_rejected", "mapo/margin_loss", "rewards/margins",
            "rewards/accuracies", "rewards/chosen", "rewards/rejected")  # fmt: skip
    assert all(k in r and math.isfinite(r[k]) for r in rows for k in keys)
    assert not any(k.startswith("mse/ref") for k in rows[0])
    assert (out / ("pytorch_lora_weights.safetensors" if use_lora else "model_index.json")).is_file()


@torch.no_grad()
def _error_gaps(models, pairs, timesteps=(100, 300, 500, 700, 900)) -> torch.Tensor:
    # L_l − L_w of every (pair, timestep) on fixed noise (keyed by pair and timestep, as held-out
    # accuracy is), so that a model before and after training is scored on the same draws
    n = pairs.latents_w.shape[0]
    gaps = []
    for t in timesteps:
        noise = heldout_noise(0, list(range(n)), t, tuple(pairs.latents_w.shape[1:]))
        err = pair_model_errors(
            models.unet, models.components.noise_scheduler, pairs.latents_w, pairs.latents_l, pairs.hidden,
            noise, torch.full((n,), t),
        )  # fmt: skip
        gaps.append(err[n:] - err[:n])
    return torch.stack(gaps)  # [timesteps, pairs]


def test_mapo_widens_the_error_gap_on_its_pairs(tmp_path, tiny_sd_path):
    """A learning signal that can fail: 50 full fine-tuning steps on 16 fixed pairs make the winners'
    errors fall relative to the losers' on fixed draws (L_w < L_l on 46% of (pair, timestep) for the
    random tiny model; 82% after when this test was written), and by more than the same run with
    β = 0 (SFT on the winners alone, 62%): the margin term does the work."""
    data = synthetic.write_pair_dataset(tmp_path / "few.parquet", 16, seed=3, tie_fraction=0.0)
    common = dict(
        max_train_steps=50, train_batch_size=16, learning_rate=1e-4, proportion_empty_prompts=0.0,
        no_hflip=True, checkpointing_steps=1000,
    )  # fmt: skip
    cfg = parse_config(_argv(tiny_sd_path, data, tmp_path / "mapo", **common))
    base = setup_models(cfg, "cpu")
    loader = make_loader(data, split="train", resolution=32, batch_size=16, sdxl=False, seed=0)
    pairs = encode_heldout_pairs(base, loader, 16, 32)
    before = _error_gaps(base, pairs)
    mapo = _error_gaps(train(cfg)["models"], pairs)
    reset_accelerate()
    sft = _error_gaps(
        train(parse_config(_argv(tiny_sd_path, data, tmp_path / "sft", beta_mapo=0.0, **common)))["models"],
        pairs,
    )
    share = {
        name: (g > 0).float().mean().item() for name, g in (("before", before), ("mapo", mapo), ("sft", sft))
    }
    assert share["before"] < 0.6 and share["mapo"] >= 0.75, share
    assert mapo.mean() > before.mean() + 0.01, (before.mean(), mapo.mean())
    assert share["mapo"] > share["sft"] and mapo.mean() > 2 * sft.mean(), (share, mapo.mean(), sft.mean())
