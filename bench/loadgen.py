"""A bounded, closed-loop gRPC load generator (grpc.aio): C workers, fixed duration, loopback only.

``python -m bench.loadgen --protocol {mcdropout,oip} --target 127.0.0.1:PORT --inputs x.npy
--samples 50 --concurrency 1 8 64`` prints one JSON object: a result per concurrency.

Each of the C workers sends its next request as soon as the previous one has answered (closed
loop), for ``warmup_s + duration_s``. Only calls that complete inside the measurement window
(after the warm-up) count: throughput is successful calls per second of the window, latency
percentiles are over those calls, errors are counted by status code. Every call carries a
gRPC deadline and the whole run a hard bound, so nothing here can hang.

The request is serialised once and sent as bytes, and the answers are kept as bytes (one
answer is decoded and checked before the run): client-side protobuf work is then the same for
every server, whatever its response carries. This module needs only grpcio and numpy, plus the
generated stubs of the protocol it drives (imported lazily), so it also runs inside MLServer's
own virtual environment (``--protocol oip``, with MLServer's ``dataplane_pb2``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

__all__ = [
    "LoadResult",
    "LoadSpec",
    "Workload",
    "check_loopback",
    "mcdropout_workload",
    "oip_workload",
    "run_load",
    "run_workload",
    "wait_ready",
]

#: After an error a worker pauses this long, so a dead server is not hammered in a hot loop.
ERROR_BACKOFF_S = 0.01
#: Extra time, beyond warm-up + duration + one deadline, before the run is cancelled.
RUN_SLACK_S = 5.0
#: Deadline of each readiness probe.
PROBE_DEADLINE_S = 5.0


@dataclass(frozen=True)
class LoadSpec:
    """One cell of load: C workers for ``warmup_s + duration_s`` seconds.

    Attributes:
        concurrency: C, the number of workers (requests in flight at once).
        duration_s: the measurement window, after the warm-up.
        warmup_s: time before the window; calls completing in it are not counted.
        deadline_s: gRPC deadline of every call.
        rows_samples_per_request: B * T of one request, to report rows x samples per second.
    """

    concurrency: int
    duration_s: float
    warmup_s: float = 1.0
    deadline_s: float = 10.0
    rows_samples_per_request: int = 1

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {self.concurrency}")
        if self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {self.warmup_s}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.rows_samples_per_request < 1:
            raise ValueError(
                f"rows_samples_per_request must be >= 1, got {self.rows_samples_per_request}"
            )


@dataclass(frozen=True)
class LoadResult:
    """What one cell measured (latencies in milliseconds, over the measurement window).

    Attributes:
        concurrency: C.
        duration_s: the measurement window.
        requests: successful calls completed in the window.
        errors: failed calls completed in the window.
        error_codes: failed calls by status code name (or exception type).
        warmup_requests: calls (good or bad) completed during the warm-up.
        requests_per_s: ``requests / duration_s``.
        rows_samples_per_s: ``requests_per_s * B * T``.
        p50_ms, p99_ms, mean_ms, max_ms: latency of the successful calls; NaN when none.
        client_cpu_s: CPU seconds the client process used during the whole cell.
    """

    concurrency: int
    duration_s: float
    requests: int
    errors: int
    error_codes: dict[str, int]
    warmup_requests: int
    requests_per_s: float
    rows_samples_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    client_cpu_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN latencies become None)."""
        return {
            key: (None if isinstance(value, float) and math.isnan(value) else value)
            for key, value in asdict(self).items()
        }


@dataclass
class _Record:
    """Per-call observations of one cell, appended by the workers."""

    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    warmup: int = 0


Call = Callable[[], Awaitable[object]]


def _error_name(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    return type(error).__name__


async def run_load(call: Call, spec: LoadSpec) -> LoadResult:
    """Drive ``call`` with ``spec.concurrency`` closed-loop workers and measure it.

    Args:
        call: makes one request and returns when it has answered; it must enforce its own
            deadline (``spec.deadline_s``) and raise on failure.
        spec: the cell.

    Returns:
        The measurements of the window after the warm-up.
    """
    record = _Record()
    clock = time.perf_counter
    cpu_start = time.process_time()
    started = clock()
    window_start = started + spec.warmup_s
    window_end = window_start + spec.duration_s

    async def worker() -> None:
        while (sent := clock()) < window_end:
            failure: str | None = None
            try:
                await call()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # every failure is counted, whatever its type
                failure = _error_name(error)
            done = clock()
            if done < window_start:
                record.warmup += 1
            elif done <= window_end:
                if failure is None:
                    record.latencies_s.append(done - sent)
                else:
                    record.errors[failure] = record.errors.get(failure, 0) + 1
            if failure is not None:
                await asyncio.sleep(ERROR_BACKOFF_S)

    tasks = [asyncio.ensure_future(worker()) for _ in range(spec.concurrency)]
    bound_s = spec.warmup_s + spec.duration_s + spec.deadline_s + RUN_SLACK_S
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=bound_s)
    except TimeoutError:
        # A call ignored its deadline: what was recorded in the window still stands.
        pass
    finally:
        for task in tasks:
            task.cancel()
    return _result(record, spec, time.process_time() - cpu_start)


def _result(record: _Record, spec: LoadSpec, cpu_s: float) -> LoadResult:
    latencies_ms = np.asarray(record.latencies_s, dtype=np.float64) * 1e3
    requests = int(latencies_ms.size)
    nan = float("nan")
    if requests:
        p50, p99 = (float(v) for v in np.percentile(latencies_ms, [50.0, 99.0]))
        mean, worst = float(latencies_ms.mean()), float(latencies_ms.max())
    else:
        p50 = p99 = mean = worst = nan
    requests_per_s = requests / spec.duration_s
    return LoadResult(
        concurrency=spec.concurrency,
        duration_s=spec.duration_s,
        requests=requests,
        errors=sum(record.errors.values()),
        error_codes=dict(sorted(record.errors.items())),
        warmup_requests=record.warmup,
        requests_per_s=requests_per_s,
        rows_samples_per_s=requests_per_s * spec.rows_samples_per_request,
        p50_ms=p50,
        p99_ms=p99,
        mean_ms=mean,
        max_ms=worst,
        client_cpu_s=cpu_s,
    )


@dataclass(frozen=True)
class Workload:
    """One request, ready to send again and again.

    Attributes:
        method: full gRPC method path, e.g. "/mcdropout.v1.MCDropoutService/Predict".
        request: the serialised request message.
        check: decodes one serialised answer and raises ``ValueError`` when it is not the
            expected one; returns a one-line description of it.
        rows: B, the rows of the request.
        samples: T, the stochastic passes per row.
    """

    method: str
    request: bytes
    check: Callable[[bytes], str]
    rows: int
    samples: int


def mcdropout_workload(model: str, input_name: str, x: npt.NDArray[Any], samples: int) -> Workload:
    """``mcdropout.v1.MCDropoutService/Predict`` of the rows ``x`` (B, ...) with T = samples."""
    from service.gen.mcdropout.v1 import mcdropout_pb2 as pb  # noqa: PLC0415
    from service.protocol.codec import decode_tensor, encode_tensor  # noqa: PLC0415 (see module doc)

    request = pb.PredictRequest(
        model=model,
        num_samples=samples,
        inputs=[pb.NamedTensor(name=input_name, tensor=encode_tensor(x))],
    )

    def check(answer: bytes) -> str:
        response = pb.PredictResponse.FromString(answer)
        if response.num_samples != samples or not response.outputs:
            raise ValueError(f"expected T={samples} and outputs, got {response}")
        mean = decode_tensor(response.outputs[0].mean, "mean")
        _check_probabilities(mean, x.shape[0])
        return f"Predict: T={response.num_samples}, mean {list(mean.shape)}"

    return Workload(
        method="/mcdropout.v1.MCDropoutService/Predict",
        request=request.SerializeToString(),
        check=check,
        rows=int(x.shape[0]),
        samples=samples,
    )


_OIP_DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}


def oip_workload(model: str, input_name: str, x: npt.NDArray[Any], samples: int) -> Workload:
    """Open Inference Protocol ``ModelInfer`` of the rows ``x`` (B, ...), raw input contents.

    T is fixed by the server's model settings (``samples`` is only what the answer must say);
    the runtime answers "mean" and "variance", (B, C) FP64 each.
    """
    from mlserver.grpc import dataplane_pb2 as pb  # noqa: PLC0415 (see module doc)

    datatype = _OIP_DATATYPES[x.dtype.name]
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name=input_name, datatype=datatype, shape=list(x.shape))],
        raw_input_contents=[np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()],
    )  # fmt: skip

    def check(answer: bytes) -> str:
        response = pb.ModelInferResponse.FromString(answer)
        names = [o.name for o in response.outputs]
        if names[:2] != ["mean", "variance"] or len(response.raw_output_contents) < 2:
            raise ValueError(f"expected raw outputs mean and variance, got {names}")
        shape = list(response.outputs[0].shape)
        mean = np.frombuffer(response.raw_output_contents[0], "<f8").reshape(shape)
        _check_probabilities(mean, x.shape[0])
        # bench/mlserver/runtime.py reports the T it ran as a response parameter.
        if "num_samples" not in response.parameters:
            raise ValueError("the answer does not say how many samples ran (num_samples)")
        ran = response.parameters["num_samples"].int64_param
        if ran != samples:
            raise ValueError(f"expected T={samples}, the server ran {ran}")
        return f"ModelInfer: outputs {names}, mean {shape}"

    return Workload(
        method="/inference.GRPCInferenceService/ModelInfer",
        request=request.SerializeToString(),
        check=check,
        rows=int(x.shape[0]),
        samples=samples,
    )


def _check_probabilities(mean: npt.NDArray[Any], rows: int) -> None:
    if mean.ndim != 2 or mean.shape[0] != rows:
        raise ValueError(f"expected mean of shape ({rows}, C), got {list(mean.shape)}")
    if not np.allclose(mean.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("mean probabilities do not sum to 1 per row")


def check_loopback(target: str) -> None:
    """Refuse any target that is not on this machine's loopback interface.

    Raises:
        ValueError: ``target`` is not ``127.x.x.x:PORT``, ``localhost:PORT`` or ``[::1]:PORT``.
    """
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target must be HOST:PORT, got {target!r}")
    host = host.strip("[]")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load goes to loopback addresses only, got {target!r}")


def _channel(target: str) -> grpc.aio.Channel:
    check_loopback(target)
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.max_send_message_length", 64 * 2**20),
        ],
    )


async def wait_ready(channel: grpc.aio.Channel, workload: Workload, timeout_s: float) -> str:
    """Send the real request until one answers correctly.

    Returns:
        The check's description of the answer.

    Raises:
        TimeoutError: no correct answer within ``timeout_s`` (the last error is named).
        ValueError: the server answered, but not what was expected.
    """
    method = channel.unary_unary(workload.method)
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            answer = await method(workload.request, timeout=PROBE_DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            last = f"{error.code().name}: {error.details()}"
            await asyncio.sleep(0.2)
            continue
        return workload.check(answer)
    raise TimeoutError(f"{workload.method} not answered within {timeout_s:g} s ({last})")


async def run_workload(
    target: str,
    workload: Workload,
    concurrencies: Sequence[int],
    *,
    duration_s: float,
    warmup_s: float,
    deadline_s: float,
    ready_timeout_s: float,
) -> dict[str, Any]:
    """Wait until ``target`` answers ``workload``, then run one cell per concurrency in order.

    Returns:
        ``{"target", "method", "rows", "samples", "check", "cells": [LoadResult dicts]}``.
    """
    specs = [
        LoadSpec(c, duration_s, warmup_s, deadline_s, workload.rows * workload.samples)
        for c in concurrencies
    ]
    async with _channel(target) as channel:
        checked = await wait_ready(channel, workload, ready_timeout_s)
        method = channel.unary_unary(workload.method)

        async def call() -> object:
            return await method(workload.request, timeout=deadline_s)

        cells = [(await run_load(call, spec)).to_dict() for spec in specs]
    return {
        "target": target,
        "method": workload.method,
        "rows": workload.rows,
        "samples": workload.samples,
        "check": checked,
        "cells": cells,
    }


_WORKLOADS = {"mcdropout": mcdropout_workload, "oip": oip_workload}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--protocol", choices=sorted(_WORKLOADS), required=True)
    parser.add_argument("--target", required=True, help="127.0.0.1:PORT (loopback only)")
    parser.add_argument("--model", default="digits", help="model name")
    parser.add_argument("--input-name", default="image", help="model input name")
    parser.add_argument("--inputs", type=Path, required=True, help=".npy file of rows (B, ...)")
    parser.add_argument("--samples", type=int, default=50, help="T per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1], help="C, one cell each")
    parser.add_argument("--duration-s", type=float, default=5.0, help="window per cell")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="warm-up per cell")
    parser.add_argument("--deadline-s", type=float, default=10.0, help="gRPC deadline per call")
    parser.add_argument(
        "--ready-timeout-s", type=float, default=60.0, help="wait for a first correct answer"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cells and print the JSON result; exit status 1 when the server never answered."""
    args = _parser().parse_args(argv)
    x = np.load(args.inputs)
    workload = _WORKLOADS[args.protocol](args.model, args.input_name, x, args.samples)
    try:
        result = asyncio.run(
            run_workload(
                args.target,
                workload,
                args.concurrency,
                duration_s=args.duration_s,
                warmup_s=args.warmup_s,
                deadline_s=args.deadline_s,
                ready_timeout_s=args.ready_timeout_s,
            )
        )
    except (TimeoutError, ValueError) as error:
        sys.stderr.write(f"loadgen: {error}\n")
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
