"""Evaluation metrics, pure numpy (plus scikit-learn's AUROC), tested against hand-computed values.

Conventions:
    * Natural logarithms everywhere (NLL and log-likelihoods in nats).
    * ``probabilities`` are (N, C) rows that sum to 1; ``labels`` are (N,) class indices.
    * Regression samples are (N, T): one row per test point, T stochastic passes.
    * Standard errors use the sample standard deviation (ddof=1) divided by sqrt(n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_auc_score

__all__ = [
    "ECE_BINS",
    "NLL_FLOOR",
    "ReliabilityBins",
    "accuracy",
    "auroc",
    "brier_score",
    "entropy",
    "expected_calibration_error",
    "gaussian_mc_log_likelihood",
    "mean_and_standard_error",
    "negative_log_likelihood",
    "reliability_bins",
    "rmse",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Equal-width confidence bins of the expected calibration error and the reliability diagram.
ECE_BINS = 15
#: Probabilities are floored here before the log in the NLL, so one p = 0 cannot make it inf.
NLL_FLOOR = 1e-12


def rmse(prediction: npt.ArrayLike, target: npt.ArrayLike) -> float:
    """Root mean squared error of (N,) predictions against (N,) targets."""
    error = np.asarray(prediction, np.float64) - np.asarray(target, np.float64)
    return float(np.sqrt(np.mean(np.square(error))))


def gaussian_mc_log_likelihood(
    samples: npt.ArrayLike, target: npt.ArrayLike, tau: float
) -> FloatArray:
    """Per-point test log-likelihood of Gal & Ghahramani (2016), eq. (8).

    The predictive density is the mixture of T Gaussians centred on the MC samples, each with
    precision ``tau``::

        ll_n = logsumexp_t(-0.5 tau (y_n - y_nt)^2) - log T - 0.5 log(2 pi) + 0.5 log(tau)

    Args:
        samples: (N, T) stochastic predictions y_nt, in the units of ``target``.
        target: (N,) observed values y_n.
        tau: model precision (1 / noise variance), in the inverse squared units of ``target``.

    Returns:
        (N,) log-likelihoods in nats; the paper reports their mean.

    Raises:
        ValueError: tau <= 0 or mismatched shapes.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    y_nt = np.asarray(samples, np.float64)
    y_n = np.asarray(target, np.float64)
    if y_nt.ndim != 2 or y_n.shape != y_nt.shape[:1]:
        raise ValueError(f"samples must be (N, T) and target (N,), got {y_nt.shape}, {y_n.shape}")
    num_samples = y_nt.shape[1]
    exponent = -0.5 * tau * np.square(y_n[:, None] - y_nt)
    # log-sum-exp around each row's largest term: exp() cannot underflow to log(0) = -inf
    # however far the target lies from every sample.
    largest = exponent.max(axis=1)
    log_sum = largest + np.log(np.exp(exponent - largest[:, None]).sum(axis=1))
    result: FloatArray = (
        log_sum - math.log(num_samples) - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(tau)
    )
    return result


def mean_and_standard_error(values: npt.ArrayLike) -> tuple[float, float]:
    """(mean, standard error = std(ddof=1) / sqrt(n)) of n >= 2 values, e.g. one per split."""
    array = np.asarray(values, np.float64)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"need a 1-D array of at least 2 values, got shape {array.shape}")
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


def _check_classification(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[
    FloatArray, IntArray
]:  # fmt: skip
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim != 2 or y.shape != p.shape[:1]:
        raise ValueError(f"probabilities must be (N, C) and labels (N,), got {p.shape}, {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be in [0, {p.shape[1]}), got {y.min()}..{y.max()}")
    return p, y


def accuracy(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Fraction of rows whose argmax class is the label."""
    p, y = _check_classification(probabilities, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def negative_log_likelihood(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean of -log p(label), with p floored at ``NLL_FLOOR``."""
    p, y = _check_classification(probabilities, labels)
    return float(-np.mean(np.log(np.maximum(p[np.arange(y.size), y], NLL_FLOOR))))


def brier_score(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Multi-class Brier score: mean over rows of sum_c (p_c - onehot_c)^2, in [0, 2]."""
    p, y = _check_classification(probabilities, labels)
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum(np.square(p - onehot), axis=1)))


def entropy(probabilities: npt.ArrayLike) -> FloatArray:
    """Shannon entropy in nats of each (..., C) row, with 0 log 0 = 0."""
    p = np.asarray(probabilities, np.float64)
    logp = np.zeros_like(p)
    np.log(p, out=logp, where=p > 0)
    result: FloatArray = 0.0 - np.sum(p * logp, axis=-1)
    return result


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins over [0, 1] (the last bin includes 1.0).

    Attributes:
        edges: (M + 1,) bin edges.
        count: (M,) rows whose confidence falls in each bin.
        confidence: (M,) mean confidence in each bin (NaN when empty).
        accuracy: (M,) fraction correct in each bin (NaN when empty).
    """

    edges: FloatArray
    count: IntArray
    confidence: FloatArray
    accuracy: FloatArray


def reliability_bins(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike, num_bins: int = ECE_BINS
) -> ReliabilityBins:
    """Bins rows by confidence (max probability): bin m holds (m/M, (m+1)/M], bin 0 also 0."""
    p, y = _check_classification(probabilities, labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # ceil(c * M) - 1 puts c in (m/M, (m+1)/M]; a confidence of exactly 0 goes to bin 0.
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, num_bins) / count
        mean_accuracy = np.bincount(index, correct, num_bins) / count
    return ReliabilityBins(edges, count, mean_confidence, mean_accuracy)


def expected_calibration_error(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike, num_bins: int = ECE_BINS
) -> float:
    """ECE = sum_m (n_m / N) |accuracy_m - confidence_m| over equal-width confidence bins."""
    bins = reliability_bins(probabilities, labels, num_bins)
    used = bins.count > 0
    weights = bins.count[used] / bins.count.sum()
    return float(np.sum(weights * np.abs(bins.accuracy[used] - bins.confidence[used])))


def auroc(negative_scores: npt.ArrayLike, positive_scores: npt.ArrayLike) -> float:
    """Area under the ROC curve for telling positives (e.g. OOD, misclassified) by a score.

    Higher scores should mean "positive". Ties count one half (the Mann-Whitney statistic), so
    a constant score gives 0.5.

    Args:
        negative_scores: (N0,) scores of the negatives (in-distribution, correct).
        positive_scores: (N1,) scores of the positives.

    Raises:
        ValueError: either group is empty.
    """
    negative = np.asarray(negative_scores, np.float64).ravel()
    positive = np.asarray(positive_scores, np.float64).ravel()
    if negative.size == 0 or positive.size == 0:
        raise ValueError(
            f"AUROC needs both groups, got {negative.size} negatives, {positive.size} positives"
        )
    labels = np.concatenate([np.zeros(negative.size), np.ones(positive.size)])
    return float(roc_auc_score(labels, np.concatenate([negative, positive])))
