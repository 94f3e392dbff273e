"""Soft labels: the expected pairwise loss p·ℓ(rc, rr) + (1 − p)·ℓ(rr, rc) (losses/soft_labels.py)."""

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from test_distributed import UNET, _assert_same_training, _rows, _train
from trainer_runs import tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.losses import (
    PAIRWISE_LOSSES,
    dpo_loss,
    expected_pairwise_loss,
    pairwise_loss_from_logratios,
)
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.step import label_metrics


def test_sigmoid_soft_loss_equals_the_hand_written_expectation():
    """β = 1, rc = 1, rr = 0 (z = 1), p = 0.7:
    0.7·log(1 + e^−1) + 0.3·log(1 + e) = 0.7·0.3132617 + 0.3·1.3132617 = 0.6132617,
    which is also softplus(−z) + (1 − p)·z (an independent form of the same cross-entropy)."""
    rc, rr, p = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.7])
    losses, _, _ = pairwise_loss_from_logratios(rc, rr, beta=1.0, label_p=p)
    assert losses.item() == pytest.approx(0.6132617, abs=1e-6)
    z = torch.linspace(-30, 30, 13)
    ps = torch.linspace(0, 1, 13)
    soft = expected_pairwise_loss(PAIRWISE_LOSSES["sigmoid"], z, torch.zeros(13), ps, 1.0)
    torch.testing.assert_close(soft, F.softplus(-z) + (1 - ps) * z)


def test_hinge_and_ipo_soft_losses_by_hand():
    rc, rr, p = torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([0.7])
    # hinge: 0.7·relu(1 − 0.5) + 0.3·relu(1 + 0.5) = 0.35 + 0.45
    hinge, _, _ = pairwise_loss_from_logratios(rc, rr, beta=1.0, loss_type="hinge", label_p=p)
    assert hinge.item() == pytest.approx(0.8)
    # ipo (β = 0.5, 1/(2β) = 1): 0.7·(0.5 − 1)² + 0.3·(−0.5 − 1)² = 0.175 + 0.675
    ipo, _, _ = pairwise_loss_from_logratios(rc, rr, beta=0.5, loss_type="ipo", label_p=p)
    assert ipo.item() == pytest.approx(0.85)


@pytest.mark.parametrize("loss_type", sorted(PAIRWISE_LOSSES))
def test_p_one_and_zero_give_the_hard_losses_exactly(loss_type):
    torch.manual_seed(0)
    rc, rr = torch.randn(8) * 3, torch.randn(8) * 3
    eps = {"exo_pair": 0.1, "robust": 0.1, "sigmoid": 0.1}.get(loss_type, 0.0)
    hard, _, _ = pairwise_loss_from_logratios(rc, rr, beta=0.7, loss_type=loss_type, label_smoothing=eps)
    swapped, _, _ = pairwise_loss_from_logratios(rr, rc, beta=0.7, loss_type=loss_type, label_smoothing=eps)
    ones, _, _ = pairwise_loss_from_logratios(
        rc, rr, beta=0.7, loss_type=loss_type, label_smoothing=eps, label_p=torch.ones(8)
    )
    zeros, _, _ = pairwise_loss_from_logratios(
        rc, rr, beta=0.7, loss_type=loss_type, label_smoothing=eps, label_p=torch.zeros(8)
    )
    assert torch.equal(ones, hard) and torch.equal(zeros, swapped)


def test_a_tie_pulls_the_margin_to_zero_and_the_lm_side_shares_the_loss():
    z = torch.tensor([0.0, 2.0, -2.0], requires_grad=True)
    losses, _, _ = pairwise_loss_from_logratios(z, torch.zeros(3), beta=1.0, label_p=torch.full((3,), 0.5))
    losses.sum().backward()
    assert z.grad[0].item() == pytest.approx(0.0, abs=1e-7)  # no push at a margin of 0
    assert z.grad[1].item() > 0 and z.grad[2].item() < 0  # any margin is pulled back toward 0
    # the LM side's dpo_loss is the same function of the log-probs
    pc, pr, rc, rr = (torch.randn(4) for _ in range(4))
    p = torch.tensor([1.0, 0.8, 0.5, 0.1])
    lm, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_p=p)
    core, _, _ = pairwise_loss_from_logratios(pc - rc, pr - rr, beta=0.1, label_p=p)
    torch.testing.assert_close(lm, core)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        pairwise_loss_from_logratios(pc, pr, label_p=torch.ones(3))


def test_label_metrics_report_the_label_distribution_of_valid_pairs():
    p = torch.tensor([1.0, 0.5, 0.75, 0.5, 1.0])
    valid = torch.tensor([True, True, True, True, False])
    m = label_metrics(p, valid)
    assert m["labels/p_mean"].item() == pytest.approx((1 + 0.5 + 0.75 + 0.5) / 4)
    assert m["labels/tie_share"].item() == pytest.approx(0.5)
    assert m["labels/split_share"].item() == pytest.approx(0.25)


def test_soft_label_flags_are_checked(tmp_path):
    base = tiny_run_flags("m", "d", "o")
    assert parse_config([*base, "--label_mode", "soft"]).effective_keep_ties
    with pytest.raises(ValueError, match="--label_mode soft weights the pairwise DPO losses"):
        parse_config([*base, "--label_mode", "soft", "--objective", "kto"])
    with pytest.raises(ValueError, match="--min_label_margin must be in"):
        parse_config([*base, "--min_label_margin", "1.5"])
    with pytest.raises(SystemExit):  # argparse's choices: a usage error
        parse_config([*base, "--label_mode", "fuzzy"])


@pytest.fixture(scope="module")
def vote_share_pairs(tmp_path_factory):
    """24 synthetic pairs rewritten as caption, image_0, image_1, label_0 with vote shares and ties."""
    folder = tmp_path_factory.mktemp("soft_data")
    path = synthetic.write_pair_dataset(folder / "pairs.parquet", 24, seed=0, tie_fraction=0.0)
    rows = pq.read_table(path).to_pylist()
    shares = [1.0, 0.8, 0.6, 0.5, 0.35, 0.0]
    out = [
        {"caption": r["caption"], "image_0": r["jpg_0"], "image_1": r["jpg_1"],
         "label_0": shares[i % len(shares)] if r["label_0"] == 1.0 else 1 - shares[i % len(shares)]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    target = folder / "votes.parquet"
    pq.write_table(pa.Table.from_pylist(out), target)
    return target


@pytest.mark.slow  # two accelerate launches, about 80 s on 2 cores
def test_two_processes_train_with_soft_labels_what_one_process_trains(
    tmp_path, tiny_sd_path, vote_share_pairs
):
    common = dict(
        pretrained_model_name_or_path=tiny_sd_path, dataset_name=vote_share_pairs, resolution=32,
        max_train_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2, adam_epsilon=1.0,
        lr_warmup_steps=0, checkpointing_steps=100, seed=0, label_mode="soft",
    )  # fmt: skip
    _train(1, output_dir=tmp_path / "one", train_batch_size=2, **common)
    _train(2, output_dir=tmp_path / "two", train_batch_size=1, **common)
    _assert_same_training(Path(tiny_sd_path) / UNET, tmp_path / "one", tmp_path / "two")
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for r1, r2 in zip(one, two, strict=True):
        for key in ("labels/p_mean", "labels/tie_share", "labels/split_share"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    # vote shares arrived: some ties (p = 0.5) and split votes among the 12 pairs trained on
    assert any(r["labels/tie_share"] > 0 for r in one) and any(r["labels/split_share"] > 0 for r in one)
    assert not math.isnan(one[-1]["loss"])
