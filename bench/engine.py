"""Engine-level benchmark: T stochastic passes over B rows, in process, five ways.

Variants (each returns the same statistics: the server's float64 classification statistics
of the (T, B, C) logits, i.e. mean and unbiased variance of the softmax per element plus
entropies, mutual information and votes, from ``service.maths.uncertainty``):

* ``torch_loop`` (a): the usual PyTorch MC dropout code, T forward passes of the B rows with
  dropout in train mode (``export.mc_mode.mc_dropout_copy``), under ``torch.inference_mode``.
* ``torch_tiled`` (b): PyTorch on the [T*B] tile, chunked to the same memory budget as (d).
* ``ort_loop`` (c): ONNX Runtime, T session runs of the B rows.
* ``ort_tiled`` (d): ONNX Runtime on the whole tiled graph (``build_engine(..., "tiled")``).
* ``engine`` (e): the engine the server builds (``service.engine.runtime.build_engine``).

Timing: variants are interleaved in rounds (round r starts at variant r mod 5), after one
warm-up call each, and each cell reports the median and the p10-p90 spread of the per-call
wall time. A variant whose single call is estimated (from probes with fewer samples) to
exceed the per-call cap is skipped for that cell.

Peak memory: measured afterwards, in one child process per model, so that the timing process
does not see it: for each cell and variant a fresh runner (fresh sessions, so a fresh ONNX
Runtime arena) is built, freed memory is handed back to the OS (``malloc_trim``), the peak-RSS
mark is reset (``/proc/self/clear_refs``), one call runs, and the peak RSS above the RSS
before the call is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from bench.models import INPUT_NAME, OUTPUT_NAME, PreparedModel, load_prepared
from service.engine.onnx_session import SessionConfig, create_session
from service.engine.runtime import Engine, OutputStats, build_engine, chunk_samples
from service.maths.uncertainty import ClassificationAccumulator, RegressionAccumulator
from service.repository import Semantics, TensorSpec

__all__ = [
    "VARIANTS",
    "Cell",
    "CellResult",
    "EngineBenchConfig",
    "Measurement",
    "Variant",
    "engine_class",
    "make_runner",
    "measure_cells",
    "measure_peak_memory",
]

log = logging.getLogger(__name__)

Rows = npt.NDArray[np.float32]
#: (B rows, T samples) -> statistics of the first output.
Runner = Callable[[Rows, int], OutputStats]


@dataclass(frozen=True)
class Variant:
    """One way of computing T samples.

    Attributes:
        key: short name used in results ("torch_loop").
        letter: (a)..(e), as in the issue.
        label: column header.
    """

    key: str
    letter: str
    label: str


VARIANTS: tuple[Variant, ...] = (
    Variant("torch_loop", "a", "PyTorch loop of T passes"),
    Variant("torch_tiled", "b", "PyTorch on the [T*B] tile"),
    Variant("ort_loop", "c", "ONNX Runtime loop of T runs"),
    Variant("ort_tiled", "d", "ONNX Runtime, whole tiled graph"),
    Variant("engine", "e", "this engine (build_engine)"),
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)
BASELINE = "torch_loop"
#: Rounds every cell gets, whatever its budget: a median needs a few.
MIN_ROUNDS = 3


@dataclass(frozen=True)
class EngineBenchConfig:
    """How much measuring each cell gets.

    Attributes:
        min_repeats: timed rounds at least, unless a cell's rounds pass ``max_cell_s`` (then
            at least MIN_ROUNDS).
        max_repeats: timed rounds at most.
        cell_budget_s: no round beyond ``min_repeats`` starts once a cell's rounds took this
            long.
        max_cell_s: no round beyond MIN_ROUNDS starts once a cell's rounds took this long.
        call_cap_s: a variant whose one call is estimated to take longer is skipped.
        probe_samples: T of the first probe call that estimates a call's time.
        pause_s: sleep between calls, so that PyTorch's OpenMP threads, which spin for a
            while after a parallel region, do not steal cores from the next variant.
        tile_memory_bytes: memory budget of one tiled run, as the server's default.
        seed: input rows and weights.
    """

    min_repeats: int = 5
    max_repeats: int = 25
    cell_budget_s: float = 20.0
    max_cell_s: float = 60.0
    call_cap_s: float = 10.0
    probe_samples: int = 10
    pause_s: float = 0.005
    tile_memory_bytes: int = 256 * 2**20
    seed: int = 0


@dataclass(frozen=True)
class Cell:
    """One benchmark point: a model, B rows, T samples."""

    model: str
    num_rows: int
    num_samples: int

    @property
    def key(self) -> str:
        return f"{self.model}_b{self.num_rows}_t{self.num_samples}"


@dataclass
class Measurement:
    """One variant in one cell.

    Attributes:
        times_s: wall time of each timed call.
        skipped: why the variant was not run (None when it was).
        estimate_s: the estimated time of one call, from the probes.
        peak_rss_bytes: peak RSS above the pre-call RSS of one call in a fresh process
            (None when not measured).
    """

    times_s: list[float] = field(default_factory=list)
    skipped: str | None = None
    estimate_s: float | None = None
    peak_rss_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return float(np.median(self.times_s))

    @property
    def spread_s(self) -> tuple[float, float]:
        """(p10, p90) of the per-call times."""
        low, high = np.percentile(self.times_s, [10, 90])
        return float(low), float(high)


@dataclass
class CellResult:
    """Every variant of one cell."""

    cell: Cell
    measurements: dict[str, Measurement]
    rounds: int = 0

    def speedup(self, variant: str, baseline: str = BASELINE) -> float | None:
        """median(baseline) / median(variant), None when either was skipped."""
        ours, base = self.measurements.get(variant), self.measurements.get(baseline)
        if ours is None or base is None or not ours.times_s or not base.times_s:
            return None
        return base.median_s / ours.median_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": asdict(self.cell),
            "rounds": self.rounds,
            "measurements": {
                key: {
                    **asdict(m),
                    "median_s": m.median_s if m.times_s else None,
                    "p10_s": m.spread_s[0] if m.times_s else None,
                    "p90_s": m.spread_s[1] if m.times_s else None,
                }
                for key, m in self.measurements.items()
            },
        }


def session_config() -> SessionConfig:
    """The server's CPU session settings (threads = cores, spinning off)."""
    return SessionConfig(use_gpu=False)


def set_torch_threads(num_threads: int) -> None:
    """PyTorch on as many threads as ONNX Runtime gets (its intra-op pool = the cores)."""
    torch.set_num_threads(num_threads)


def _accumulator(spec: TensorSpec) -> ClassificationAccumulator | RegressionAccumulator:
    """The statistics the server computes for this output (service.engine.runtime does the same)."""
    if spec.semantics is not None and spec.semantics.is_classification:
        return ClassificationAccumulator(from_logits=spec.semantics is Semantics.LOGITS)
    return RegressionAccumulator()


def _stats(spec: TensorSpec, samples: npt.NDArray[np.float32]) -> OutputStats:
    """samples (T, B, ...) sample-major -> float64 statistics."""
    accumulator = _accumulator(spec)
    accumulator.update(samples)
    return accumulator.result()


def _tile_budget_rows(model: PreparedModel, tile_memory_bytes: int) -> int:
    """Rows of one tiled run under the memory budget, as TiledEngine computes them."""
    per_row = model.source.config.activation_bytes_per_row or 1
    return max(1, tile_memory_bytes // per_row)


def make_runner(
    variant: str, model: PreparedModel, config: SessionConfig, tile_memory_bytes: int
) -> Runner:
    """Build the runner of one variant (sessions are created here, not per call).

    Args:
        variant: one of :data:`VARIANT_KEYS`.
        model: the exported model.
        config: ONNX Runtime session settings.
        tile_memory_bytes: memory budget of one tiled run ((b), (d) and (e)).

    Returns:
        ``run(rows (B, ...), T) -> statistics of the output``.
    """
    output = model.source.config.outputs[0]
    if variant == "torch_loop":
        mc_model = model.mc_model

        def torch_loop(rows: Rows, num_samples: int) -> OutputStats:
            x = torch.from_numpy(rows)
            with torch.inference_mode():
                samples = torch.stack([mc_model(x) for _ in range(num_samples)])
            return _stats(output, samples.numpy())

        return torch_loop

    if variant == "torch_tiled":
        mc_model = model.mc_model
        budget_rows = _tile_budget_rows(model, tile_memory_bytes)

        def torch_tiled(rows: Rows, num_samples: int) -> OutputStats:
            num_rows = rows.shape[0]
            chunk = chunk_samples(num_samples, num_rows, budget_rows)
            accumulator = _accumulator(output)
            # (chunk*B, ...) sample-major: row t*B + b is a copy of row b, as the engines tile.
            tiled = torch.from_numpy(rows).repeat(chunk, *([1] * (rows.ndim - 1)))
            with torch.inference_mode():
                for done in range(0, num_samples, chunk):
                    t = min(chunk, num_samples - done)
                    out = mc_model(tiled[: t * num_rows])
                    accumulator.update(out.numpy().reshape(t, num_rows, *out.shape[1:]))
            return accumulator.result()

        return torch_tiled

    if variant == "ort_loop":
        session = create_session(model.model_path, config)

        def ort_loop(rows: Rows, num_samples: int) -> OutputStats:
            feed = {INPUT_NAME: rows}
            samples = [session.run([OUTPUT_NAME], feed)[0] for _ in range(num_samples)]
            return _stats(output, np.stack(samples))

        return ort_loop

    if variant in ("ort_tiled", "engine"):
        engine: Engine = build_engine(
            model.source, config, tile_memory_bytes, "tiled" if variant == "ort_tiled" else "auto"
        )

        def run_engine(rows: Rows, num_samples: int) -> OutputStats:
            return engine.run({INPUT_NAME: rows}, num_samples)[0]

        return run_engine

    raise ValueError(f"variant must be one of {VARIANT_KEYS}, got {variant!r}")


def engine_class(model: PreparedModel, config: EngineBenchConfig) -> str:
    """The class name of the engine ``build_engine`` returns for ``model``."""
    engine = build_engine(model.source, session_config(), config.tile_memory_bytes)
    return type(engine).__name__


def _timed(runner: Runner, rows: Rows, num_samples: int) -> float:
    started = time.perf_counter()
    runner(rows, num_samples)
    return time.perf_counter() - started


def _estimate_call_s(
    runner: Runner, rows: Rows, num_samples: int, config: EngineBenchConfig
) -> float:
    """Estimated seconds of one call with ``num_samples``, from probes with fewer samples.

    Time is about a + b*T, so T/p times a probe with p samples overestimates it by the fixed
    part a; while that estimate is above the cap, probe again with 10x the samples, as long as
    that probe itself is expected to stay within the cap. The probes also warm the runner up.
    """
    probe = min(num_samples, config.probe_samples)
    while True:
        probe_s = _timed(runner, rows, probe)
        estimate_s = probe_s * num_samples / probe
        next_probe = min(num_samples, 10 * probe)
        if (
            estimate_s <= config.call_cap_s
            or probe == num_samples
            or probe_s * next_probe / probe > config.call_cap_s
        ):
            return estimate_s
        probe = next_probe


def _another_round(
    rounds: int, elapsed_s: float, config: EngineBenchConfig, past_deadline: bool = False
) -> bool:
    """At least MIN_ROUNDS rounds; no more once a whole run's deadline has passed;
    min_repeats unless the cell passed max_cell_s; then more up to max_repeats while within
    cell_budget_s."""
    if rounds < MIN_ROUNDS:
        return True
    if past_deadline:
        return False
    if rounds < config.min_repeats:
        return elapsed_s < config.max_cell_s
    return rounds < config.max_repeats and elapsed_s < config.cell_budget_s


def _measure_cell(
    cell: Cell,
    runners: dict[str, Runner],
    rows: Rows,
    config: EngineBenchConfig,
    required: bool = False,
) -> CellResult:
    """Probe, warm up and time every variant of one cell in interleaved rounds (``required``:
    never skip a variant, whatever its estimated time)."""
    result = CellResult(cell, {key: Measurement() for key in runners})
    num_samples = cell.num_samples
    active: list[str] = []
    for key, runner in runners.items():
        measurement = result.measurements[key]
        measurement.estimate_s = _estimate_call_s(runner, rows, num_samples, config)
        if measurement.estimate_s > config.call_cap_s and not required:
            measurement.skipped = f"skipped (> {config.call_cap_s:g} s per call)"
            log.info("%s %s: %s", cell.key, key, measurement.skipped)
            continue
        runner(rows, num_samples)  # full-size warm-up: arena growth, first run at this shape
        active.append(key)
        time.sleep(config.pause_s)

    started = time.perf_counter()
    while active and _another_round(result.rounds, time.perf_counter() - started, config):
        shift = result.rounds % len(active)
        gc.collect()
        for key in active[shift:] + active[:shift]:
            result.measurements[key].times_s.append(_timed(runners[key], rows, num_samples))
            time.sleep(config.pause_s)
        result.rounds += 1
    return result


def measure_cells(
    models: dict[str, PreparedModel],
    cells: Sequence[Cell],
    config: EngineBenchConfig,
    variants: Sequence[str] = VARIANT_KEYS,
    required: Collection[str] = (),
) -> list[CellResult]:
    """Time every variant of every cell, in this process.

    Runners (sessions, engines) are built once per model and variant; cells are measured one
    after the other, variants interleaved within a cell.

    Args:
        models: the exported models, by name.
        cells: what to measure.
        config: repeats, budgets and caps.
        variants: which variants to run.
        required: keys of cells (``Cell.key``) whose variants are never skipped, however long
            a call is estimated to take (the cells the targets and headline need).
    """
    session = session_config()
    results: list[CellResult] = []
    for name, model in models.items():
        model_cells = [c for c in cells if c.model == name]
        if not model_cells:
            continue
        runners = {
            key: make_runner(key, model, session, config.tile_memory_bytes) for key in variants
        }
        for cell in model_cells:
            rows = model.spec.rows(cell.num_rows, seed=config.seed)
            result = _measure_cell(cell, runners, rows, config, cell.key in required)
            summary = ", ".join(
                f"{k} {m.median_s * 1e3:.1f} ms" if m.times_s else f"{k} skipped"
                for k, m in result.measurements.items()
            )
            log.info("%s (%d rounds): %s", cell.key, result.rounds, summary)
            results.append(result)
        del runners
        gc.collect()
    return results


# ---------------------------------------------------------------- peak memory (child process)

_PAGE_KIB = 1024


def _status_kib(field_name: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _release_and_reset_peak() -> int:
    """Hand freed heap memory back to the OS, reset the peak-RSS mark; returns RSS bytes."""
    gc.collect()
    # Not glibc: no trim, the baseline is just a little higher.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    return _status_kib("VmRSS") * _PAGE_KIB


def _memory_child(request: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child: one call per (cell, variant), each with fresh runners."""
    set_torch_threads(int(request["threads"]))
    model = load_prepared(request["model"], Path(request["repository"]), int(request["seed"]))
    session = session_config()
    peaks: dict[str, int] = {}
    for key, num_rows, num_samples in request["runs"]:
        rows = model.spec.rows(int(num_rows), seed=int(request["seed"]))
        runner = make_runner(key, model, session, int(request["tile_memory_bytes"]))
        runner(rows, 1)  # loads lazily initialised kernels outside the measurement
        before = _release_and_reset_peak()
        runner(rows, int(num_samples))
        peaks[f"{key}:{num_rows}:{num_samples}"] = _status_kib("VmHWM") * _PAGE_KIB - before
        del runner
    return {"peaks": peaks}


def measure_peak_memory(
    results: Sequence[CellResult],
    repository: Path,
    config: EngineBenchConfig,
    threads: int,
    *,
    only: Callable[[Cell], bool] | None = None,
    timeout_s: float = 900.0,
) -> None:
    """Fill ``peak_rss_bytes`` of every variant that was timed, one child process per model.

    Args:
        results: the timed cells; their measurements are updated in place.
        repository: where the models were published.
        config: the settings the cells were timed with.
        threads: PyTorch threads in the child.
        only: measure just the cells it accepts (default: all).
        timeout_s: per child process.

    Raises:
        RuntimeError: a child process failed.
    """
    by_model: dict[str, list[CellResult]] = {}
    for result in results:
        if only is None or only(result.cell):
            by_model.setdefault(result.cell.model, []).append(result)
    for name, model_results in by_model.items():
        runs = [
            [key, r.cell.num_rows, r.cell.num_samples]
            for r in model_results
            for key, m in r.measurements.items()
            if m.times_s
        ]
        request = {
            "model": name,
            "repository": str(repository),
            "seed": config.seed,
            "threads": threads,
            "tile_memory_bytes": config.tile_memory_bytes,
            "runs": runs,
        }
        completed = subprocess.run(
            [sys.executable, "-m", "bench.engine", "--memory-child", json.dumps(request)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"peak-memory child for {name} failed ({completed.returncode}):\n"
                + completed.stderr[-4000:]
            )
        peaks = json.loads(completed.stdout.strip().splitlines()[-1])["peaks"]
        for r in model_results:
            for key, m in r.measurements.items():
                peak = peaks.get(f"{key}:{r.cell.num_rows}:{r.cell.num_samples}")
                if peak is not None:
                    m.peak_rss_bytes = int(peak)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: the peak-memory child process")
    parser.add_argument("--memory-child", required=True, help="JSON request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = _memory_child(json.loads(args.memory_child))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
