"""Parity helpers: answers of the server (or an engine) against PyTorch MC dropout.

Every comparison is a per-element two-sample z-test (mean) and a log-variance-ratio z-test
(variance, standard error from the kurtosis) with a Bonferroni threshold over the K elements
compared, each test at false-failure probability ALPHA = 1e-4 (export/stats.py).
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


def assert_matches_torch(
    answer: dict[str, Any], reference: NDArray[np.float64], t: int, alpha: float = ALPHA
) -> tuple[ZTestResult, ZTestResult]:
    """Both tests must pass, each at false-failure probability ``alpha``; returns their results
    (max |z|, thresholds, variance ratios)."""
    torch_side = Moments.from_samples(reference.reshape(reference.shape[0], -1))
    ours = server_moments(answer["mean"], answer["variance"], t, torch_side)
    mean = mean_z_test(ours, torch_side, alpha)
    assert mean.passed, mean
    variance = variance_ratio_test(ours, torch_side, alpha)
    assert variance.passed, variance
    return mean, variance
