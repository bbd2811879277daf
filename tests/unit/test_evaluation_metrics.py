"""The evaluation's metrics against values computed by hand (no server, no socket)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.boston import BostonPlan, MLPStack, Standardiser, make_splits
from evaluation.convergence import StatisticSpread
from evaluation.metrics import (
    NLL_FLOOR,
    accuracy,
    auroc,
    brier_score,
    entropy,
    expected_calibration_error,
    gaussian_mc_log_likelihood,
    mean_and_standard_error,
    negative_log_likelihood,
    reliability_bins,
    rmse,
)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# Three rows, three classes: argmax 0 (label 0, right), 1 (label 1, right), 2 (label 0, wrong).
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
LABELS = np.array([0, 1, 0])


# -- regression ------------------------------------------------------------------------------


def test_log_likelihood_of_equidistant_samples_is_one_gaussian() -> None:
    # y = 2, samples 1 and 3, tau = 0.5: both terms are -0.5 * 0.5 * 1 = -0.25, so
    # logsumexp = -0.25 + log 2, and - log T (= log 2) leaves -0.25.
    ll = gaussian_mc_log_likelihood([[1.0, 3.0]], [2.0], tau=0.5)
    expected = -0.25 - HALF_LOG_2PI + 0.5 * math.log(0.5)
    assert ll.shape == (1,)
    assert ll[0] == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(-1.515512, abs=1e-6)


def test_log_likelihood_is_the_log_of_the_mixture_density() -> None:
    # y = 0, samples 0 and 2, tau = 1: log(0.5 * (N(0; 0, 1) + N(0; 2, 1))).
    def normal_pdf(x: float, mean: float) -> float:
        return math.exp(-0.5 * (x - mean) ** 2) / math.sqrt(2 * math.pi)

    expected = math.log(0.5 * (normal_pdf(0, 0) + normal_pdf(0, 2)))
    ll = gaussian_mc_log_likelihood([[0.0, 2.0]], [0.0], tau=1.0)
    assert ll[0] == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(-1.485158, abs=1e-6)


def test_log_likelihood_with_one_sample_is_the_gaussian_log_density() -> None:
    tau = 0.15
    ll = gaussian_mc_log_likelihood([[21.0], [30.0]], [24.0, 26.0], tau=tau)
    sigma2 = 1 / tau
    expected = [-0.5 * math.log(2 * math.pi * sigma2) - d**2 / (2 * sigma2) for d in (3.0, 4.0)]
    np.testing.assert_allclose(ll, expected, atol=1e-12)


def test_log_likelihood_stays_finite_far_from_every_sample() -> None:
    # exp(-0.5 * 1 * 1000^2) underflows to 0; logsumexp must not give -inf.
    ll = gaussian_mc_log_likelihood([[1000.0, 1000.0]], [0.0], tau=1.0)
    assert ll[0] == pytest.approx(-0.5 * 1000.0**2 - HALF_LOG_2PI, rel=1e-12)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_log_likelihood_rejects_a_non_positive_tau(tau: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        gaussian_mc_log_likelihood([[1.0]], [1.0], tau=tau)


def test_log_likelihood_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="samples must be"):
        gaussian_mc_log_likelihood([[1.0, 2.0]], [1.0, 2.0], tau=1.0)


def test_rmse() -> None:
    assert rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))


def test_mean_and_standard_error_uses_ddof_1() -> None:
    mean, se = mean_and_standard_error([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    # sample std = sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5 / 3); / sqrt(4)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)


def test_mean_and_standard_error_needs_two_values() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        mean_and_standard_error([1.0])


# -- classification --------------------------------------------------------------------------


def test_accuracy_nll_and_brier_by_hand() -> None:
    assert accuracy(PROBS, LABELS) == pytest.approx(2 / 3)
    expected_nll = -(math.log(0.7) + math.log(0.8) + math.log(0.3)) / 3
    assert negative_log_likelihood(PROBS, LABELS) == pytest.approx(expected_nll)
    # rows: 0.3^2 + 0.2^2 + 0.1^2 = 0.14; 0.1^2 + 0.2^2 + 0.1^2 = 0.06; 0.7^2 + 0.3^2 + 0.4^2 = 0.74
    assert brier_score(PROBS, LABELS) == pytest.approx((0.14 + 0.06 + 0.74) / 3)


def test_brier_score_bounds() -> None:
    assert brier_score([[1.0, 0.0]], [0]) == 0.0
    assert brier_score([[0.0, 1.0]], [0]) == 2.0


def test_nll_floors_a_zero_probability() -> None:
    assert negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(-math.log(NLL_FLOOR))


def test_classification_metrics_reject_bad_labels() -> None:
    with pytest.raises(ValueError, match="labels must be in"):
        accuracy(PROBS, [0, 1, 3])
    with pytest.raises(ValueError, match="probabilities must be"):
        brier_score(PROBS, [0, 1])


def test_entropy_in_nats_with_zero_log_zero() -> None:
    np.testing.assert_allclose(entropy([[0.25] * 4, [1.0, 0, 0, 0]]), [math.log(4), 0.0])
    assert not np.signbit(entropy([[1.0, 0.0]]))[0]


def test_ece_with_one_row_per_bin_is_the_mean_gap() -> None:
    # Confidences 0.7 (right), 0.8 (right), 0.4 (wrong) fall in three different bins of 15:
    # (0.3 + 0.2 + 0.4) / 3.
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(0.3)


def test_ece_averages_within_a_bin_before_the_gap() -> None:
    # 0.9 (right) and 0.92 (wrong) share the bin (13/15, 14/15]: accuracy 0.5, confidence
    # 0.91, ECE 0.41 (the mean per-row gap would be (0.1 + 0.92) / 2 = 0.51).
    probs = [[0.9, 0.1], [0.08, 0.92]]
    assert expected_calibration_error(probs, [0, 0]) == pytest.approx(0.41)


def test_reliability_bins() -> None:
    bins = reliability_bins([[0.5, 0.5], [0.0, 1.0], [0.9, 0.1], [0.08, 0.92]], [1, 1, 0, 0])
    assert bins.edges.shape == (16,)
    assert bins.count.sum() == 4
    assert bins.count[-1] == 1  # confidence 1.0 lands in the last bin
    assert bins.count[13] == 2  # 0.9 and 0.92
    assert bins.count[7] == 1  # 0.5 in (7/15, 8/15]
    assert bins.accuracy[13] == 0.5
    assert bins.confidence[13] == pytest.approx(0.91)
    assert np.isnan(bins.accuracy[0])  # empty bins are NaN, not 0


# -- AUROC -----------------------------------------------------------------------------------


def test_auroc_perfect_reversed_and_constant() -> None:
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert auroc([0.0, 0.0, 0.0], [0.0, 0.0]) == 0.5


def test_auroc_counts_ties_as_one_half() -> None:
    # Pairs (positive, negative): 1 > 0: 1; 1 = 1: 0.5 twice; 2 > all three: 3. Sum 5 of 6.
    assert auroc([0.0, 1.0, 1.0], [1.0, 2.0]) == pytest.approx(5 / 6)


def test_auroc_needs_both_groups() -> None:
    with pytest.raises(ValueError, match="both groups"):
        auroc([], [1.0])


# -- Boston protocol helpers -----------------------------------------------------------------


def test_splits_are_disjoint_complete_and_reproducible() -> None:
    splits = make_splits(506, 3, seed=0)
    for split in splits:
        assert (split.train.size, split.test.size) == (455, 51)
        assert np.union1d(split.train, split.test).size == 506
    assert not np.array_equal(splits[0].test, splits[1].test)
    np.testing.assert_array_equal(make_splits(506, 3, seed=0)[2].test, splits[2].test)


def test_stacked_network_exports_as_the_same_housing_mlp() -> None:
    """Network g of the stack, standardisation baked in, answers in original units."""
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (40, 13))
    y = rng.normal(22.0, 9.0, 40)
    standardiser = Standardiser.fit(x, y)
    stack = MLPStack([0.0, 0.0], 13, 50, rng)  # p = 0: a deterministic forward pass
    with torch.no_grad():
        stack.b1.normal_()
        stack.b2.normal_()
        features = torch.tensor(np.stack([standardiser.features(x)] * 2), dtype=torch.float32)
        standardised = stack.forward(features, rng)[1].double().numpy()
        model = stack.housing_mlp(1, standardiser)
        served = model(torch.tensor(x, dtype=torch.float32))[:, 0].double().numpy()
    expected = standardised * standardiser.y_std + standardiser.y_mean
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


# -- convergence -----------------------------------------------------------------------------


def test_spread_thresholds_on_an_exact_inverse_square_root() -> None:
    counts = [1, 10, 100, 1000, 10000]
    spread = np.array([[1 / math.sqrt(t), 0.5 / math.sqrt(t)] for t in counts])
    stat = StatisticSpread("m", "mean", "unit", 0.01, counts, ["a", "b"], spread)
    assert stat.at(100) == pytest.approx(0.1)
    assert stat.first_below_threshold() is None  # 0.01 is reached only at 10,000, not below
    assert stat.required_samples() == 10000
    loose = StatisticSpread("m", "mean", "unit", 0.05, counts, ["a", "b"], spread)
    assert loose.first_below_threshold() == 1000
    assert loose.required_samples() == 400


def test_selection_networks_with_and_without_a_shared_tau() -> None:
    gal = BostonPlan(dropout_rates=(0.01, 0.1), taus=(0.1, 0.2), selection_tau=None)
    assert gal.trained == gal.grid == [(0.01, 0.1), (0.01, 0.2), (0.1, 0.1), (0.1, 0.2)]
    assert gal.network_of(0.1, 0.1) == 2
    shared = BostonPlan(dropout_rates=(0.01, 0.1), taus=(0.1, 0.2), selection_tau=0.15)
    assert shared.trained == [(0.01, 0.15), (0.1, 0.15)]
    assert [shared.network_of(p, t) for p, t in shared.grid] == [0, 0, 1, 1]
