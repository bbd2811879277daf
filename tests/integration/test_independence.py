"""Independent samples through the server (issue "Independent samples"): consecutive requests,
concurrent requests merged into one batch, and the rounds of adaptive sampling.

The model is y = dropout(x, 0.5), exported from PyTorch like any other: on x = ones(256) every
sample element is a fair coin (2.0 kept, 0.0 dropped). tests/statistics.py states the checks
and their false-failure probabilities (1e-6 each, Hoeffding + Bonferroni); the adaptive test
uses a normal approximation (stated there).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from export import export_model
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningServer, start_server, stop_server
from tests.statistics import coin_independence, request_correlations

WIDTH = 256


@pytest.fixture(scope="module")
def dropout_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("independence")
    export_model(nn.Sequential(nn.Dropout(0.5)), torch.ones(4, WIDTH), repository=repository,
                 name="coins", task="regression", input_names=["x"], output_names=["y"],
                 verify_samples=1000)  # fmt: skip
    # A copy that merges concurrent requests: it holds the oldest waiting one up to 0.3 s.
    batched = repository / "coins_batched"
    shutil.copytree(repository / "coins", batched)
    config = batched / "1" / "config.json"
    text = config.read_text().replace('"name": "coins"', '"name": "coins_batched"')
    assert '"task"' in text
    config.write_text(
        text.replace('"task"', '"dynamic_batching": {"max_queue_delay_us": 300000}, "task"', 1)
    )
    server = start_server(repository, tmp_path_factory.mktemp("independence_server"))
    yield server
    assert stop_server(server) == 0, server.log()


def _request(num_samples: int, model: str = "coins", **options: object) -> pb.PredictRequest:
    x = np.ones((1, WIDTH), np.float32)
    return pb.PredictRequest(
        model=model,
        inputs=[pb.NamedTensor(name="x", tensor=pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32, shape=[1, WIDTH], data=x.tobytes()))],
        num_samples=num_samples, **options,  # type: ignore[arg-type]
    )  # fmt: skip


def _kept(response: pb.PredictResponse) -> np.ndarray:
    samples = response.outputs[0].samples
    return np.frombuffer(samples.data, np.float64).reshape(list(samples.shape)) != 0  # (1, T, W)


def test_consecutive_requests_are_independent(dropout_server: RunningServer) -> None:
    with grpc.insecure_channel(dropout_server.target) as channel:
        stub = pb_grpc.MCDropoutServiceStub(channel)
        runs = [_kept(stub.Predict(_request(8, return_samples=True))).reshape(-1)
                for _ in range(400)]  # fmt: skip
    report = coin_independence(np.stack(runs))
    assert report.independent, str(report)


def test_concurrent_requests_merged_into_one_batch_are_independent(
    dropout_server: RunningServer,
) -> None:
    async def burst() -> list[pb.PredictResponse]:
        async with grpc.aio.insecure_channel(dropout_server.target) as channel:
            stub = pb_grpc.MCDropoutServiceStub(channel)
            request = _request(32, model="coins_batched", return_samples=True)
            calls = [stub.Predict(request) for _ in range(48)]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(burst())
    kept = np.stack([_kept(r).reshape(-1) for r in responses])  # (48, 32 * WIDTH)
    # They did share runs (the metrics count requests per run).
    metrics = _metrics(dropout_server)
    assert metrics["mcd_batch_requests_sum"] > metrics["mcd_batch_requests_count"]
    largest, bound = request_correlations(kept)
    assert largest < bound, f"requests correlate: {largest:.3f} (bound {bound:.3f})"
    assert coin_independence(kept.reshape(48 * 32, WIDTH)).independent


def test_adaptive_rounds_are_independent(dropout_server: RunningServer) -> None:
    """A target standard error of 0.1 stops every row after rounds of 32, 32 and 64 samples
    (T = 128). Each element's mean over 128 independent coins (0 or 2) has variance 1/128;
    rounds that repeated each other's masks would raise it (by half when the second round
    repeats the first). Over 30 requests x 256 elements, V = 128 * mean((m - 1)^2) has mean 1
    and standard deviation sqrt(2 / 7680) = 0.016 (normal approximation); the bound 1 +- 0.09
    is 5.6 standard deviations (false-failure probability ~2e-8). This catches rounds that
    repeat each other; the per-position check of the rounds' masks is in-process
    (tests/unit/test_independence.py runs consecutive engine runs, which rounds are)."""
    with grpc.insecure_channel(dropout_server.target) as channel:
        stub = pb_grpc.MCDropoutServiceStub(channel)
        means = []
        for _ in range(30):
            response = stub.Predict(_request(0, target_standard_error=0.1))
            per_row = np.frombuffer(response.num_samples_per_row.data, np.int64)
            assert per_row.tolist() == [128]
            mean = response.outputs[0].mean
            means.append(np.frombuffer(mean.data, np.float64))
    v = 128 * np.mean((np.stack(means) - 1.0) ** 2)
    assert abs(v - 1.0) < 0.09, v


def _metrics(server: RunningServer) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("mcd_batch_requests_sum", "mcd_batch_requests_count")):
            name = line.split("{")[0].split(" ")[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values
