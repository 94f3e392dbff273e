"""Monitors and guards of a preference run (docs/monitors.md): each monitor against a hand-computed
value on a small batch, the warning state machine, Diffusion-SDPO's winner safeguard (the winner's
error does not rise to first order, for every pairwise loss), --auto_beta's controller and its exact
resume, and the trainer end to end: a deliberately unstable run warns, and with
--stop_on_degradation checkpoints and stops cleanly.

Why these can fail: a sign slip in the gradient factor (σ(βδ) instead of σ(−βδ)), a masked row
leaking into a mean, a norm ratio of per-process ratios instead of global means, a trend that warns
on one noisy step or every step, a safeguard scale that lets the loser's push raise the winner's
error, a β that is not restored on resume.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.losses import (
    PAIRWISE_LOSSES,
    loser_gradient_scale,
    pairwise_logratio_gradients,
    pairwise_loss_from_logratios,
    safeguard_terms,
    scale_gradient,
)
from diffusion_dpo.training import checkpoint as ckpt
from diffusion_dpo.training.auto_beta import AutoBeta
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.loop import train
from diffusion_dpo.training.models import setup_models
from diffusion_dpo.training.monitors import (
    WARMUP_CHECKS,
    MonitorAlarms,
    derived_monitors,
    pair_monitor_metrics,
)
from diffusion_dpo.training.step import compute_batch_loss

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---- the monitors, by hand ---------------------------------------------------------------------


def test_pair_monitor_metrics_by_hand():
    """δ = rc − rr = [0.3, −0.2] on the valid pairs (the third, δ = −5, is a skipped row), β = 2:
    negative margins 1/2; gradient factor (σ(−0.6) + σ(0.4))/2 = (0.354344 + 0.598688)/2 = 0.476516
    (σ(−βδ): the factor of dL/dδ = −β·σ(−βδ); σ(βδ) would read 0.523484); |βδ| (0.6 + 0.4)/2 = 0.5;
    mean squared predictions over the valid images (winners then losers): policy (1 + 4 + 4 + 16)/4
    = 6.25, reference (1 + 1 + 1 + 4)/4 = 1.75."""
    rc, rr = torch.tensor([0.3, -0.1, -5.0]), torch.tensor([0.0, 0.1, 0.0])
    valid = torch.tensor([True, True, False])
    model_sq = torch.tensor([1.0, 4.0, 900.0, 4.0, 16.0, 900.0])
    ref_sq = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0, 1.0])
    m = {k: v.item() for k, v in pair_monitor_metrics(rc, rr, 2.0, model_sq, ref_sq, valid).items()}
    assert m["monitors/negative_margins"] == pytest.approx(0.5)
    assert m["monitors/grad_factor"] == pytest.approx(0.476516, abs=1e-6)
    assert m["monitors/abs_margin"] == pytest.approx(0.5, abs=1e-6)
    assert m["pred_ms/model"] == pytest.approx(6.25) and m["pred_ms/ref"] == pytest.approx(1.75)
    # a model equal to its reference: every pair ties (no negative margin), factor 1/2, ratio 1
    tie = pair_monitor_metrics(rc * 0, rr * 0, 2.0, ref_sq, ref_sq, valid)
    assert tie["monitors/negative_margins"].item() == 0.0 and tie["monitors/grad_factor"].item() == 0.5


def test_derived_monitors_by_hand():
    """mse/model_chosen 0.30 vs ref 0.25: +0.05; loser 0.40 vs 0.50: −0.10; norm ratio √(6.25/1.75)
    = 1.889822. Missing or None inputs give no monitor rather than a wrong one."""
    metrics = {"mse/model_chosen": 0.30, "mse/ref_chosen": 0.25, "mse/model_rejected": 0.40,
               "mse/ref_rejected": 0.50, "pred_ms/model": 6.25, "pred_ms/ref": 1.75}  # fmt: skip
    out = derived_monitors(metrics)
    assert out["monitors/chosen_vs_ref"] == pytest.approx(0.05)
    assert out["monitors/rejected_vs_ref"] == pytest.approx(-0.10)
    assert out["monitors/pred_norm_ratio"] == pytest.approx(1.889822, abs=1e-6)
    assert derived_monitors({"mse/model_chosen": 0.3, "mse/ref_chosen": None, "pred_ms/model": 1.0}) == {}


def _row(step, **values):
    base = {"step": step, "monitors/chosen_vs_ref": 0.0, "mse/ref_chosen": 1.0,
            "monitors/negative_margins": 0.3, "monitors/grad_factor": 0.4, "monitors/pred_norm_ratio": 1.0}  # fmt: skip
    return {**base, **values}


def test_alarms_stay_quiet_on_healthy_values_and_warn_once_past_a_threshold():
    """A constant value's bias-corrected EMA is that value from the first step on: the winner's error
    60% above the reference's crosses its 50% threshold, warns at the WARMUP_CHECKS-th check and never
    again; the checks past it are counted for --stop_on_degradation, and reset by a healthy check."""
    alarms = MonitorAlarms()
    for step in range(1, 41):  # healthy values, and ones just inside each threshold
        assert alarms.observe(step, _row(step)) == []
        assert (
            alarms.observe(
                step, _row(step, **{"monitors/chosen_vs_ref": 0.4, "monitors/pred_norm_ratio": 0.9})
            )
            == []
        )
    assert alarms.warnings == [] and alarms.stalled(1) is None

    alarms = MonitorAlarms()
    new = [alarms.observe(step, _row(step, **{"monitors/chosen_vs_ref": 0.6})) for step in range(1, 26)]
    assert [i + 1 for i, w in enumerate(new) if w] == [WARMUP_CHECKS]
    (warning,) = alarms.warnings
    assert warning["monitor"] == "monitors/chosen_rel_trend" and warning["step"] == WARMUP_CHECKS
    assert warning["value"] == pytest.approx(0.6) and "PREFERRED images 60% worse" in warning["message"]
    assert "--winner_safeguard" in warning["message"] and "lower --learning_rate" in warning["message"]
    assert alarms.stalled(6)["checks"] == 6 and alarms.stalled(7) is None and alarms.stalled(0) is None
    # the state goes through JSON (a checkpoint) unchanged
    again = MonitorAlarms()
    again.load_state_dict(json.loads(json.dumps(alarms.state_dict())))
    assert again.state_dict() == alarms.state_dict()
    # one check back under the threshold (its trend back under it) resets the count, not the warning
    alarms.ema["monitors/chosen_vs_ref"] = 0.0
    alarms.observe(26, _row(26))
    assert alarms.stalled(1) is None and len(alarms.warnings) == 1


@pytest.mark.parametrize(
    "values, monitor",
    [
        ({"monitors/negative_margins": 0.7}, "monitors/negative_margins_trend"),
        ({"monitors/grad_factor": 0.01}, "monitors/grad_factor_trend"),
        ({"monitors/pred_norm_ratio": 1.25}, "monitors/pred_norm_ratio_trend"),
        ({"monitors/pred_norm_ratio": 0.7}, "monitors/pred_norm_ratio_trend"),
    ],
)
def test_each_step_monitor_warns_past_its_threshold(values, monitor):
    alarms = MonitorAlarms()
    for step in range(1, WARMUP_CHECKS + 1):
        alarms.observe(step, _row(step, **values))
    assert [w["monitor"] for w in alarms.warnings] == [monitor]


def test_held_out_accuracy_significantly_below_chance_warns_at_its_validation():
    alarms = MonitorAlarms()
    # 0.45 of 64 pairs is noise (Wilson upper end 0.57): no warning
    alarms.observe(1, _row(1, **{"eval/implicit_acc": 0.45, "eval/implicit_acc_ci_high": 0.57}))
    assert alarms.warnings == []
    # 0.35 of 128 pairs: the interval ends at 0.44
    alarms.observe(2, _row(2, **{"eval/implicit_acc": 0.35, "eval/implicit_acc_ci_high": 0.44}))
    assert [w["monitor"] for w in alarms.warnings] == ["eval/implicit_acc_ci_high"]
    assert "significantly below chance" in alarms.warnings[0]["message"]


# ---- Diffusion-SDPO's winner safeguard ----------------------------------------------------------


def _output_space_batch(seed=0, pairs=3, dim=12):
    """Predictions ``P + x`` whose parameter ``P`` [B, D] is shared by the winner and the loser of a pair:
    the output-space model in which the safeguard's first-order analysis is exact. The losers'
    residuals point along the winners' (the case where plain DPO raises the winner's error)."""
    g = torch.Generator().manual_seed(seed)
    r_w = torch.randn(pairs, dim, generator=g)
    r_l = 6.0 * r_w + 0.3 * torch.randn(pairs, dim, generator=g)
    ref_w = (r_w.pow(2).mean(1) * (1 + 0.01 * torch.randn(pairs, generator=g))).detach()
    ref_l = (r_l.pow(2).mean(1) * (1 + 0.01 * torch.randn(pairs, generator=g))).detach()
    return r_w, r_l, ref_w, ref_l


def _winner_error_change(loss_type, safeguard, mu=0.9, beta=0.5):
    """First-order change of the winner's mean error along a gradient step −∇L (per unit step)."""
    smoothing = 0.1 if loss_type == "exo_pair" else 0.0
    r_w, r_l, ref_w, ref_l = _output_space_batch()
    p = torch.zeros_like(r_w, requires_grad=True)  # the shared parameter; residuals r + P
    e_w, e_l = (r_w + p).pow(2).mean(1), (r_l + p).pow(2).mean(1)
    if safeguard:
        rc, rr = -0.5 * (e_w.detach() - ref_w), -0.5 * (e_l.detach() - ref_l)
        g_c, g_r = pairwise_logratio_gradients(
            rc, rr, torch.ones(3), beta=beta, loss_type=loss_type, label_smoothing=smoothing
        )
        terms = safeguard_terms(-0.5 * g_c, -0.5 * g_r, r_w.pow(2).mean(1), (r_w * r_l).mean(1))
        e_l = scale_gradient(e_l, loser_gradient_scale(terms, mu))
    losses, _, _ = pairwise_loss_from_logratios(
        -0.5 * (e_w - ref_w), -0.5 * (e_l - ref_l), beta=beta, loss_type=loss_type, label_smoothing=smoothing
    )
    (grad,) = torch.autograd.grad(losses.sum(), p)
    (winner_grad,) = torch.autograd.grad((r_w + p).pow(2).mean(1).mean(), p)
    return -(winner_grad * grad).sum().item()


@pytest.mark.parametrize("loss_type", sorted(PAIRWISE_LOSSES))
def test_the_safeguard_keeps_the_winners_error_from_rising_to_first_order(loss_type):
    """On a batch whose losers' residuals align with the winners', a plain step of every pairwise loss
    raises the winner's error; the safeguarded step does not (with μ = 0.9 it keeps a tenth of the
    winner branch's own decrease, so it is strictly below 0)."""
    plain = _winner_error_change(loss_type, safeguard=False)
    assert plain > 0
    if loss_type == "apo_down":
        # APO-down means to lower the chosen image's likelihood too ("both go down"): its winner term
        # alone raises the winner's error, which no scale on the loser can undo; the safeguard then
        # switches the loser's push off (λ = 0) and leaves the loss's own intent
        assert _winner_error_change(loss_type, safeguard=True) < plain
        return
    assert _winner_error_change(loss_type, safeguard=True) < 0
    # μ = 0: exactly no change (to float rounding)
    assert _winner_error_change(loss_type, safeguard=True, mu=0.0) <= 1e-6 * plain


def test_the_safeguard_scale_is_the_paper_codes_for_dpo_at_equal_pair_weights():
    """At the start (δ = 0) every DPO pair has the same weight, and λ is the paper code's
    ``(1 − μ)·‖g_A‖² / (g_B·g_A)`` with g_A, g_B the output-space gradients of the winners' and the
    losers' mean errors (computed here as it does, independently of our terms)."""
    r_w, r_l, _, _ = _output_space_batch(seed=3)
    pred_w = r_w.clone().requires_grad_(True)
    pred_l = r_l.clone().requires_grad_(True)
    (g_a,) = torch.autograd.grad(pred_w.pow(2).mean(), pred_w)
    (g_b,) = torch.autograd.grad(pred_l.pow(2).mean(), pred_l)
    paper = ((1 - 0.9) * g_a.pow(2).sum() / (g_b * g_a).sum()).clamp(0, 1)
    zeros = torch.zeros(3)
    g_c, g_r = pairwise_logratio_gradients(zeros, zeros, torch.ones(3), beta=5000.0)
    ours = loser_gradient_scale(
        safeguard_terms(-0.5 * g_c, -0.5 * g_r, r_w.pow(2).mean(1), (r_w * r_l).mean(1))
    )
    assert ours.item() == pytest.approx(paper.item(), rel=1e-5)
    # losers that pull away from the winners (negative alignment) are left alone; bad μ is refused
    assert loser_gradient_scale(torch.tensor([1.0, 0.5])).item() == 1.0
    with pytest.raises(ValueError, match="mu"):
        loser_gradient_scale(torch.tensor([1.0, -1.0]), mu=1.5)


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return synthetic.write_pair_dataset(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 24, seed=0)


def test_the_safeguarded_step_has_the_same_loss_and_a_smaller_loser_gradient(
    tmp_path, tiny_sd_path, pairs_path
):
    """On the tiny UNet: the safeguard changes no value (loss, metrics) and only the loser's gradient,
    by λ ∈ [0, 1]; the monitors of the step equal the formulas on its own errors."""
    argv = tiny_run_flags(tiny_sd_path, pairs_path, tmp_path / "o", beta_dpo=50)
    plain_cfg, guarded_cfg = parse_config(argv), parse_config([*argv, "--winner_safeguard"])
    models = setup_models(plain_cfg, "cpu")
    g = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values_w": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "pixel_values_l": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "captions": ["a red circle", "a blue square"], "indices": torch.tensor([0, 1]), "epoch": 0,
    }  # fmt: skip
    with torch.no_grad():  # move the policy off its reference, so that the pairs do not all tie
        for p in models.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    loss, metrics = compute_batch_loss(models, batch, plain_cfg)
    guarded_loss, guarded = compute_batch_loss(models, batch, guarded_cfg)
    assert guarded_loss.item() == loss.item()
    assert all(guarded[k].item() == metrics[k].item() for k in metrics)
    scale = guarded["safeguard/loser_scale"].item()
    assert 0.0 <= scale <= 1.0
    # the monitors ride on the step's own numbers: mean |βδ| >= |mean βδ|, a factor strictly inside (0, 1)
    assert metrics["monitors/abs_margin"].item() >= abs(metrics["rewards/margins"].item()) - 1e-6
    assert 0.0 < metrics["monitors/grad_factor"].item() < 1.0
    assert metrics["pred_ms/model"].item() > 0 and metrics["pred_ms/ref"].item() > 0


# ---- --auto_beta --------------------------------------------------------------------------------


def test_auto_beta_by_hand():
    """β0 = 50, target 0.2 (logit(0.8) = ln 4 = 1.386294): step 1 ties (no margin, β unchanged); a mean
    |βδ| of 2.0 at β 50 is |δ| = 0.04, so β = ln 4 / 0.04 = 34.657359; then |βδ| 1.0 at that β is |δ| =
    0.028854, the EMA 0.99·0.04 + 0.01·0.028854 = 0.039889 and β = 34.754. Bounds clamp it."""
    auto = AutoBeta(50.0, target=0.2, decay=0.99, low=5.0, high=500.0)
    assert auto.update(0.0, 50.0) == 50.0 and auto.ema is None
    assert auto.update(2.0, 50.0) == pytest.approx(math.log(4) / 0.04, rel=1e-9)
    beta = auto.update(1.0, auto.beta)
    assert auto.ema == pytest.approx(0.99 * 0.04 + 0.01 * (1.0 / (math.log(4) / 0.04)), rel=1e-9)
    assert beta == pytest.approx(math.log(4) / auto.ema, rel=1e-9) and beta == pytest.approx(34.754, abs=1e-3)
    # at that β a pair with the typical |δ| has gradient factor σ(−β|δ|) = 0.2
    assert 1 / (1 + math.exp(beta * auto.ema)) == pytest.approx(0.2)
    assert AutoBeta(50.0, low=40.0, high=45.0).update(1e-6, 50.0) == 45.0
    assert AutoBeta(50.0, low=40.0, high=45.0).update(1e6, 50.0) == 40.0


def test_flags_of_the_guards_are_checked(tmp_path):
    argv = tiny_run_flags("m", "d", tmp_path)
    cfg = parse_config([*argv, "--auto_beta", "--beta_dpo", "50"])
    assert cfg.beta_range == (5.0, 500.0) and cfg.auto_beta_target == 0.2
    for bad, match in (
        (["--auto_beta_target", "0.6"], "--auto_beta_target must be in"),
        (["--winner_safeguard_mu", "2"], "--winner_safeguard_mu"),
        (["--stop_on_degradation", "-1"], "--stop_on_degradation"),
        (["--auto_beta", "--auto_beta_min", "6000"], "--auto_beta_min"),
        (["--winner_safeguard", "--objective", "kto"], "not on --objective kto"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_config([*argv, *bad])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(model, data, out, **overrides):
    reset_accelerate()
    return train(parse_config(tiny_run_flags(model, data, out, **overrides)))


def test_auto_beta_is_restored_exactly_on_resume(tmp_path, tiny_sd_path, pairs_path):
    """6 steps straight equal 3 steps, a checkpoint, and 3 resumed steps: the same β at every step
    (``train/beta``, restored from the checkpoint, not restarted at --beta_dpo) and the same weights."""
    from safetensors.torch import load_file

    common = dict(
        auto_beta=True, beta_dpo=50, train_batch_size=2, checkpointing_steps=3, lr_scheduler="constant"
    )
    _train(tiny_sd_path, pairs_path, tmp_path / "straight", max_train_steps=6, **common)
    _train(tiny_sd_path, pairs_path, tmp_path / "split", max_train_steps=3, **common)
    _train(
        tiny_sd_path,
        pairs_path,
        tmp_path / "split",
        max_train_steps=6,
        resume_from_checkpoint="latest",
        **common,
    )
    straight, split = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    betas = [r["train/beta"] for r in straight]
    assert betas[0] == betas[1] == 50.0 and len(set(betas[2:])) == 4  # moves once margins exist
    assert [r["train/beta"] for r in split] == betas  # exactly, not approximately
    state = json.loads((tmp_path / "split" / "checkpoint-3" / ckpt.STATE_FILE).read_text())
    assert state["monitors"]["auto_beta"]["beta"] == betas[3]
    a, b = load_file(tmp_path / "straight" / UNET), load_file(tmp_path / "split" / UNET)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


# ---- the trainer end to end ---------------------------------------------------------------------


def _copy_tiny_assets(embedded_default_run, cwd: Path) -> None:
    built = embedded_default_run[0] / "outputs/tiny"
    (cwd / "outputs/tiny").mkdir(parents=True)
    shutil.copytree(built / "base_model", cwd / "outputs/tiny/base_model")
    for data in ("pairs_train.parquet", "pairs_heldout.parquet"):
        shutil.copy(built / data, cwd / "outputs/tiny" / data)


def test_the_embedded_default_is_quiet_and_shows_its_monitors(embedded_default_run):
    """The README's first command (300 steps): the monitors are in metrics.jsonl and the closing
    lines, and none of them warns."""
    cwd, result = embedded_default_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = cwd / "outputs/tiny/dpo"
    assert json.loads((out / "summary.json").read_text())["monitors/warnings"] == []
    assert re.search(r"monitors over the last \d+ steps: winner's error vs the reference", result.stdout)
    assert "monitors: no warning" in result.stdout and "WARNING" not in result.stdout
    row = _rows(out)[-1]
    for key in ("monitors/chosen_vs_ref", "monitors/negative_margins", "monitors/grad_factor",
                "monitors/pred_norm_ratio", "monitors/chosen_rel_trend"):  # fmt: skip
        assert isinstance(row[key], float), key
    # the held-out accuracy's warning reads its Wilson interval's upper end, written out here
    validations = [r for r in _rows(out) if "eval/implicit_acc" in r]
    labels = pq.read_table(cwd / "outputs/tiny/pairs_heldout.parquet", columns=["label_0"])["label_0"]
    n = sum(label != 0.5 for label in labels.to_pylist())  # ties are dropped
    n = min(n, 256)  # configs/tiny.yaml's num_validation_pairs
    assert validations
    for r in validations:
        p, z = r["eval/implicit_acc"], 1.959963984540054
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert r["eval/implicit_acc_ci_high"] == pytest.approx((centre + half) / (1 + z * z / n), abs=1e-9)


UNSTABLE = ["--learning_rate", "3e-3", "--max_train_steps", "30", "--validation_steps", "30",
            "--num_validation_pairs", "16", "--checkpointing_steps", "1000", "--validation_prompts"]  # fmt: skip


def test_an_unstable_run_warns_and_with_stop_on_degradation_checkpoints_and_stops(
    tmp_path, embedded_default_run
):
    """The embedded default at 15x its learning rate: a monitor warns (in the log, summary.json and the
    closing lines); with --stop_on_degradation 5 the run saves a checkpoint and exits with status 1, a
    message with advice and no stack trace, and the checkpoint resumes."""
    _copy_tiny_assets(embedded_default_run, tmp_path)
    command = [
        sys.executable,
        str(ROOT / "train_sd.py"),
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        *UNSTABLE,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    warned = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert warned.returncode == 0, warned.stderr[-3000:]
    summary = json.loads((tmp_path / "outputs/tiny/dpo/summary.json").read_text())
    assert summary["monitors/warnings"], warned.stdout
    first = summary["monitors/warnings"][0]
    assert f"WARNING {first['monitor']}" in warned.stdout and "Try:" in warned.stdout
    assert f"monitor {first['monitor']}" in warned.stderr  # logged once when it fired

    shutil.rmtree(tmp_path / "outputs/tiny/dpo")
    stopped = subprocess.run(
        [*command, "--stop_on_degradation", "5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "stopped: stopped at step" in stopped.stderr
    assert "past its threshold" in stopped.stderr and "Try:" in stopped.stderr
    (path,) = ckpt.list_checkpoints(tmp_path / "outputs/tiny/dpo")
    step = int(path.name.split("-")[1])
    assert step < 30 and _rows(tmp_path / "outputs/tiny/dpo")[-1]["step"] == step
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    assert state["monitors"]["alarms"]["warnings"]
