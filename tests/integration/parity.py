"""Parity helpers: answers of the server (or an engine) against PyTorch MC dropout.

Every comparison is a per-element two-sample z-test (mean) and a log-variance-ratio z-test
(variance, standard error from the kurtosis) with a Bonferroni threshold over the K elements
compared, the two tests at ALPHA / 2 each: false-failure probability ALPHA = 1e-4 per
comparison (export/stats.py).

The variance test's standard error needs each side's fourth moment. An answer that carries its
samples gives its own; one without them borrows the reference's kurtosis, which is the same
distribution under the null hypothesis but only when the estimate is good: the digits CNN's
softmax probabilities of rare classes (kurtosis up to ~180, few rare events in 4,000 samples)
made the borrowed standard error too small, and the test failed 1.3-1.5% of the time (null
simulations of 1,500 and 3,000 repeats) instead of 1e-4. So heavy-tailed references
(kurtosis > MAX_BORROWED_KURTOSIS) need the answer's samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from export.mc_mode import mc_dropout_copy
from export.stats import Moments, ZTestResult, mean_z_test, variance_ratio_test

ALPHA = 1e-4
N_TORCH = 4000
#: Largest reference kurtosis whose estimate the answer may borrow (the housing MLP's and tiny
#: models' outputs, <= 4.7, ran 0 false failures in 1,500 null repeats).
MAX_BORROWED_KURTOSIS = 10.0


def torch_mc_samples(
    model: torch.nn.Module, x: NDArray[Any], n: int, softmax: bool
) -> NDArray[np.float64]:
    """(n, B, ...) outputs of PyTorch MC dropout (eval, dropout modules in train mode)."""
    mc = mc_dropout_copy(model)
    rows = x.shape[0]
    with torch.no_grad():
        tiled = torch.from_numpy(x).repeat(n, *([1] * (x.ndim - 1)))
        out = mc(tiled).double()
        if softmax:
            out = torch.softmax(out, dim=-1)
    return out.reshape(n, rows, *out.shape[1:]).numpy()


def server_moments(
    mean: NDArray[Any], variance: NDArray[Any], t: int, reference: Moments
) -> Moments:
    """Moments of the server's answer. The server returns mean and unbiased variance only; the
    fourth moment (for the variance test's standard error) is taken from the reference's
    kurtosis, which is the same distribution under the null hypothesis."""
    m2 = variance.reshape(-1) * (t - 1) / t
    return Moments(n=t, mean=mean.reshape(-1), m2=m2, m4=reference.kurtosis * m2**2)


def measured(output: Any) -> dict[str, Any]:
    """What a comparison reads of an engine's OutputStats or a client's OutputPrediction: mean,
    variance and, when the call kept them, the samples."""
    return {"mean": output.mean, "variance": output.variance, "samples": output.samples}


def assert_matches_torch(
    answer: dict[str, Any],
    reference: NDArray[np.float64],
    t: int,
    alpha: float = ALPHA,
    *,
    borrow_kurtosis: bool = False,
) -> tuple[ZTestResult, ZTestResult]:
    """Both tests must pass, together at false-failure probability ``alpha``; returns their
    results (max |z|, thresholds, variance ratios).

    Args:
        answer: ``mean`` and ``variance`` (B, ...), and ``samples`` (B, t, ...) when the
            reference is heavy-tailed.
        reference: (n, B, ...) PyTorch MC dropout samples.
        t: the answer's samples per row.
        alpha: the false-failure probability of the comparison.
        borrow_kurtosis: borrow the reference's kurtosis even when it is heavy-tailed (a
            reference of at least the answer's size, whose estimate is better).
    """
    torch_side = Moments.from_samples(reference.reshape(reference.shape[0], -1))
    samples = answer.get("samples")
    if samples is not None:
        by_sample = np.moveaxis(np.asarray(samples, np.float64), 1, 0)
        assert by_sample.shape[0] == t
        ours = Moments.from_samples(by_sample.reshape(t, -1))
        np.testing.assert_allclose(ours.mean, np.asarray(answer["mean"]).reshape(-1),
                                   rtol=1e-5, atol=1e-7)  # fmt: skip
    else:
        kurtosis = float(np.max(torch_side.kurtosis[~torch_side.deterministic()], initial=3.0))
        assert borrow_kurtosis or kurtosis <= MAX_BORROWED_KURTOSIS, (
            f"reference kurtosis {kurtosis:.1f}: pass the answer's samples (module docstring)"
        )
        ours = server_moments(answer["mean"], answer["variance"], t, torch_side)
    mean = mean_z_test(ours, torch_side, alpha / 2)
    assert mean.passed, mean
    variance = variance_ratio_test(ours, torch_side, alpha / 2)
    assert variance.passed, variance
    return mean, variance
