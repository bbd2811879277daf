"""Adaptive sampling: sample in rounds until every row's Monte Carlo standard error meets a
target, or the row reaches the cap on T.

The precision of a row is the largest Monte Carlo standard error of the mean over its output
elements, sqrt(variance / n) (of the probabilities for classifiers). Rows that meet the target
stop; the others run another round, as many samples as they already have (doubling), capped at
T max. Rounds of the unfinished rows run as ordinary engine runs (through the batcher), and
:class:`RowMerger` folds each round into per-row statistics with Chan's parallel update, so
rows may end with different T.

Pure numpy, float64.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

from service.maths.uncertainty import (
    ClassificationStats,
    RegressionStats,
    chan_merge,
    classification_result,
)

__all__ = ["FIRST_ROUND_SAMPLES", "RowMerger", "next_round"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
OutputStats = RegressionStats | ClassificationStats

#: Samples of the first round (at least 2, so that every row gets a variance).
FIRST_ROUND_SAMPLES = 32


def next_round(done: int, max_samples: int) -> int:
    """Samples of the next round for a row that has ``done``: double it, within the cap."""
    first = min(max(2, FIRST_ROUND_SAMPLES), max_samples)
    return first if done == 0 else max(0, min(done, max_samples - done))


def _expand(counts: IntArray, ndim: int) -> IntArray:
    """(B,) counts reshaped to broadcast over (B, ...) arrays of ``ndim`` dimensions."""
    return counts.reshape(-1, *([1] * (ndim - 1)))


class RowMerger:
    """Per-row statistics of one output, merged from rounds that ran on subsets of the rows.

    Args:
        num_rows: B.
    """

    def __init__(self, num_rows: int) -> None:
        self.counts: IntArray = np.zeros(num_rows, dtype=np.int64)
        self._mean: FloatArray | None = None
        self._m2: FloatArray | None = None
        self._aleatoric_sum: FloatArray | None = None
        self._entropy_sum: FloatArray | None = None
        self._votes: IntArray | None = None
        self._classification = False

    def add(self, rows: npt.NDArray[np.intp], stats: OutputStats) -> None:
        """Merge one round's statistics of the rows ``rows`` (its arrays are in that order)."""
        n = stats.num_samples
        m2 = np.nan_to_num(stats.variance) * (n - 1)
        if self._mean is None:
            shape = (self.counts.shape[0], *stats.mean.shape[1:])
            self._mean, self._m2 = np.zeros(shape), np.zeros(shape)
            self._classification = isinstance(stats, ClassificationStats)
            if isinstance(stats, ClassificationStats):
                rows_shape = (self.counts.shape[0], *stats.expected_entropy.shape[1:])
                self._entropy_sum = np.zeros(rows_shape)
                self._votes = np.zeros(shape, dtype=np.int64)
            elif stats.aleatoric_variance is not None:
                self._aleatoric_sum = np.zeros(shape)
        assert self._m2 is not None
        before = _expand(self.counts[rows], stats.mean.ndim)
        self._mean[rows], self._m2[rows] = chan_merge(
            (before, self._mean[rows], self._m2[rows]), (n, stats.mean, m2)
        )
        self.counts[rows] += n
        if isinstance(stats, ClassificationStats):
            assert self._entropy_sum is not None
            assert self._votes is not None
            self._entropy_sum[rows] += stats.expected_entropy * n
            self._votes[rows] += stats.vote_counts
        elif self._aleatoric_sum is not None and stats.aleatoric_variance is not None:
            self._aleatoric_sum[rows] += stats.aleatoric_variance * n

    def _variance(self) -> FloatArray:
        assert self._m2 is not None
        counts = _expand(self.counts, self._m2.ndim)
        with np.errstate(invalid="ignore", divide="ignore"):
            variance: FloatArray = np.where(
                counts > 1, self._m2 / np.maximum(counts - 1, 1), np.nan
            )
        return variance

    def standard_error(self) -> FloatArray:
        """(B,) the largest standard error of the mean over each row's elements; inf for rows
        without two samples."""
        variance = self._variance()
        counts = _expand(self.counts, variance.ndim)
        with np.errstate(invalid="ignore", divide="ignore"):
            se = np.sqrt(variance / counts)
        flat = np.where(np.isnan(se), np.inf, se).reshape(se.shape[0], -1)
        worst: FloatArray = flat.max(axis=1)
        return worst

    def result(self, template: OutputStats) -> OutputStats:
        """The merged statistics; ``num_samples`` is the largest T of any row (the per-row T is
        in ``counts``)."""
        assert self._mean is not None
        mean = self._mean.copy()
        variance = self._variance()
        fields: dict[str, Any] = {
            "num_samples": int(self.counts.max()),
            "mean": mean,
            "variance": variance,
            "std": np.sqrt(variance),
            "samples": None,
        }
        if isinstance(template, ClassificationStats):
            assert self._entropy_sum is not None
            assert self._votes is not None
            return classification_result(self.counts, mean, variance, self._entropy_sum,
                                         self._votes)  # fmt: skip
        if self._aleatoric_sum is not None:
            aleatoric = self._aleatoric_sum / _expand(self.counts, mean.ndim)
            fields |= {"aleatoric_variance": aleatoric, "total_variance": variance + aleatoric}
        return dataclasses.replace(template, **fields)
