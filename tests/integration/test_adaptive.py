"""Adaptive sampling meets its target on a model whose output variance is known exactly.

y = w . (m * x) / (1 - p), m_i ~ Bernoulli(1 - p): E[y] = w . x and
Var[y] = p / (1 - p) * sum_i (w_i x_i)^2. Rows with a larger variance need more samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from export import export_model
from service.protocol.codec import decode_tensor
from tests.integration.client import Client
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
    with Client(known_server.target) as client:
        request = client.request("known", {"x": x})
        request.target_standard_error = target
        answer = client.predict_raw(request)
    per_row = decode_tensor(answer.num_samples_per_row, "n")
    y = answer.outputs[0]
    mean, variance = decode_tensor(y.mean, "m")[:, 0], decode_tensor(y.variance, "v")[:, 0]
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
    with Client(known_server.target) as client:
        request = client.request("known", {"x": x}, num_samples=100)
        request.target_standard_error = 1e-9  # unreachable: stops at the cap
        answer = client.predict_raw(request)
        assert decode_tensor(answer.num_samples_per_row, "n").tolist() == [100]
        for value, extra in ((-1.0, {}), (0.1, {"return_samples": True})):
            request = client.request("known", {"x": x})
            request.target_standard_error = value
            for key, flag in extra.items():
                setattr(request, key, flag)
            with pytest.raises(grpc.RpcError) as info:
                client.predict_raw(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
