"""Monte Carlo dropout statistics: samples (T, B, ...) -> mean, variance, entropy, MI, votes.

Pure numpy (no torch, onnxruntime or grpc), so the maths can be tested on its own. The server
runs T stochastic passes over a batch of B rows, possibly in chunks of t samples to bound
memory; each chunk arrives sample-major as an array of shape (t, B, ...) and is folded into an
accumulator, so T can reach 10,000+ without holding every sample at once.

Conventions:
    * Everything is accumulated and returned in float64, whatever the model's output dtype.
    * ``variance`` is the unbiased sample variance across the T samples (ddof=1). It is
      undefined for T == 1 and reported as NaN (so is ``std``).
    * Entropies are in nats, with 0 * log 0 = 0, so one-hot probabilities give 0, not NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.maths.predictive import Interval

__all__ = [
    "ClassificationAccumulator",
    "ClassificationStats",
    "OutputStats",
    "RegressionAccumulator",
    "RegressionStats",
    "chan_merge",
    "classification_result",
    "classification_stats",
    "concat_rows",
    "count_votes",
    "regression_stats",
    "slice_rows",
    "softmax",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _softmax_and_log(logits: FloatArray, axis: int) -> tuple[FloatArray, FloatArray]:
    """Returns (softmax, log-softmax) of float64 logits along ``axis``, both the input's shape."""
    # Subtracting the max makes the largest term exp(0) = 1: nothing overflows, and the sum is
    # >= 1, so its log is finite and log-softmax stays finite even where softmax underflows to 0.
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=axis, keepdims=True)
    return exp / total, shifted - np.log(total)


def softmax(logits: npt.ArrayLike, axis: int = -1) -> FloatArray:
    """Numerically stable softmax, computed in float64.

    Args:
        logits: Real array of any shape; ``axis`` is the class axis (C).
        axis: The axis to normalise over.

    Returns:
        Probabilities of the same shape as ``logits``, summing to 1 along ``axis``.
    """
    return _softmax_and_log(np.asarray(logits, dtype=np.float64), axis)[0]


def _entropy(probs: FloatArray, log_probs: FloatArray) -> FloatArray:
    """Shannon entropy in nats over the last (class) axis: (..., C) -> (...)."""
    plogp_sum: FloatArray = (probs * log_probs).sum(axis=-1)
    # 0.0 - x rather than -x, so that a one-hot row gives 0.0 and not -0.0.
    return 0.0 - plogp_sum


def _log_where_positive(probs: FloatArray) -> FloatArray:
    """log(p) where p > 0 and 0 elsewhere, so that p * log p is 0 (not 0 * -inf = NaN) at p = 0."""
    log_probs = np.zeros_like(probs)
    np.log(probs, out=log_probs, where=probs > 0)
    return log_probs


def _as_chunk(values: npt.ArrayLike, name: str) -> FloatArray:
    """Validates a chunk of shape (t, B, ...) with t >= 1 and returns it as float64."""
    array = np.asarray(values)
    if array.ndim < 2 or array.shape[0] < 1:
        raise ValueError(f"{name} must have shape (t, B, ...) with t >= 1, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be a real (float or integer) array, got dtype {array.dtype}")
    chunk = array.astype(np.float64, copy=False)
    # One NaN or inf would silently poison every later statistic of its row; fail on arrival.
    num_bad = int(np.count_nonzero(~np.isfinite(chunk)))
    if num_bad:
        raise ValueError(f"{name} must be finite, got {num_bad} NaN or infinite values")
    return chunk


def chan_merge(
    a: tuple[npt.ArrayLike, FloatArray, FloatArray], b: tuple[npt.ArrayLike, FloatArray, FloatArray]
) -> tuple[FloatArray, FloatArray]:
    """Chan et al.'s parallel update: the mean and M2 (sum of squared deviations) of two groups
    of samples, each given as (count, mean, M2).

    Exact in real arithmetic and free of the catastrophic cancellation of
    sum(x**2) - n * mean**2. Counts may be scalars or arrays that broadcast against the means
    (per-row counts of adaptive sampling); a group with count 0 contributes nothing.

    Returns:
        (mean, m2) of the union; its count is the sum of the counts.
    """
    (count_a, mean_a, m2_a), (count_b, mean_b, m2_b) = a, b
    n_a = np.asarray(count_a, dtype=np.float64)
    n_b = np.asarray(count_b, dtype=np.float64)
    total = n_a + n_b
    weight_b = np.where(total > 0, n_b / np.where(total > 0, total, 1.0), 0.0)
    delta = mean_b - mean_a
    mean: FloatArray = mean_a + delta * weight_b
    m2: FloatArray = m2_a + m2_b + np.square(delta) * (n_a * weight_b)
    return mean, m2


class RunningMoments:
    """Running count, mean and M2 (sum of squared deviations) of samples (t, *row_shape).

    Chunks are merged with :func:`chan_merge`. The values are also shifted by the first sample
    seen: variance is shift-invariant, and subtracting a nearby float is exact (Sterbenz), so
    values like 1e8 + N(0, 1) keep full relative precision.
    """

    def __init__(self, row_shape: tuple[int, ...], shift: FloatArray | None = None) -> None:
        self.row_shape = row_shape
        self.count = 0
        self._shift: FloatArray = np.zeros(row_shape) if shift is None else shift.copy()
        self._mean: FloatArray = np.zeros(row_shape)  # mean of the shifted values
        self._m2: FloatArray = np.zeros(row_shape)

    @classmethod
    def of_chunk(cls, chunk: FloatArray) -> RunningMoments:
        moments = cls(chunk.shape[1:], shift=chunk[0])
        moments.update(chunk)
        return moments

    def check_row_shape(self, chunk: FloatArray, name: str) -> None:
        """Raises ValueError unless ``chunk`` has shape (t, *row_shape)."""
        if chunk.shape[1:] != self.row_shape:
            expected = ", ".join(["t", *map(str, self.row_shape)])
            raise ValueError(
                f"{name} must have shape ({expected}) to match earlier updates, "
                f"got shape {chunk.shape}"
            )

    def update(self, chunk: FloatArray) -> None:
        """Merges a chunk of shape (t, *row_shape); the shape must already be checked."""
        shifted = chunk - self._shift
        # Two-pass statistics within the chunk, then one Chan merge with the running totals.
        chunk_mean = shifted.mean(axis=0)
        self.merge_shifted(chunk.shape[0], chunk_mean, np.square(shifted - chunk_mean).sum(0))

    @property
    def shift(self) -> FloatArray:
        """The value subtracted from every sample before its moments are taken."""
        return self._shift

    def merge_shifted(self, count: int, mean: FloatArray, m2: FloatArray) -> None:
        """Merges a group of ``count`` samples given by its mean minus :attr:`shift` and its M2
        (each row_shape). Passing the difference, not the mean, keeps the precision the shift
        buys."""
        self._mean, self._m2 = chan_merge((self.count, self._mean, self._m2), (count, mean, m2))
        self.count += count

    def mean(self) -> FloatArray:
        """Mean over samples, shape row_shape."""
        return self._shift + self._mean

    def m2(self) -> FloatArray:
        return self._m2.copy()

    def variance(self) -> FloatArray:
        """Unbiased (ddof=1) variance over samples, shape row_shape; NaN when count == 1."""
        if self.count < 2:
            return np.full(self.row_shape, np.nan)
        return self._m2 / (self.count - 1)


# eq=False: the fields are arrays, and a generated __eq__ would raise on their ambiguous truth.
@dataclass(frozen=True, eq=False)
class RegressionStats:
    """Statistics of T regression samples per row.

    Attributes:
        num_samples: T, the number of stochastic samples.
        mean: (B, ...) mean over samples.
        variance: (B, ...) unbiased sample variance over samples (ddof=1); NaN when T == 1,
            where it is undefined.
        std: (B, ...) square root of ``variance``.
        samples: (B, T, ...) every sample, row-first, when the accumulator kept them; else
            None.
        aleatoric_variance: (B, ...) heteroscedastic models only: the mean over samples of
            the model's predicted variance (``variance`` is then the epistemic part).
        total_variance: (B, ...) ``variance + aleatoric_variance``, the predictive variance.
        intervals: prediction intervals, when asked for (``service.maths.predictive.Interval``).
    """

    num_samples: int
    mean: FloatArray
    variance: FloatArray
    std: FloatArray
    samples: FloatArray | None = None
    aleatoric_variance: FloatArray | None = None
    total_variance: FloatArray | None = None
    intervals: tuple[Interval, ...] = ()


@dataclass(frozen=True, eq=False)
class ClassificationStats:
    """Statistics of T per-sample class probability vectors per row (entropies in nats).

    Attributes:
        num_samples: T, the number of stochastic samples.
        mean: (B, C) mean of the per-sample probabilities (the predictive distribution).
        variance: (B, C) unbiased per-class variance of the per-sample probabilities (ddof=1);
            NaN when T == 1.
        std: (B, C) square root of ``variance``.
        predicted_class: (B,) argmax of ``mean``, the first index on ties.
        predictive_entropy: (B,) entropy of ``mean``: total uncertainty.
        expected_entropy: (B,) mean over samples of each sample's entropy: aleatoric part.
        mutual_information: (B,) predictive_entropy - expected_entropy (BALD): epistemic part,
            with negative rounding residue clipped to 0.
        variation_ratio: (B,) 1 - (votes of the modal class) / T; 0 when all samples agree.
        vote_counts: (B, C) how many samples voted each class (per-sample argmax, first index
            on ties); each row sums to T.
    """

    num_samples: int
    mean: FloatArray
    variance: FloatArray
    std: FloatArray
    predicted_class: IntArray
    predictive_entropy: FloatArray
    expected_entropy: FloatArray
    mutual_information: FloatArray
    variation_ratio: FloatArray
    vote_counts: IntArray
    samples: FloatArray | None = None


class _SampleKeeper:
    """Keeps every chunk of per-sample values when asked (bounded by the caller: the server
    checks its max_returned_samples limit before running)."""

    def __init__(self, keep: bool) -> None:
        self._chunks: list[FloatArray] | None = [] if keep else None

    def add(self, chunk: FloatArray) -> None:
        if self._chunks is not None:
            self._chunks.append(np.array(chunk, dtype=np.float64))

    def rows_first(self) -> FloatArray | None:
        """(B, T, ...): the chunks (t, B, ...) joined along T, then rows first."""
        if not self._chunks:
            return None
        return np.ascontiguousarray(np.moveaxis(np.concatenate(self._chunks, axis=0), 0, 1))


class RegressionAccumulator:
    """Accumulates regression samples chunk by chunk, in float64: ``update()`` per chunk of
    shape (t, B, ...), then ``result()``.

    Args:
        keep_samples: also keep every sample, returned as ``samples`` (B, T, ...).
    """

    def __init__(self, *, keep_samples: bool = False) -> None:
        self._moments: RunningMoments | None = None
        self._kept = _SampleKeeper(keep_samples)

    @property
    def num_samples(self) -> int:
        """Samples accumulated so far (T)."""
        return 0 if self._moments is None else self._moments.count

    def update(self, samples: npt.ArrayLike) -> None:
        """Adds a chunk of samples.

        Args:
            samples: (t, B, ...) real array, sample-major, t >= 1. The first update fixes the row
                shape (B, ...); later updates must match it.

        Raises:
            ValueError: If the shape or dtype is wrong or a value is NaN or infinite; the
                accumulator is then left unchanged.
        """
        chunk = _as_chunk(samples, "samples")
        if self._moments is None:
            self._moments = RunningMoments.of_chunk(chunk)
        else:
            self._moments.check_row_shape(chunk, "samples")
            self._moments.update(chunk)
        self._kept.add(chunk)

    def result(self) -> RegressionStats:
        """Returns the statistics of every sample so far (fresh arrays; updates may continue).

        Raises:
            ValueError: If no samples were added.
        """
        if self._moments is None:
            raise ValueError("no samples accumulated: call update() before result()")
        variance = self._moments.variance()
        return RegressionStats(
            num_samples=self._moments.count,
            mean=self._moments.mean(),
            variance=variance,
            std=np.sqrt(variance),
            samples=self._kept.rows_first(),
        )


class ClassificationAccumulator:
    """Accumulates per-sample class outputs chunk by chunk, in float64.

    Args:
        from_logits: If True, each sample's outputs are logits and are softmaxed over the class
            axis; if False, they are probabilities and are used as given (not renormalised).
        keep_samples: also keep every sample's probabilities, returned as ``samples``
            (B, T, C).
    """

    def __init__(self, *, from_logits: bool, keep_samples: bool = False) -> None:
        self._kept = _SampleKeeper(keep_samples)
        self._from_logits = from_logits
        self._name = "logits" if from_logits else "probabilities"
        self._moments: RunningMoments | None = None
        self._entropy_sum: FloatArray | None = None  # (B,) sum over samples of H[p_t]
        self._vote_counts: IntArray | None = None  # (B, C)

    @property
    def num_samples(self) -> int:
        """Samples accumulated so far (T)."""
        return 0 if self._moments is None else self._moments.count

    def update(self, outputs: npt.ArrayLike) -> None:
        """Adds a chunk of per-sample outputs.

        Args:
            outputs: (t, B, C) real array, sample-major, t >= 1 and C >= 1: logits or
                probabilities as set by ``from_logits``. The first update fixes (B, C).

        Raises:
            ValueError: If the shape or dtype is wrong, a value is NaN or infinite, or a
                probability is negative; the accumulator is then left unchanged.
        """
        chunk = _as_chunk(outputs, self._name)
        if chunk.ndim < 3 or chunk.shape[-1] < 1:
            raise ValueError(
                f"{self._name} must have shape (t, B, ..., C) with t >= 1 and C >= 1, "
                f"got shape {chunk.shape}"
            )
        if self._moments is not None:
            self._moments.check_row_shape(chunk, self._name)
        if self._from_logits:
            probs, log_probs = _softmax_and_log(chunk, axis=-1)
        else:
            if (chunk < 0).any():
                raise ValueError(f"probabilities must be >= 0, got minimum {chunk.min()}")
            probs, log_probs = chunk, _log_where_positive(chunk)
        entropies = _entropy(probs, log_probs).sum(axis=0)  # (B, ...)
        # Votes are the argmax of the probabilities, not of the logits, so that both input
        # kinds agree even where softmax rounds two close logits to the same probability.
        votes = count_votes(probs.argmax(axis=-1), chunk.shape[-1])

        if self._moments is None or self._entropy_sum is None or self._vote_counts is None:
            self._moments = RunningMoments.of_chunk(probs)
            self._entropy_sum = entropies
            self._vote_counts = votes
        else:
            self._moments.update(probs)
            self._entropy_sum = self._entropy_sum + entropies
            self._vote_counts = self._vote_counts + votes
        self._kept.add(probs)

    def result(self) -> ClassificationStats:
        """Returns the statistics of every sample so far (fresh arrays; updates may continue).

        Raises:
            ValueError: If no samples were added.
        """
        if self._moments is None or self._entropy_sum is None or self._vote_counts is None:
            raise ValueError("no samples accumulated: call update() before result()")
        return classification_result(
            self._moments.count,
            self._moments.mean(),
            self._moments.variance(),
            self._entropy_sum,
            self._vote_counts,
            samples=self._kept.rows_first(),
        )


def classification_result(
    count: int | IntArray,
    mean: FloatArray,
    variance: FloatArray,
    entropy_sum: FloatArray,
    vote_counts: IntArray,
    *,
    samples: FloatArray | None = None,
) -> ClassificationStats:
    """The classification statistics of merged per-sample probabilities.

    Args:
        count: T, or per row (B,) when rows have different T (adaptive sampling).
        mean: (B, ..., C) mean probabilities.
        variance: (B, ..., C) their unbiased variance.
        entropy_sum: (B, ...) the sum over samples of each sample's entropy.
        vote_counts: (B, ..., C) per-sample argmax counts.
        samples: (B, T, ..., C) the kept per-sample probabilities, if any.
    """
    counts = np.asarray(count)
    per_position = counts.reshape(-1, *([1] * (entropy_sum.ndim - 1))) if counts.ndim else counts
    predictive_entropy = _entropy(mean, _log_where_positive(mean))
    expected_entropy: FloatArray = entropy_sum / per_position
    # MI >= 0 by Jensen's inequality; a negative value can only be rounding residue.
    mutual_information = np.maximum(predictive_entropy - expected_entropy, 0.0)
    votes = vote_counts.copy()
    return ClassificationStats(
        num_samples=int(counts.max()),
        mean=mean,
        variance=variance,
        std=np.sqrt(variance),
        predicted_class=mean.argmax(axis=-1).astype(np.int64),
        predictive_entropy=predictive_entropy,
        expected_entropy=expected_entropy,
        mutual_information=mutual_information,
        variation_ratio=1.0 - votes.max(axis=-1) / per_position,
        vote_counts=votes,
        samples=samples,
    )


def count_votes(winners: IntArray, num_classes: int) -> IntArray:
    """Per-sample argmax indices (t, B, ...) -> vote counts (B, ..., C)."""
    positions = winners.shape[1:]
    flat = winners.reshape(winners.shape[0], -1) + num_classes * np.arange(
        int(np.prod(positions, dtype=np.int64))
    )
    size = int(np.prod(positions, dtype=np.int64)) * num_classes
    votes = np.bincount(flat.ravel(), minlength=size).astype(np.int64)
    return votes.reshape(*positions, num_classes)


def regression_stats(samples: npt.ArrayLike) -> RegressionStats:
    """Statistics of all samples at once: see ``RegressionAccumulator``.

    Args:
        samples: (T, B, ...) real array, sample-major, T >= 1.

    Returns:
        Mean, unbiased variance (NaN when T == 1) and std, each of shape (B, ...).

    Raises:
        ValueError: If the shape or dtype is wrong or a value is NaN or infinite.
    """
    accumulator = RegressionAccumulator()
    accumulator.update(samples)
    return accumulator.result()


def classification_stats(outputs: npt.ArrayLike, *, from_logits: bool) -> ClassificationStats:
    """Statistics of all samples at once: see ``ClassificationAccumulator``.

    Args:
        outputs: (T, B, C) logits (``from_logits=True``) or probabilities, sample-major.
        from_logits: Whether ``outputs`` are logits to softmax over C.

    Returns:
        The classification statistics of the T samples of each of the B rows.

    Raises:
        ValueError: If the shape or dtype is wrong, a value is NaN or infinite, or a
            probability is negative.
    """
    accumulator = ClassificationAccumulator(from_logits=from_logits)
    accumulator.update(outputs)
    return accumulator.result()


OutputStats = RegressionStats | ClassificationStats


def slice_rows(stats: OutputStats, start: int, stop: int) -> OutputStats:
    """Rows [start:stop) of every (B, ...) array of a statistics object; num_samples unchanged.

    The arrays are views of the batch's arrays (no copy).
    """
    rows: dict[str, Any] = {
        f.name: value[start:stop]
        for f in dataclasses.fields(stats)
        if isinstance(value := getattr(stats, f.name), np.ndarray)
    }
    if isinstance(stats, RegressionStats) and stats.intervals:
        rows["intervals"] = tuple(
            dataclasses.replace(i, lower=i.lower[start:stop], upper=i.upper[start:stop])
            for i in stats.intervals
        )
    return dataclasses.replace(stats, **rows)


def concat_rows(parts: list[OutputStats]) -> OutputStats:
    """Statistics of consecutive row groups joined into one object (rows along axis 0)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    fields: dict[str, Any] = {
        f.name: np.concatenate([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(first)
        if isinstance(getattr(first, f.name), np.ndarray)
    }
    if isinstance(first, RegressionStats) and first.intervals:
        fields["intervals"] = tuple(
            dataclasses.replace(
                interval,
                lower=np.concatenate(
                    [p.intervals[j].lower for p in parts if isinstance(p, RegressionStats)]
                ),
                upper=np.concatenate(
                    [p.intervals[j].upper for p in parts if isinstance(p, RegressionStats)]
                ),
            )
            for j, interval in enumerate(first.intervals)
        )
    return dataclasses.replace(first, **fields)
