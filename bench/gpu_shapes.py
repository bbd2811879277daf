"""The engine on CUDA when the batch size keeps changing, as dynamic batching makes it, for
each cuDNN convolution algorithm search of the CUDA provider (``--cuda-conv-algo-search``).

A fixed-shape benchmark hides what a server sees: the batcher hands the engine B = 1, 5, 17,
... rows, so the prefix (and the tile) get a new input shape almost every run. With
``exhaustive`` search (ONNX Runtime's default) the CUDA provider times every convolution
algorithm the first time it meets a shape. This measures, per model and setting, in one
process and one run: the first call at each of B = 1..MAX_B (every shape new), then calls
with B drawn at random from 1..MAX_B (every shape seen before), and calls at a fixed B = 32.

Usage: ``python -m bench.gpu_shapes --repository DIR --json RESULT.json`` adds a ``shapes``
entry to RESULT.json (a ``python -m bench.gpu`` result, or a new file); ``python -m bench.gpu
--merge RESULT.json`` renders it in the GPU section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np

from bench.models import MODELS
from service.engine.onnx_session import SessionConfig
from service.engine.runtime import build_engine
from service.repository import load_version
from service.settings import ConvAlgoSearch

__all__ = ["ALGOS", "main", "measure", "shapes_lines"]

log = logging.getLogger("bench.gpu_shapes")

ALGOS: tuple[str, ...] = get_args(ConvAlgoSearch)
MAX_B = 64
NUM_SAMPLES = 50
RANDOM_CALLS = 200
FIXED_CALLS = 50
FIXED_B = 32
TILE_MEMORY_BYTES = 256 * 1024 * 1024
CONV_MODELS = ("digits_cnn", "cnn32")  # the MLP has no convolution


def _timed_ms(run: Any, rows: np.ndarray[Any, Any]) -> float:
    start = time.perf_counter()
    run(rows)
    return (time.perf_counter() - start) * 1e3


def measure(repository: Path, model: str, algo: str, seed: int = 0) -> dict[str, Any]:
    """One model and one search setting: first-seen, random-B and fixed-B call times (ms)."""
    source = load_version(repository / model, 1)
    config = SessionConfig(use_gpu=True, cuda_conv_algo_search=algo)
    engine = build_engine(source, config, TILE_MEMORY_BYTES, "auto")
    if engine.provider != "CUDAExecutionProvider":
        raise RuntimeError(f"{model}: the engine runs on {engine.provider}, not CUDA: refused")
    spec = MODELS[model]
    rows = spec.rows(MAX_B, seed=seed)
    name = source.config.inputs[0].name

    def run(x: np.ndarray[Any, Any]) -> None:
        engine.run({name: x}, NUM_SAMPLES)

    first = [_timed_ms(run, rows[:b]) for b in range(1, MAX_B + 1)]
    sizes = np.random.default_rng(seed).integers(1, MAX_B + 1, RANDOM_CALLS)
    varying = [_timed_ms(run, rows[:b]) for b in sizes]
    fixed = [_timed_ms(run, rows[:FIXED_B]) for _ in range(FIXED_CALLS)]
    return {
        "model": model,
        "algo": algo,
        "engine": type(engine).__name__,
        "first_seen_total_ms": float(np.sum(first)),
        "first_seen_max_ms": float(np.max(first)),
        "varying_median_ms": float(np.median(varying)),
        "varying_p90_ms": float(np.percentile(varying, 90)),
        "varying_mean_ms": float(np.mean(varying)),
        "fixed_median_ms": float(np.median(fixed)),
    }


def shapes_lines(shapes: dict[str, Any] | None) -> list[str]:
    """The markdown of a ``shapes`` result (empty without one)."""
    if not shapes:
        return []
    lines = [
        "### Changing batch sizes and the cuDNN algorithm search",
        "",
        f"`python -m bench.gpu_shapes` (command: `{shapes.get('command', '?')}`): the engine"
        f" (`build_engine`, CUDA provider) at T = {NUM_SAMPLES}, for each"
        " `--cuda-conv-algo-search`: the first call at each B = 1.."
        f"{MAX_B} (every shape new: their sum and the slowest), then {RANDOM_CALLS} calls with"
        f" B drawn at random from 1..{MAX_B} (shapes seen before), then {FIXED_CALLS} calls at"
        f" B = {FIXED_B}. Times in ms.",
        "",
    ]
    for error in shapes.get("errors", []):
        lines.append(f"- **Error**: {error}")
    lines += [
        "| model | search | first call at each B: sum | slowest | random B: median | p90 |"
        " mean | B = 32: median |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in shapes.get("results", []):
        lines.append(
            f"| `{r['model']}` | {r['algo']} | {r['first_seen_total_ms']:,.0f} |"
            f" {r['first_seen_max_ms']:,.1f} | {r['varying_median_ms']:.2f} |"
            f" {r['varying_p90_ms']:.2f} | {r['varying_mean_ms']:.2f} |"
            f" {r['fixed_median_ms']:.2f} |"
        )
    lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_shapes", description=__doc__)
    parser.add_argument("--repository", type=Path, required=True, help="bench.gpu --prepare DIR")
    parser.add_argument("--json", type=Path, required=True, help="result file to add to")
    parser.add_argument("--models", default=",".join(CONV_MODELS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shapes: dict[str, Any] = {
        "command": "python -m bench.gpu_shapes " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": [],
        "errors": [],
    }
    for model in args.models.split(","):
        for algo in ALGOS:
            try:
                result = measure(args.repository, model, algo)
            except Exception as exc:  # one failure must not lose the rest
                shapes["errors"].append(f"{model} / {algo}: {type(exc).__name__}: {exc}")
                log.warning("%s / %s failed", model, algo, exc_info=True)
                continue
            shapes["results"].append(result)
            log.info("%s", result)
    existing: dict[str, Any] = {}
    if args.json.exists():
        existing = json.loads(args.json.read_text(encoding="utf-8"))
    existing["shapes"] = shapes
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(existing, indent=1), encoding="utf-8")
    print("\n".join(shapes_lines(shapes)))
    return 1 if shapes["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
