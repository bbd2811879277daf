"""Merging per-chunk summaries into the statistics of every sample, in float64.

The engine's graphs reduce each chunk of t samples to summaries (``service.engine.summaries``);
these accumulators merge the chunks exactly (Chan's parallel update) into the same
:class:`ClassificationStats` / :class:`RegressionStats` the per-sample accumulators of
``service.maths.uncertainty`` compute from raw samples, which stay the reference the tests
compare against.

Rows whose outputs were not finite are not an error here: their statistics come out NaN (or
infinite), and the caller fails the requests those rows belong to, not the whole batch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.maths.uncertainty import (
    ClassificationStats,
    RegressionStats,
    RunningMoments,
    classification_result,
    count_votes,
)

__all__ = ["ClassSummaryAccumulator", "ValueSummaryAccumulator", "VarianceSumAccumulator"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _f64(x: npt.ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


class ClassSummaryAccumulator:
    """Per-sample class probabilities, summarised per chunk: the sum and M2 of the
    probabilities over the chunk's samples, the sum of their entropies, and each sample's
    argmax."""

    def __init__(self) -> None:
        self._moments: RunningMoments | None = None
        self._entropy_sum: FloatArray | None = None
        self._votes: IntArray | None = None

    @property
    def num_samples(self) -> int:
        return 0 if self._moments is None else self._moments.count

    def update(
        self,
        count: int,
        prob_sum: npt.ArrayLike,
        prob_m2: npt.ArrayLike,
        entropy_sum: npt.ArrayLike,
        argmax: npt.ArrayLike,
    ) -> None:
        """Adds one chunk.

        Args:
            count: t, the chunk's samples.
            prob_sum: (B, ..., C) the sum of the probabilities over the chunk.
            prob_m2: (B, ..., C) their sum of squared deviations from the chunk's mean.
            entropy_sum: (B, ...) the sum of the per-sample entropies.
            argmax: (t, B, ...) each sample's most probable class.
        """
        total = _f64(prob_sum)
        winners = np.asarray(argmax, dtype=np.int64)
        # Argmax over NaN probabilities (a failed row) is whatever the kernel says; keep the
        # index in range so the vote count never fails the other rows.
        np.clip(winners, 0, total.shape[-1] - 1, out=winners)
        votes = count_votes(winners, total.shape[-1])
        if self._moments is None:
            self._moments = RunningMoments(total.shape)
            self._entropy_sum = np.zeros(total.shape[:-1])
            self._votes = np.zeros(total.shape, dtype=np.int64)
        assert self._entropy_sum is not None
        assert self._votes is not None
        self._moments.merge_shifted(count, total / count, _f64(prob_m2))
        self._entropy_sum = self._entropy_sum + _f64(entropy_sum)
        self._votes = self._votes + votes

    def result(self, samples: FloatArray | None = None) -> ClassificationStats:
        if self._moments is None or self._entropy_sum is None or self._votes is None:
            raise ValueError("no samples accumulated")
        return classification_result(
            self._moments.count,
            self._moments.mean(),
            self._moments.variance(),
            self._entropy_sum,
            self._votes,
            samples=samples,
        )


class ValueSummaryAccumulator:
    """Real values, summarised per chunk (in float64) by the chunk's first sample (a shift),
    the sum of the deviations from it and their M2."""

    def __init__(self) -> None:
        self._moments: RunningMoments | None = None

    @property
    def num_samples(self) -> int:
        return 0 if self._moments is None else self._moments.count

    def update(
        self, count: int, shift: npt.ArrayLike, deviation_sum: npt.ArrayLike, m2: npt.ArrayLike
    ) -> None:
        """Adds one chunk: ``shift``, ``deviation_sum`` and ``m2`` are each (B, ...)."""
        first = _f64(shift)
        if self._moments is None:
            self._moments = RunningMoments(first.shape, shift=first)
        # The chunk's mean minus the running shift, without adding the shift in between (which
        # would round away the precision the shift keeps for values far from zero).
        offset = (first - self._moments.shift) + _f64(deviation_sum) / count
        self._moments.merge_shifted(count, offset, _f64(m2))

    def result(self, samples: FloatArray | None = None) -> RegressionStats:
        if self._moments is None:
            raise ValueError("no samples accumulated")
        variance = self._moments.variance()
        return RegressionStats(
            num_samples=self._moments.count,
            mean=self._moments.mean(),
            variance=variance,
            std=np.sqrt(variance),
            samples=samples,
        )


class VarianceSumAccumulator:
    """The mean over samples of a heteroscedastic model's predicted variances (the aleatoric
    variance), from per-chunk sums; they are non-negative, so a plain float64 sum loses nothing
    to cancellation."""

    def __init__(self) -> None:
        self._sum: FloatArray | None = None
        self.num_samples = 0

    def update(self, count: int, variance_sum: npt.ArrayLike) -> None:
        chunk = _f64(variance_sum)
        self._sum = chunk if self._sum is None else self._sum + chunk
        self.num_samples += count

    def result(self) -> FloatArray:
        if self._sum is None:
            raise ValueError("no samples accumulated")
        return self._sum / self.num_samples
