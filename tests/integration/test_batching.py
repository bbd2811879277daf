"""Dynamic batching through the real server: concurrent Predict calls that share engine runs
still get the answers of their own rows.

A second server serves a copy of tiny_reg whose config.json holds a request back for up to
250 ms (``dynamic_batching.max_queue_delay_us``), with one compute worker, so concurrent calls
do share runs; the test then reads the batch metrics to make sure they did. Nothing here
asserts on timing.

Statistical test: each request's means against a sequential large-T answer for the same rows,
a per-element z-test with a Bonferroni threshold over the request's elements at
ALPHA / NUM_REQUESTS each (export/stats.py): the test fails by chance with probability below
ALPHA = 1e-4.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from export.stats import Moments, mean_z_test
from mcdropout_client import Client, ClientError, InvalidArgumentError, OutputPrediction
from tests.integration.conftest import (
    ExportedModels,
    RunningServer,
    start_server,
    stop_server,
)
from tests.integration.test_operations import sample_value, scrape

ALPHA = 1e-4
NUM_REQUESTS = 8
T = 2000
T_REFERENCE = 20_000


@pytest.fixture(scope="module")
def batching_server(
    test_models: ExportedModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A server on a copy of tiny_reg (newest version) with a long batching delay."""
    repository = tmp_path_factory.mktemp("batching_repository")
    target = repository / "tiny_reg" / "2"
    shutil.copytree(test_models.repository / "tiny_reg" / "2", target)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["dynamic_batching"] = {"max_batch_rows": 64, "max_queue_delay_us": 250_000}
    config_path.write_text(json.dumps(config))
    running = start_server(repository, Path(tmp_path_factory.mktemp("batching_server")),
                           "--compute-workers", "1")  # fmt: skip
    yield running
    code = stop_server(running)
    assert code == 0, f"server exited with {code} on SIGTERM:\n{running.log()}"


def request_rows(index: int) -> NDArray[np.float32]:
    """1 to 3 distinct rows per request, so a row given to the wrong caller would show."""
    rng = np.random.default_rng(100 + index)
    return rng.standard_normal((1 + index % 3, 5)).astype(np.float32)


def moments(answer: dict[str, Any], t: int) -> Moments:
    """Moments of a server answer (the mean test needs n, mean and variance only)."""
    m2 = answer["variance"].reshape(-1) * (t - 1) / t
    return Moments(n=t, mean=answer["mean"].reshape(-1), m2=m2, m4=3 * m2**2)


def shapes(out: OutputPrediction) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in vars(out).items() if isinstance(v, np.ndarray)}


def test_concurrent_requests_share_runs_and_get_their_own_rows(
    batching_server: RunningServer,
) -> None:
    inputs = [request_rows(i) for i in range(NUM_REQUESTS)]
    with Client(batching_server.target, timeout=60) as client:
        client.model_metadata("tiny_reg")  # kept: the concurrent calls go straight to Predict
        before = scrape(batching_server)
        with ThreadPoolExecutor(max_workers=NUM_REQUESTS) as pool:
            answers = list(
                pool.map(lambda x: client.predict("tiny_reg", x, num_samples=T).output, inputs)
            )
        after = scrape(batching_server)
        sequential = client.predict("tiny_reg", inputs[0], num_samples=T).output
        all_rows = np.concatenate(inputs)
        reference = client.predict("tiny_reg", all_rows, num_samples=T_REFERENCE).output

    assert shapes(answers[0]) == shapes(sequential)
    start = 0
    for x, answer in zip(inputs, answers, strict=True):
        stop = start + len(x)
        assert answer.mean.shape == (len(x), 2)
        assert answer.variance.shape == (len(x), 2)
        expected = {"mean": reference.mean[start:stop], "variance": reference.variance[start:stop]}
        ours = {"mean": answer.mean, "variance": answer.variance}
        result = mean_z_test(moments(ours, T), moments(expected, T_REFERENCE), ALPHA / NUM_REQUESTS)
        assert result.passed, result
        start = stop

    def delta(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    runs = delta("mcd_batch_requests_count", model="tiny_reg")
    single_request_runs = delta("mcd_batch_requests_bucket", model="tiny_reg", le="1.0")
    assert runs - single_request_runs >= 1, "no run merged two or more requests"
    assert delta("mcd_batch_requests_sum", model="tiny_reg") == NUM_REQUESTS
    assert delta("mcd_batch_rows_sum", model="tiny_reg") == len(all_rows)
    assert delta("mcd_queue_duration_seconds_count", model="tiny_reg") == NUM_REQUESTS
    assert "\nmcd_queue_depth 0.0\n" in after  # every admitted request finished


def test_a_request_that_overflows_the_model_fails_alone_in_its_shared_run(
    batching_server: RunningServer,
) -> None:
    """The poison batch: 9 concurrent requests share runs; row 1 of one of them holds float32's
    largest value, which the first Dropout's 1/(1-p) scaling takes past infinity. That request
    gets INVALID_ARGUMENT naming its row; the 8 others get finite answers of their own rows."""
    poisoned_index = 4
    inputs = [request_rows(i) for i in range(9)]
    inputs[poisoned_index] = request_rows(1)  # two rows
    inputs[poisoned_index][1] = np.finfo(np.float32).max

    def call(x: NDArray[np.float32]) -> OutputPrediction | ClientError:
        try:
            return client.predict("tiny_reg", x, num_samples=50).output
        except ClientError as error:
            return error

    with Client(batching_server.target, timeout=60) as client:
        client.model_metadata("tiny_reg")
        before = scrape(batching_server)
        with ThreadPoolExecutor(max_workers=len(inputs)) as pool:
            answers = list(pool.map(call, inputs))
        after = scrape(batching_server)

    poisoned = answers.pop(poisoned_index)
    assert isinstance(poisoned, InvalidArgumentError), poisoned
    assert "non-finite outputs for row 1 " in str(poisoned), poisoned
    for answer in answers:
        assert isinstance(answer, OutputPrediction), answer
        assert np.isfinite(answer.mean).all()
        assert np.isfinite(answer.variance).all()
    runs = sample_value(after, "mcd_batch_requests_count", model="tiny_reg") - sample_value(
        before, "mcd_batch_requests_count", model="tiny_reg"
    )
    assert runs < len(inputs), "no run merged two or more requests"
