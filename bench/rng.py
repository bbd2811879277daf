"""The random number generation's share of an engine call (docs/sampling.md, "Cost").

``python -m bench.rng`` exports the digits CNN and the MLP of bench/models.py (random
weights), runs the engine at B = 32, T = 50 as the server does (CPU, fed noise), and times
drawing the same noise alone with the engine's own streams (as many threads as the CPUs for a
draw of at least ``PARALLEL_MIN_VALUES`` values) and with one thread, interleaved. It prints
one line per model and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from bench.engine import session_config
from bench.models import prepare_models
from service.engine.noise import StreamNoise
from service.engine.runtime import McEngine, build_engine

__all__ = ["main", "rng_share"]


def _median_s(call: Callable[[], object], repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def rng_share(
    engine: McEngine, rows: np.ndarray, num_samples: int, repeats: int
) -> dict[str, float]:
    """Median seconds of one call and of drawing its noise alone (the engine's threads, and
    one thread), and the share."""
    name = engine.config.inputs[0].name
    inputs = {name: rows}
    sampler = engine._fed
    if sampler is None:
        raise RuntimeError("the engine draws no noise (CUDA keeps its own random kernels)")
    sizes, _, _ = engine._row_sizes(sampler, inputs)
    streams = engine._streams
    call_s = _median_s(lambda: engine.run(inputs, num_samples), repeats)
    one = StreamNoise(1)
    draws = {
        label: partial(source.draw, sampler.graph.noise, sizes, num_samples, rows.shape[0])
        for label, source in (("engine", streams), ("one", one))
    }
    for draw in draws.values():
        draw()
    times: dict[str, list[float]] = {label: [] for label in draws}
    for _ in range(repeats):
        for label, draw in draws.items():
            started = time.perf_counter()
            draw()
            times[label].append(time.perf_counter() - started)
    noise_s = float(np.median(times["engine"]))
    return {
        "call_ms": call_s * 1e3,
        "noise_ms": noise_s * 1e3,
        "noise_one_thread_ms": float(np.median(times["one"])) * 1e3,
        "noise_threads": float(streams.threads),
        "share": noise_s / call_s,
        "noise_values": float(sum(sizes) * num_samples * rows.shape[0]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rng", description=__doc__)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        prepared = prepare_models(["digits_cnn", "mlp"], Path(folder))
        for name, model in prepared.items():
            engine = build_engine(model.source, session_config(), 256 * 2**20)
            rows = model.spec.rows(args.rows)
            results[name] = rng_share(engine, rows, args.samples, args.repeats)
            r = results[name]
            print(
                f"{name}: B={args.rows} T={args.samples}: call {r['call_ms']:.3f} ms, noise "
                f"{r['noise_ms']:.3f} ms ({100 * r['share']:.1f}% of the call, "
                f"{int(r['noise_values']):,} values, drawn by up to {int(r['noise_threads'])} "
                f"threads; one thread: {r['noise_one_thread_ms']:.3f} ms)"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
