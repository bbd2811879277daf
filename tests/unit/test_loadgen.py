"""The benchmark's load generator, driven by fake calls (no socket)."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
import pytest

from bench import loadgen
from bench.loadgen import LoadSpec, check_loopback, mcdropout_workload, run_load
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.protocol.codec import encode_tensor


def test_counts_only_calls_completing_in_the_window() -> None:
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.002)

    spec = LoadSpec(concurrency=4, duration_s=0.3, warmup_s=0.1, rows_samples_per_request=50)
    result = asyncio.run(run_load(call, spec))
    assert result.requests > 0
    assert result.errors == 0
    assert result.warmup_requests > 0
    assert result.requests + result.warmup_requests <= calls
    assert result.requests_per_s == pytest.approx(result.requests / 0.3)
    assert result.rows_samples_per_s == pytest.approx(result.requests_per_s * 50)
    assert 2.0 <= result.p50_ms <= result.p99_ms <= result.max_ms


def test_errors_are_counted_by_status_code() -> None:
    async def call() -> None:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
        )

    result = asyncio.run(run_load(call, LoadSpec(concurrency=2, duration_s=0.1, warmup_s=0.0)))
    assert result.requests == 0
    assert result.errors > 0
    assert result.error_codes == {"UNAVAILABLE": result.errors}
    assert math.isnan(result.p99_ms)
    assert result.to_dict()["p99_ms"] is None


def test_a_call_that_never_answers_cannot_hang_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen, "RUN_SLACK_S", 0.05)

    async def call() -> None:
        await asyncio.Event().wait()

    spec = LoadSpec(concurrency=3, duration_s=0.05, warmup_s=0.0, deadline_s=0.05)
    result = asyncio.run(asyncio.wait_for(run_load(call, spec), timeout=5.0))
    assert result.requests == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("concurrency", 0), ("duration_s", 0.0), ("warmup_s", -1.0), ("deadline_s", 0.0)],
)
def test_spec_rejects_bad_values_naming_them(field: str, value: float) -> None:
    arguments: dict[str, float] = {"concurrency": 1, "duration_s": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        LoadSpec(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("target", ["127.0.0.1:8001", "127.1.2.3:1", "localhost:2", "[::1]:3"])
def test_loopback_targets_are_accepted(target: str) -> None:
    check_loopback(target)


@pytest.mark.parametrize("target", ["10.0.0.1:8001", "example.com:80", "127.0.0.1", "[::2]:1"])
def test_other_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError, match=r"loopback|HOST:PORT"):
        check_loopback(target)


def test_mcdropout_check_wants_the_requested_samples_and_probabilities() -> None:
    x = np.zeros((2, 1, 8, 8), np.float32)
    workload = mcdropout_workload("digits", "image", x, samples=50)
    assert pb.PredictRequest.FromString(workload.request).num_samples == 50
    mean = np.full((2, 10), 0.1)
    answer = pb.PredictResponse(
        num_samples=50, outputs=[pb.OutputStatistics(name="logits", mean=encode_tensor(mean))]
    )
    assert "T=50" in workload.check(answer.SerializeToString())
    answer.num_samples = 49
    with pytest.raises(ValueError, match="T=50"):
        workload.check(answer.SerializeToString())


def test_service_report_summarises_rounds_and_states_the_target() -> None:
    from bench.service import CEILING, MLSERVER, NAIVE, SERVICE, Plan, headline, render, summarise

    def cell(system: str, round_: int, throughput: float, p99: float) -> dict[str, object]:
        return {"system": system, "rows": 1, "concurrency": 64, "round": round_,
                "rows_samples_per_s": throughput, "p50_ms": p99 / 2, "p99_ms": p99, "errors": 0}  # fmt: skip

    results = [cell(SERVICE, r, 1000.0 * (10 + r), 50.0) for r in (1, 2, 3)]
    results += [cell(MLSERVER, r, 1000.0 + r, 200.0) for r in (1, 2, 3)]
    results += [cell(NAIVE, 1, 100.0, 900.0), cell(CEILING, 1, 20_000.0, 30.0)]
    summary = summarise(results)
    assert summary[(SERVICE, 1, 64)].rows_samples_per_s == 12_000.0
    assert (summary[(SERVICE, 1, 64)].low, summary[(SERVICE, 1, 64)].high) == (11_000.0, 13_000.0)
    numbers = headline(summary)
    assert numbers["service_rows_samples_per_s_vs_mlserver_c64"] == pytest.approx(12_000 / 1002)
    assert numbers["service_rows_samples_per_s_vs_naive_c64"] == pytest.approx(120.0)
    assert numbers["service_p99_ms_c64"] == 50.0
    assert numbers["mlserver_p99_ms_c64"] == 200.0
    plan = Plan(concurrencies=(64,), rows=(1,), rounds=3, duration_s=1.0, warmup_s=0.0)
    markdown = render(plan, summary, quick=False, machine="a CPU", problems=[], skipped=None)
    assert (
        "| this service | 12,000 [11,000-13,000] | 25.0 | 50.0 | 0 | 11.98x | 120.00x |" in markdown
    )
    assert "**met** (11.98x" in markdown
