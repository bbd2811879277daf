"""Adaptive sampling's per-row merging against one-shot statistics of the same samples."""

from __future__ import annotations

import numpy as np
import pytest

from service.maths.adaptive import FIRST_ROUND_SAMPLES, RowMerger, next_round
from service.maths.uncertainty import classification_stats, regression_stats


@pytest.mark.parametrize(
    ("done", "cap", "expected"),
    [(0, 10_000, FIRST_ROUND_SAMPLES), (32, 10_000, 32), (64, 10_000, 64), (96, 100, 4),
     (100, 100, 0), (0, 5, 5), (0, 1, 1)],
)  # fmt: skip
def test_rounds_double_within_the_cap(done: int, cap: int, expected: int) -> None:
    assert next_round(done, cap) == expected


def test_regression_rounds_on_row_subsets_equal_one_shot_statistics() -> None:
    rng = np.random.default_rng(0)
    first = rng.normal(5.0, 2.0, (32, 3, 2))  # every row
    second = rng.normal(5.0, 2.0, (32, 2, 2))  # rows 0 and 2 only
    merger = RowMerger(3)
    merger.add(np.arange(3), regression_stats(first))
    merger.add(np.array([0, 2]), regression_stats(second))
    result = merger.result(regression_stats(first))
    assert merger.counts.tolist() == [64, 32, 64]
    assert result.num_samples == 64
    for row, samples in ((0, np.concatenate([first[:, 0], second[:, 0]])), (1, first[:, 1]),
                         (2, np.concatenate([first[:, 2], second[:, 1]]))):  # fmt: skip
        np.testing.assert_allclose(result.mean[row], samples.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(result.variance[row], samples.var(axis=0, ddof=1), rtol=1e-12)
    se = merger.standard_error()
    np.testing.assert_allclose(
        se[1], np.sqrt(first[:, 1].var(axis=0, ddof=1) / 32).max(), rtol=1e-12
    )


def test_classification_rounds_equal_one_shot_statistics() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(32, 2, 4)), rng.normal(size=(16, 2, 4))
    merger = RowMerger(2)
    merger.add(np.arange(2), classification_stats(a, from_logits=True))
    merger.add(np.arange(2), classification_stats(b, from_logits=True))
    merged = merger.result(classification_stats(a, from_logits=True))
    whole = classification_stats(np.concatenate([a, b]), from_logits=True)
    for name in ("mean", "variance", "predictive_entropy", "expected_entropy",
                 "mutual_information", "variation_ratio"):  # fmt: skip
        np.testing.assert_allclose(
            getattr(merged, name), getattr(whole, name), rtol=1e-10, err_msg=name
        )
    np.testing.assert_array_equal(merged.vote_counts, whole.vote_counts)
    np.testing.assert_array_equal(merged.predicted_class, whole.predicted_class)


def test_rows_without_two_samples_have_infinite_error() -> None:
    merger = RowMerger(2)
    merger.add(np.arange(2), regression_stats(np.ones((1, 2, 1))))
    assert np.isinf(merger.standard_error()).all()
