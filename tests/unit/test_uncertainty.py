"""Unit tests for service.maths.uncertainty against references worked out by hand or with plain numpy.

Every random input is drawn from a seeded generator, so no test here is statistical: none can
fail by chance.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from service.maths.uncertainty import (
    ClassificationAccumulator,
    RegressionAccumulator,
    classification_stats,
    regression_stats,
    softmax,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _split(
    values: npt.NDArray[np.float64], rng: np.random.Generator, max_chunk: int
) -> list[npt.NDArray[np.float64]]:
    """Splits (T, ...) along axis 0 into chunks of random sizes in [1, max_chunk]."""
    chunks, start = [], 0
    while start < len(values):
        size = int(rng.integers(1, max_chunk + 1))
        chunks.append(values[start : start + size])
        start += size
    return chunks


# --- softmax ----------------------------------------------------------------------------------


def test_softmax_of_known_logits() -> None:
    # exp(0) : exp(ln 2) : exp(ln 3) = 1 : 2 : 3, so the probabilities are 1/6, 2/6, 3/6.
    logits = np.array([0.0, LN2, LN3], dtype=np.float32)
    probs = softmax(logits)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, [1 / 6, 2 / 6, 3 / 6], rtol=1e-7)  # float32 logits


def test_softmax_does_not_overflow_for_large_logits() -> None:
    # Shift-invariant: [1000, 1000 + ln 3] -> [1/4, 3/4]; a naive exp(1000) would be inf.
    np.testing.assert_allclose(softmax([1000.0, 1000.0 + LN3]), [0.25, 0.75], rtol=1e-12)


def test_softmax_normalises_along_the_given_axis() -> None:
    # Along axis 0 the columns are [0, ln 3] -> [1/4, 3/4] and [7, 7] -> [1/2, 1/2].
    logits = np.array([[0.0, 7.0], [LN3, 7.0]])
    np.testing.assert_allclose(softmax(logits, axis=0), [[0.25, 0.5], [0.75, 0.5]], rtol=1e-12)


# --- regression -------------------------------------------------------------------------------


def test_regression_stats_of_a_hand_computed_example() -> None:
    # Row 0: 1, 2, 3, 4 -> mean 5/2; squared deviations 9/4 + 1/4 + 1/4 + 9/4 = 5,
    #        unbiased variance 5 / (4 - 1) = 5/3.
    # Row 1: 10 four times -> mean 10, variance 0.
    samples = np.array([[1, 10], [2, 10], [3, 10], [4, 10]], dtype=np.float32)  # (T=4, B=2)
    stats = regression_stats(samples)
    assert stats.num_samples == 4
    assert stats.mean.dtype == stats.variance.dtype == np.float64
    np.testing.assert_allclose(stats.mean, [2.5, 10.0], rtol=1e-15)
    np.testing.assert_allclose(stats.variance, [5 / 3, 0.0], rtol=1e-15, atol=0)
    np.testing.assert_allclose(stats.std, [math.sqrt(5 / 3), 0.0], rtol=1e-15, atol=0)


def test_regression_single_sample_has_nan_variance() -> None:
    stats = regression_stats(np.array([[[1.5, -2.0]]]))  # (T=1, B=1, 2)
    np.testing.assert_array_equal(stats.mean, [[1.5, -2.0]])
    assert np.isnan(stats.variance).all()
    assert np.isnan(stats.std).all()


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_chunked_regression_matches_one_shot_numpy(offset: float) -> None:
    rng = np.random.default_rng(1234)
    samples = offset + rng.normal(scale=0.01, size=(997, 3, 2))  # (T, B, 2), small noise
    accumulator = RegressionAccumulator()
    chunks = _split(samples, rng, max_chunk=40)
    assert len(chunks) > 30
    for chunk in chunks:
        accumulator.update(chunk)
    stats = accumulator.result()
    assert stats.num_samples == 997
    np.testing.assert_allclose(stats.mean, samples.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, np.var(samples, axis=0, ddof=1), rtol=1e-12)


def test_large_offset_regression_is_stable() -> None:
    # Values 1e8 + N(0, 1): sum(x**2) - n * mean**2 would lose every digit of the variance.
    # x - 1e8 is exact in float64 (Sterbenz), so np.var on it is a clean reference.
    rng = np.random.default_rng(7)
    samples = 1e8 + rng.standard_normal((5000, 4))
    accumulator = RegressionAccumulator()
    for chunk in _split(samples, rng, max_chunk=20):
        accumulator.update(chunk)
    stats = accumulator.result()
    centered = samples - 1e8
    np.testing.assert_allclose(stats.variance, np.var(centered, axis=0, ddof=1), rtol=1e-12)
    # The mean itself is only representable to about 1e8 * 2**-52 ~ 1.5e-8.
    np.testing.assert_allclose(stats.mean - 1e8, centered.mean(axis=0), rtol=0, atol=1e-7)


# --- classification ---------------------------------------------------------------------------

# (T=3, B=2, C=2). Row 0: one-hot samples that disagree; row 1: soft samples whose mean ties.
HAND_PROBS = np.array(
    [
        [[1.0, 0.0], [0.50, 0.50]],
        [[1.0, 0.0], [0.25, 0.75]],
        [[0.0, 1.0], [0.75, 0.25]],
    ]
)


def test_classification_stats_of_a_hand_computed_example() -> None:
    stats = classification_stats(HAND_PROBS, from_logits=False)
    assert stats.num_samples == 3
    # Row 0, class 0 takes 1, 1, 0: mean 2/3, deviations 1/3, 1/3, -2/3, squares sum
    #   1/9 + 1/9 + 4/9 = 2/3, unbiased variance (2/3) / 2 = 1/3 (class 1 mirrors it).
    # Row 1, class 0 takes 1/2, 1/4, 3/4: mean 1/2, squares sum 0 + 1/16 + 1/16 = 1/8,
    #   unbiased variance (1/8) / 2 = 1/16, std 1/4.
    np.testing.assert_allclose(stats.mean, [[2 / 3, 1 / 3], [0.5, 0.5]], rtol=1e-15)
    np.testing.assert_allclose(stats.variance, [[1 / 3, 1 / 3], [1 / 16, 1 / 16]], rtol=1e-14)
    np.testing.assert_allclose(stats.std, [[3**-0.5, 3**-0.5], [0.25, 0.25]], rtol=1e-14)
    # Row 1's mean is an exact tie: the first index wins.
    np.testing.assert_array_equal(stats.predicted_class, [0, 0])
    assert stats.predicted_class.dtype == np.int64
    # Row 0: H(2/3, 1/3) = -(2/3) ln(2/3) - (1/3) ln(1/3) = ln 3 - (2/3) ln 2.
    # Row 1: H(1/2, 1/2) = ln 2.
    predictive = [LN3 - 2 / 3 * LN2, LN2]
    # Row 0: every sample is one-hot, so each sample entropy is 0 (0 log 0 = 0).
    # Row 1: H(1/2, 1/2) = ln 2 and H(1/4, 3/4) = (1/4) ln 4 + (3/4) ln(4/3) = 2 ln 2 - (3/4) ln 3
    #   twice, so the mean is (5 ln 2 - (3/2) ln 3) / 3 = (5/3) ln 2 - (1/2) ln 3.
    expected = [0.0, 5 / 3 * LN2 - 0.5 * LN3]
    np.testing.assert_allclose(stats.predictive_entropy, predictive, rtol=1e-14)
    np.testing.assert_allclose(stats.expected_entropy, expected, rtol=1e-14, atol=0)
    # MI row 0: ln 3 - (2/3) ln 2 ~ 0.6365; row 1: (1/2) ln 3 - (2/3) ln 2 ~ 0.0872.
    mutual_information = [LN3 - 2 / 3 * LN2, 0.5 * LN3 - 2 / 3 * LN2]
    np.testing.assert_allclose(stats.mutual_information, mutual_information, rtol=1e-13)
    # Votes row 0: class 0, 0, 1. Row 1: sample 0 ties (first index: class 0), then 1, 0.
    np.testing.assert_array_equal(stats.vote_counts, [[2, 1], [2, 1]])
    assert stats.vote_counts.dtype == np.int64
    # Modal class has 2 of 3 votes in both rows: 1 - 2/3 = 1/3.
    np.testing.assert_allclose(stats.variation_ratio, [1 / 3, 1 / 3], rtol=1e-15)


def test_single_sample_classification() -> None:
    stats = classification_stats(HAND_PROBS[1:2], from_logits=False)  # (T=1, B=2, C=2)
    assert stats.num_samples == 1
    np.testing.assert_array_equal(stats.mean, HAND_PROBS[1])
    assert np.isnan(stats.variance).all()
    assert np.isnan(stats.std).all()
    # One sample: the expected entropy is that sample's entropy, so MI is exactly 0.
    np.testing.assert_array_equal(stats.mutual_information, [0.0, 0.0])
    np.testing.assert_array_equal(stats.variation_ratio, [0.0, 0.0])
    np.testing.assert_allclose(stats.predictive_entropy, [0.0, 2 * LN2 - 0.75 * LN3], rtol=1e-14)


def test_identical_one_hot_samples_have_zero_entropy_and_mi() -> None:
    outputs = np.tile(np.array([[0.0, 1.0, 0.0]]), (6, 1, 1))  # (T=6, B=1, C=3)
    stats = classification_stats(outputs, from_logits=False)
    for values in (stats.predictive_entropy, stats.expected_entropy, stats.mutual_information):
        assert not np.isnan(values).any()
        np.testing.assert_array_equal(values, [0.0])
    np.testing.assert_array_equal(stats.variance, [[0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(stats.vote_counts, [[0, 6, 0]])
    np.testing.assert_array_equal(stats.variation_ratio, [0.0])


def test_disagreeing_one_hot_samples_have_mi_equal_to_vote_entropy() -> None:
    # Votes 3 : 0 : 2 of T=5. Every sample entropy is 0, so MI = H(3/5, 0, 2/5)
    # = -(3/5) ln(3/5) - (2/5) ln(2/5) = ln 5 - (3/5) ln 3 - (2/5) ln 2 ~ 0.6730.
    classes = [0, 2, 0, 2, 0]
    outputs = np.eye(3)[classes][:, None, :]  # (T=5, B=1, C=3)
    stats = classification_stats(outputs, from_logits=False)
    vote_entropy = math.log(5) - 0.6 * LN3 - 0.4 * LN2
    np.testing.assert_allclose(stats.mutual_information, [vote_entropy], rtol=1e-14)
    np.testing.assert_allclose(stats.predictive_entropy, [vote_entropy], rtol=1e-14)
    np.testing.assert_array_equal(stats.expected_entropy, [0.0])
    np.testing.assert_array_equal(stats.vote_counts, [[3, 0, 2]])
    np.testing.assert_allclose(stats.variation_ratio, [0.4], rtol=1e-15)


def test_mutual_information_of_identical_soft_samples_is_not_negative() -> None:
    # Identical samples carry no epistemic uncertainty: MI is 0 in exact arithmetic, but
    # H[mean] - mean(H[p_t]) rounds to about -2e-16 for the first row; MI must never be < 0.
    rows = np.array([[0.1, 0.2, 0.7], [0.25, 0.25, 0.5], [0.6, 0.3, 0.1]])
    stats = classification_stats(np.tile(rows, (13, 1, 1)), from_logits=False)  # (13, 3, 3)
    assert (stats.mutual_information >= 0.0).all()
    np.testing.assert_allclose(stats.mutual_information, 0.0, rtol=0, atol=1e-15)


def test_votes_follow_the_probabilities_when_softmax_rounds_logits_to_a_tie() -> None:
    # Logits 0 and 1e-17 differ, but both probabilities round to exactly 1/2: the vote goes to
    # the first index, as it would for the probabilities themselves.
    stats = classification_stats(np.array([[[0.0, 1e-17]]]), from_logits=True)
    np.testing.assert_array_equal(stats.mean, [[0.5, 0.5]])
    np.testing.assert_array_equal(stats.vote_counts, [[1, 0]])


def test_from_logits_matches_softmaxed_probabilities() -> None:
    logits = np.random.default_rng(3).normal(scale=3.0, size=(20, 4, 5)).astype(np.float32)
    from_logits = classification_stats(logits, from_logits=True)
    # The reference softmax is written out here rather than calling the module's softmax.
    exp = np.exp(logits.astype(np.float64))
    from_probs = classification_stats(exp / exp.sum(axis=-1, keepdims=True), from_logits=False)
    for name in ("mean", "variance", "predictive_entropy", "expected_entropy"):
        actual, desired = getattr(from_logits, name), getattr(from_probs, name)
        np.testing.assert_allclose(actual, desired, rtol=1e-12, atol=1e-15, err_msg=name)
    np.testing.assert_allclose(
        from_logits.mutual_information, from_probs.mutual_information, rtol=1e-9, atol=1e-14
    )
    np.testing.assert_array_equal(from_logits.vote_counts, from_probs.vote_counts)
    np.testing.assert_array_equal(from_logits.predicted_class, from_probs.predicted_class)


def test_chunked_classification_matches_one_shot() -> None:
    rng = np.random.default_rng(11)
    exp = np.exp(rng.normal(scale=2.0, size=(1000, 3, 4)))
    probs = exp / exp.sum(axis=-1, keepdims=True)  # (T, B, C)
    accumulator = ClassificationAccumulator(from_logits=False)
    for chunk in _split(probs, rng, max_chunk=50):
        accumulator.update(chunk.astype(np.float32))
    chunked = accumulator.result()
    one_shot = classification_stats(probs.astype(np.float32), from_logits=False)
    as_float64 = probs.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(chunked.mean, as_float64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(chunked.variance, np.var(as_float64, axis=0, ddof=1), rtol=1e-12)
    for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
        actual, desired = getattr(chunked, name), getattr(one_shot, name)
        np.testing.assert_allclose(actual, desired, rtol=1e-12, err_msg=name)
    votes = np.stack([np.bincount(row, minlength=4) for row in probs.argmax(-1).T])
    np.testing.assert_array_equal(chunked.vote_counts, votes)
    np.testing.assert_allclose(chunked.variation_ratio, 1 - votes.max(-1) / 1000, rtol=1e-15)


def test_results_are_snapshots() -> None:
    accumulator = RegressionAccumulator()
    accumulator.update([[1.0], [3.0]])
    first = accumulator.result()
    accumulator.update([[8.0]])  # (1, 3, 8): mean 4, variance (9 + 1 + 16) / 2 = 13
    second = accumulator.result()
    np.testing.assert_array_equal(first.mean, [2.0])
    np.testing.assert_array_equal(first.variance, [2.0])
    np.testing.assert_array_equal(second.mean, [4.0])
    np.testing.assert_allclose(second.variance, [13.0], rtol=1e-15)
    assert accumulator.num_samples == 3


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.zeros((0, 3)), r"shape \(t, B, \.\.\.\) with t >= 1, got shape \(0, 3\)"),
        (np.zeros(4), r"got shape \(4,\)"),
        (np.zeros((2, 3), dtype=np.complex128), "dtype complex128"),
        (np.array([[1.0, np.nan], [np.inf, 2.0]]), "got 2 NaN or infinite values"),
    ],
)
def test_regression_rejects_bad_input(values: npt.NDArray[np.generic], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        regression_stats(values)


def test_regression_rejects_a_row_shape_change_and_keeps_its_state() -> None:
    accumulator = RegressionAccumulator()
    accumulator.update(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"shape \(t, 3, 4\) to match .* got shape \(5, 3, 5\)"):
        accumulator.update(np.zeros((5, 3, 5)))
    assert accumulator.num_samples == 2


def test_result_without_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        RegressionAccumulator().result()
    with pytest.raises(ValueError, match="no samples"):
        ClassificationAccumulator(from_logits=True).result()


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.zeros((2, 3)), r"\(t, B, ..., C\) with t >= 1 and C >= 1, got shape \(2, 3\)"),
        (np.zeros((2, 3, 0)), r"got shape \(2, 3, 0\)"),
        (np.zeros((0, 3, 2)), r"got shape \(0, 3, 2\)"),
        (np.array([[[1.5, -0.5]]]), r"probabilities must be >= 0, got minimum -0\.5"),
    ],
)
def test_classification_rejects_bad_input(values: npt.NDArray[np.float64], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_stats(values, from_logits=False)


def test_classification_rejects_a_class_count_change_and_keeps_its_state() -> None:
    accumulator = ClassificationAccumulator(from_logits=True)
    accumulator.update(np.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match=r"logits must have shape \(t, 2, 3\) .* \(1, 2, 4\)"):
        accumulator.update(np.zeros((1, 2, 4)))
    assert accumulator.num_samples == 4
    np.testing.assert_array_equal(accumulator.result().vote_counts, [[4, 0, 0], [4, 0, 0]])


def test_kept_samples_are_the_samples_rows_first() -> None:
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((t, 2, 3)) for t in (4, 1, 5)]
    acc = RegressionAccumulator(keep_samples=True)
    for chunk in chunks:
        acc.update(chunk)
    stats = acc.result()
    everything = np.concatenate(chunks)  # (T, B, 3)
    assert stats.samples is not None
    assert stats.samples.shape == (2, 10, 3)
    np.testing.assert_array_equal(stats.samples[1, 7], everything[7, 1])
    np.testing.assert_allclose(stats.mean, stats.samples.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, stats.samples.var(axis=1, ddof=1), rtol=1e-12)
    plain = RegressionAccumulator()
    plain.update(chunks[0])
    assert plain.result().samples is None


def test_kept_classification_samples_are_probabilities() -> None:
    logits = np.random.default_rng(4).standard_normal((6, 3, 4))
    acc = ClassificationAccumulator(from_logits=True, keep_samples=True)
    acc.update(logits[:2])
    acc.update(logits[2:])
    stats = acc.result()
    assert stats.samples is not None
    assert stats.samples.shape == (3, 6, 4)
    np.testing.assert_allclose(stats.samples.sum(axis=-1), 1.0, rtol=1e-12)
    expected = np.exp(logits[5, 2]) / np.exp(logits[5, 2]).sum()
    np.testing.assert_allclose(stats.samples[2, 5], expected, rtol=1e-12)
