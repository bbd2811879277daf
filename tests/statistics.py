"""Statistical checks shared by the independence tests (engine level and through the server).

The samples are dropout keep indicators at p = 0.5, where every indicator is a fair coin under
independence; as s = 2 * kept - 1 they are iid Rademacher variables (+1 / -1). Two checks per
position (an element of a sample, say), each with a rigorous false-failure bound (Hoeffding's
inequality, Bonferroni over the positions, no normal approximation):

* keep frequency: the mean of s over the N repetitions has P(|mean| >= t) <= 2 exp(-N t^2 / 2);
* lag-1 correlation: the products s_i * s_{i+1} of consecutive repetitions are themselves iid
  Rademacher under independence, so their mean obeys the same bound with N - 1 terms.

ONNX Runtime's CPU Dropout fails both (its first element is kept in every run and most positions
correlate between consecutive runs): the control tests run these checks on it and expect them
to fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["IndependenceReport", "coin_independence", "hoeffding_threshold"]


def hoeffding_threshold(terms: int, positions: int, alpha: float) -> float:
    """t such that, for ``positions`` means of ``terms`` iid Rademacher variables each,
    P(any |mean| >= t) <= alpha (Hoeffding per position, Bonferroni over positions)."""
    return math.sqrt(2.0 * math.log(2.0 * positions / alpha) / terms)


@dataclass(frozen=True)
class IndependenceReport:
    """The two checks on (N, K) keep indicators: N repetitions of K positions.

    Attributes:
        max_keep_bias: the largest |mean of s| over the positions.
        keep_threshold: its bound.
        max_lag_correlation: the largest |mean of s_i * s_(i+1)| over the positions.
        lag_threshold: its bound.
        alpha: the false-failure probability of both checks together.
    """

    max_keep_bias: float
    keep_threshold: float
    max_lag_correlation: float
    lag_threshold: float
    alpha: float

    @property
    def independent(self) -> bool:
        return (
            self.max_keep_bias < self.keep_threshold
            and self.max_lag_correlation < self.lag_threshold
        )

    def __str__(self) -> str:
        return (
            f"keep bias {self.max_keep_bias:.3f} (bound {self.keep_threshold:.3f}), lag-1 "
            f"correlation {self.max_lag_correlation:.3f} (bound {self.lag_threshold:.3f}), "
            f"false-failure probability {self.alpha:g}"
        )


def coin_independence(kept: npt.NDArray[np.bool_], alpha: float = 1e-6) -> IndependenceReport:
    """Check (N, K) keep indicators of p = 0.5 dropout: fair coins, independent between
    consecutive repetitions. ``alpha`` is split equally between the two checks."""
    if kept.ndim != 2 or kept.shape[0] < 3:
        raise ValueError(f"need (N >= 3, K) indicators, got shape {kept.shape}")
    s = 2.0 * kept.astype(np.float64) - 1.0
    n, k = s.shape
    bias = np.abs(s.mean(axis=0))
    lag = np.abs((s[1:] * s[:-1]).mean(axis=0))
    return IndependenceReport(
        max_keep_bias=float(bias.max()),
        keep_threshold=hoeffding_threshold(n, k, alpha / 2),
        max_lag_correlation=float(lag.max()),
        lag_threshold=hoeffding_threshold(n - 1, k, alpha / 2),
        alpha=alpha,
    )


def request_correlations(kept: npt.NDArray[np.bool_], alpha: float = 1e-6) -> tuple[float, float]:
    """(N, K) keep indicators of N requests (K positions each, p = 0.5): the largest |mean of
    s_a * s_b| over the K positions for consecutive requests a, b, and its bound (Hoeffding
    with K terms, Bonferroni over the N - 1 pairs). Requests that shared masks would give 1."""
    s = 2.0 * kept.astype(np.float64) - 1.0
    n, k = s.shape
    largest = float(np.abs((s[1:] * s[:-1]).mean(axis=1)).max())
    return largest, hoeffding_threshold(k, n - 1, alpha)
