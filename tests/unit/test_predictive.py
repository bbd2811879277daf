"""Variance decomposition and prediction intervals against references computed independently
(math.erf, statistics.NormalDist, numpy.quantile, and exact hand values)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from service.maths.predictive import (
    AleatoricAccumulator,
    empirical_interval,
    gaussian_interval,
    mixture_interval,
    normal_cdf,
)


def test_normal_cdf_matches_math_erf() -> None:
    z = np.linspace(-8, 8, 2001)
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z])
    assert np.abs(normal_cdf(z) - exact).max() < 1.5e-7


def test_aleatoric_is_the_mean_of_predicted_variances_over_chunks() -> None:
    acc = AleatoricAccumulator()
    acc.update([[[1.0], [4.0]], [[3.0], [0.0]]])  # t=2, B=2
    acc.update([[[2.0], [2.0]]])  # t=1
    # row 0: (1 + 3 + 2) / 3 = 2; row 1: (4 + 0 + 2) / 3 = 2
    np.testing.assert_allclose(acc.result(), [[2.0], [2.0]])
    assert acc.num_samples == 3


@pytest.mark.parametrize("bad", [[[[-1.0]]], [[[np.nan]]]])
def test_aleatoric_rejects_bad_variances(bad: list[list[list[float]]]) -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        AleatoricAccumulator().update(bad)


def test_gaussian_interval_uses_the_normal_quantile() -> None:
    interval = gaussian_interval(np.array([10.0]), np.array([4.0]), 0.95)
    z = NormalDist().inv_cdf(0.975)  # 1.959964...
    np.testing.assert_allclose(interval.lower, [10 - 2 * z])
    np.testing.assert_allclose(interval.upper, [10 + 2 * z])
    assert interval.method == "gaussian"


def test_empirical_interval_is_the_sample_quantiles() -> None:
    samples = np.arange(101, dtype=np.float64)[None, :, None]  # B=1, T=101, D=1: 0..100
    interval = empirical_interval(samples, 0.9)
    np.testing.assert_allclose(interval.lower, [[5.0]])
    np.testing.assert_allclose(interval.upper, [[95.0]])


def test_mixture_of_identical_normals_is_that_normal() -> None:
    means = np.full((2, 50, 1), 3.0)
    variances = np.full((2, 50, 1), 0.25)
    interval = mixture_interval(means, variances, 0.9)
    expected = gaussian_interval(np.full((2, 1), 3.0), np.full((2, 1), 0.25), 0.9)
    np.testing.assert_allclose(interval.lower, expected.lower, atol=1e-6)
    np.testing.assert_allclose(interval.upper, expected.upper, atol=1e-6)


def test_mixture_bounds_have_the_requested_mass() -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(0, 3, (3, 40, 2))
    variances = rng.uniform(0.1, 2.0, (3, 40, 2))
    interval = mixture_interval(means, variances, 0.8)

    def mixture_cdf(x: float, b: int, d: int) -> float:
        return float(np.mean([0.5 * (1 + math.erf((x - m) / math.sqrt(2 * v)))
                              for m, v in zip(means[b, :, d], variances[b, :, d], strict=True)]))  # fmt: skip

    for b in range(3):
        for d in range(2):
            assert mixture_cdf(interval.lower[b, d], b, d) == pytest.approx(0.1, abs=1e-6)
            assert mixture_cdf(interval.upper[b, d], b, d) == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5])
def test_levels_outside_zero_one_are_refused(level: float) -> None:
    with pytest.raises(ValueError, match="must be in"):
        gaussian_interval(np.zeros(1), np.ones(1), level)
