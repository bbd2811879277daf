"""Adaptive sampling meets its target on a model whose output variance is known exactly.

y = w . (m * x) / (1 - p), m_i ~ Bernoulli(1 - p): E[y] = w . x and
Var[y] = p / (1 - p) * sum_i (w_i x_i)^2. Rows with a larger variance need more samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export import export_model
from mcdropout_client import Client, InvalidArgumentError
from tests.integration.conftest import RunningServer, start_server, stop_server

P = 0.3
W = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)


@pytest.fixture(scope="module")
def known_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model = nn.Sequential(nn.Dropout(P), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(W[None, :]))
    repository = tmp_path_factory.mktemp("known_repository")
    export_model(model, torch.randn(8, 4), repository=repository, name="known", task="regression",
                 input_names=["x"], output_names=["y"], max_num_samples=50_000, verify_samples=1000)  # fmt: skip
    running = start_server(repository, Path(tmp_path_factory.mktemp("known_server")))
    yield running
    assert stop_server(running) == 0


def test_every_row_meets_the_target(known_server: RunningServer) -> None:
    x = np.array([[0.1, 0.1, 0.1, 0.1], [1.0, 0.5, 1.0, 0.2], [2.0, 1.0, 0.0, 1.0]], np.float32)
    sigma = np.sqrt(P / (1 - P) * ((W * x) ** 2).sum(axis=1))  # exact per-row std
    target = 0.02
    with Client(known_server.target, timeout=120) as client:
        answer = client.predict("known", x, target_standard_error=target)
    per_row = answer.num_samples_per_row
    assert per_row is not None
    mean, variance = answer.mean[:, 0], answer.variance[:, 0]
    assert answer.num_samples == per_row.max()
    # The reported precision meets the target on every row...
    assert (np.sqrt(variance / per_row) <= target).all()
    # ...and so does the true one (known sigma), within a 3x slack for the variance estimate's
    # own error at the stopping time.
    assert (sigma / np.sqrt(per_row) <= 3 * target).all()
    # Rows with a larger variance needed more samples.
    assert per_row[0] < per_row[1] < per_row[2]
    # The means are right within 5 standard errors (false-failure probability < 2e-6).
    assert (np.abs(mean - x @ W) <= 5 * sigma / np.sqrt(per_row)).all()


def test_cap_and_bad_targets(known_server: RunningServer) -> None:
    x = np.array([[2.0, 1.0, 0.0, 1.0]], np.float32)
    with Client(known_server.target, timeout=120) as client:
        # unreachable: stops at the cap
        answer = client.predict("known", x, num_samples=100, target_standard_error=1e-9)
        assert answer.num_samples_per_row is not None
        assert answer.num_samples_per_row.tolist() == [100]
        assert answer.num_samples == 100
        with pytest.raises(ValueError, match="positive"):  # refused before sending
            client.predict("known", x, target_standard_error=-1.0)
        for extra in ({"return_samples": True}, {"interval_levels": [0.9]}, {"seed": 1}):
            with pytest.raises(InvalidArgumentError, match="cannot be combined"):
                client.predict("known", x, target_standard_error=0.1, **extra)
