"""Evaluation statistics against hand-derived numbers (diffusion_dpo.evaluation.stats)."""

import math

import numpy as np
import pytest

from diffusion_dpo.evaluation import stats


def test_summarize_hand_values():
    # scores 1, 2, 3, 6: mean 3, median 2.5, sample std sqrt(((−2)²+(−1)²+0+3²)/3) = sqrt(14/3)
    out = stats.summarize([[1.0, 2.0], [3.0, 6.0]])
    assert out["mean"] == pytest.approx(3.0)
    assert out["median"] == pytest.approx(2.5)
    assert out["sem"] == pytest.approx(math.sqrt(14 / 3) / 2)
    assert out["n"] == 4
    assert math.isnan(stats.summarize([[5.0]])["sem"])


def test_all_wins_rate_one_and_degenerate_interval():
    base = np.zeros((5, 3))
    wr = stats.win_rate(base + 1.0, base)
    assert (wr.win_rate, wr.ci_low, wr.ci_high, wr.n, wr.n_prompts) == (1.0, 1.0, 1.0, 15, 5)
    lose = stats.win_rate(base - 1.0, base)
    assert (lose.win_rate, lose.ci_low, lose.ci_high) == (0.0, 0.0, 0.0)


def test_ties_count_half():
    base = np.array([[0.0, 0.0], [0.0, 0.0]])
    cand = np.array([[1.0, 0.0], [0.0, -1.0]])  # win, tie, tie, loss → (1 + .5 + .5 + 0) / 4
    np.testing.assert_array_equal(stats.paired_outcomes(cand, base), [[1.0, 0.5], [0.5, 0.0]])
    assert stats.win_rate(cand, base).win_rate == pytest.approx(0.5)
    # all ties → 0.5 with a degenerate interval
    wr = stats.win_rate(base, base)
    assert (wr.win_rate, wr.ci_low, wr.ci_high) == (0.5, 0.5, 0.5)
    # tie tolerance turns a small difference into a tie
    assert stats.paired_outcomes([[0.01]], [[0.0]], tie_tol=0.05)[0, 0] == 0.5


def test_bootstrap_resamples_whole_prompts():
    # Prompt 0: candidate wins on both seeds; prompt 1: loses on both. Resampling prompts (clusters)
    # can only give rates 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4; resampling single images would
    # also give 1/4 and 3/4.
    base = np.zeros((2, 2))
    cand = np.array([[1.0, 1.0], [-1.0, -1.0]])
    boot = stats.bootstrap_win_rates(stats.paired_outcomes(cand, base), n_boot=20000, seed=0)
    values, counts = np.unique(boot, return_counts=True)
    np.testing.assert_array_equal(values, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.02)
    wr = stats.win_rate(cand, base, n_boot=20000)
    assert (wr.win_rate, wr.ci_low, wr.ci_high) == (0.5, 0.0, 1.0)


def test_bootstrap_interval_matches_binomial_quantiles():
    # 20 prompts × 1 seed, 15 wins: a resample's rate is Binomial(20, 3/4) / 20. Its 2.5% and 97.5%
    # quantiles: P(X ≤ 11) = 0.0409 ≥ 0.025 > P(X ≤ 10) = 0.0139 → 11/20; P(X ≤ 18) = 0.9757 ≥ 0.975 →
    # 18/20 (0.9757 is close to 0.975, so Monte-Carlo noise may give 19/20 — allow that neighbour).
    cand = np.array([1.0] * 15 + [-1.0] * 5)[:, None]
    wr = stats.win_rate(cand, np.zeros_like(cand), n_boot=20000, seed=1)
    assert wr.win_rate == 0.75
    assert wr.ci_low == pytest.approx(0.55)
    assert wr.ci_high in (pytest.approx(0.90), pytest.approx(0.95))
    # fixed RNG seed → identical interval on a rerun
    assert stats.win_rate(cand, np.zeros_like(cand), n_boot=20000, seed=1) == wr


def test_win_rate_by_category():
    base = np.zeros((4, 2))
    cand = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [0.0, -1.0]])
    cats = ["animals", "animals", "food", "food"]
    by = stats.win_rate_by_category(cand, base, cats)
    assert list(by) == ["animals", "food"]
    assert by["animals"].win_rate == pytest.approx(0.75)  # 1, 1, 1, 0
    assert by["food"].win_rate == pytest.approx(0.125)  # 0, 0, 0.5, 0
    assert by["animals"].n_prompts == 2 and by["food"].n == 4
    means = stats.summarize_by_category(cand, cats)
    assert means["animals"]["mean"] == pytest.approx(0.5)
    assert means["food"]["mean"] == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="categories"):
        stats.win_rate_by_category(cand, base, ["a"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same"):
        stats.win_rate(np.zeros((2, 2)), np.zeros((2, 3)))


def test_bradley_terry_worked_check_from_math_md():
    # docs/objectives.md#bradleyterry-rankings: A beat B 8 of 12 times, A beat C 3 of 8; B and C never met (no cycle).
    wins = np.array([[0.0, 8.0, 3.0], [4.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    s = stats.fit_bradley_terry(wins, anchor=0)
    assert s[0] == 0.0
    assert stats.sigmoid(s[0] - s[1]) == pytest.approx(2 / 3, abs=1e-4)
    assert stats.sigmoid(s[0] - s[2]) == pytest.approx(3 / 8, abs=1e-4)


def test_bradley_terry_satisfies_score_equations_with_a_cycle():
    # At the (unpenalised) MLE each model's expected wins equal its observed wins:
    # Σ_j n_ij σ(s_i − s_j) = Σ_j W_ij. A > B > C > A here, so no closed form.
    wins = np.array([[0.0, 7.0, 2.0], [3.0, 0.0, 6.0], [5.0, 4.0, 0.0]])
    s = stats.fit_bradley_terry(wins, l2=0.0)
    n = wins + wins.T
    expected = (n * stats.sigmoid(s[:, None] - s[None, :])).sum(axis=1)
    np.testing.assert_allclose(expected, wins.sum(axis=1), atol=1e-8)
    # the fit is a maximum: nudging any free strength lowers the likelihood
    best = stats.bradley_terry_log_likelihood(s, wins)
    for i in (1, 2):
        for eps in (1e-3, -1e-3):
            t = s.copy()
            t[i] += eps
            assert stats.bradley_terry_log_likelihood(t, wins) < best


def test_pairwise_wins_and_separation():
    a = np.array([[0.0, 0.0], [0.0, 0.0]])
    b = np.array([[1.0, 0.0], [1.0, 1.0]])  # beats a 3 times, ties once
    c = np.array([[2.0, 2.0], [2.0, 2.0]])  # beats everyone every time
    wins = stats.pairwise_wins([a, b, c])
    np.testing.assert_array_equal(wins, [[0.0, 0.5, 0.0], [3.5, 0.0, 0.0], [4.0, 4.0, 0.0]])
    s = stats.fit_bradley_terry(wins)  # c never loses: the tiny ridge keeps s finite
    assert np.all(np.isfinite(s)) and s[2] > s[1] > s[0] == 0.0
    assert stats.sigmoid(s[2]) > 0.99
