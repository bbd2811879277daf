"""Engine-level benchmark: T stochastic passes over B rows, in process, several ways, on the
CPU (``bench.run``) or on a CUDA device (``bench.gpu``): one implementation, a :class:`Device`.

Variants (each returns the same statistics: the server's float64 classification statistics
of the (T, B, C) logits, i.e. mean and unbiased variance of the softmax per element plus
entropies, mutual information and votes, from ``service.maths.uncertainty``, on the host):

* ``torch_loop`` (a): the usual PyTorch MC dropout code, T forward passes of the B rows with
  dropout in train mode (``export.mc_mode.mc_dropout_copy``), under ``torch.inference_mode``.
* ``torch_tiled`` (b): PyTorch on the [T*B] tile, chunked to the same memory budget as (d).
* ``ort_loop`` (c): ONNX Runtime, T session runs of the B rows.
* ``ort_tiled`` (d): ONNX Runtime on the whole tiled graph (``build_engine(..., "tiled")``).
* ``engine`` (e): the engine the server builds (``service.engine.runtime.build_engine``).
* ``engine_split_graph`` (f), ``engine_cpu`` (g): the GPU benchmark only (:data:`GPU_VARIANTS`):
  the engine's one-graph form, and the engine on the host's CPU provider.

On a CUDA device the PyTorch variants run on ``cuda`` with ``torch.cuda.synchronize()`` around
every call, and the ONNX Runtime ones on the CUDA provider; a variant whose sessions do not all
report the device's provider first is refused (:class:`NotOnDevice`), never timed.

Timing: variants are interleaved in rounds (round r starts at variant r mod V), after probe
calls that estimate a call's time and one full-size warm-up call each, and each cell reports the
median and the p10-p90 spread of the per-call wall time. A variant whose single call is
estimated to exceed the per-call cap is skipped for that cell; one that raises is recorded with
its error and the others go on.

Peak memory (CPU): measured afterwards, in one child process per model, so that the timing
process does not see it: for each cell and variant a fresh runner (fresh sessions, so a fresh
ONNX Runtime arena) is built, freed memory is handed back to the OS (``malloc_trim``), the
peak-RSS mark is reset (``/proc/self/clear_refs``), one call runs, and the peak RSS above the
RSS before the call is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from bench.models import INPUT_NAME, OUTPUT_NAME, PreparedModel, load_prepared
from service.engine.onnx_session import SessionConfig, create_session
from service.engine.runtime import OutputStats, build_engine, chunk_samples
from service.maths.uncertainty import ClassificationAccumulator, RegressionAccumulator
from service.repository import Semantics, TensorSpec
from service.settings import EngineKind

__all__ = [
    "CPU",
    "CUDA",
    "GPU_VARIANTS",
    "VARIANTS",
    "Built",
    "Cell",
    "CellResult",
    "Device",
    "EngineBenchConfig",
    "Measurement",
    "NotOnDevice",
    "Variant",
    "build_runners",
    "build_variant",
    "describe_error",
    "engine_class",
    "estimate_call_s",
    "make_runner",
    "measure_cell",
    "measure_cells",
    "measure_peak_memory",
]

log = logging.getLogger(__name__)

Rows = npt.NDArray[np.float32]
#: (B rows, T samples) -> statistics of the first output.
Runner = Callable[[Rows, int], OutputStats]
#: What the timing loop calls: (the cell's inputs, T) -> anything (bench.real's variants take
#: a dict of inputs and return their own statistics).
Call = Callable[[Any, int], object]


@dataclass(frozen=True)
class Variant:
    """One way of computing T samples.

    Attributes:
        key: short name used in results ("torch_loop").
        letter: (a)..(g), as in the reports.
        label: column header.
        on_device: runs on the benchmark's device; else always on the host's CPU.
    """

    key: str
    letter: str
    label: str
    on_device: bool = True


#: The CPU benchmark's variants (bench.run, docs/benchmarks.md's engine tables).
VARIANTS: tuple[Variant, ...] = (
    Variant("torch_loop", "a", "PyTorch loop of T passes"),
    Variant("torch_tiled", "b", "PyTorch on the [T*B] tile"),
    Variant("ort_loop", "c", "ONNX Runtime loop of T runs"),
    Variant("ort_tiled", "d", "ONNX Runtime, whole tiled graph"),
    Variant("engine", "e", "this engine (build_engine)"),
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)
#: The GPU benchmark's (bench.gpu): the same, the engine's one-graph form, the engine on the CPU.
GPU_VARIANTS: tuple[Variant, ...] = (
    *VARIANTS,
    Variant("engine_split_graph", "f", "this engine, one-graph form (split-graph)"),
    Variant("engine_cpu", "g", "this engine on the CPU provider", on_device=False),
)
GPU_VARIANT_KEYS = tuple(v.key for v in GPU_VARIANTS)
BASELINE = "torch_loop"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
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
        probe_calls: calls per probe size, the last one timed (2 on a GPU: the first call at
            a new shape pays one-off costs, cuDNN algorithm search and arena growth, that
            would inflate the estimate and skip a fast variant).
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
    probe_calls: int = 1
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


@dataclass(frozen=True)
class Device:
    """Where the benchmark runs its variants.

    Attributes:
        cuda: PyTorch on ``cuda`` and ONNX Runtime on the CUDA provider; else the host's CPU.
    """

    cuda: bool

    @property
    def torch_device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def provider(self) -> str:
        """What the sessions of a variant on this device must report first."""
        return CUDA_PROVIDER if self.cuda else CPU_PROVIDER

    def sync(self) -> None:
        """Wait for the device's queued work (PyTorch on CUDA is asynchronous)."""
        if self.cuda:
            torch.cuda.synchronize()


CPU = Device(cuda=False)
CUDA = Device(cuda=True)


def session_config(device: Device = CPU) -> SessionConfig:
    """The server's session settings (threads = cores, spinning off) on ``device``."""
    return SessionConfig(use_gpu=device.cuda)


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


class NotOnDevice(RuntimeError):
    """A variant's sessions (or tensors) are not where the benchmark needs them."""


@dataclass
class Built:
    """A variant ready to call, with where it really runs.

    Attributes:
        runner: ``run(rows (B, ...), T) -> statistics``, synchronised around the call.
        providers: what runs it: every ONNX Runtime session's first provider, or "torch DEVICE".
        detail: e.g. the engine class and its tile rows.
        provider_options: the CUDA provider's options of the first session (ORT variants).
    """

    runner: Runner
    providers: list[str]
    detail: str = ""
    provider_options: dict[str, str] = field(default_factory=dict)


def _synchronised(runner: Runner, device: Device) -> Runner:
    if not device.cuda:
        return runner

    def run(rows: Rows, num_samples: int) -> OutputStats:
        device.sync()
        stats = runner(rows, num_samples)
        device.sync()
        return stats

    return run


def _check_providers(key: str, providers: list[str], expected: str) -> None:
    if not providers or any(p != expected for p in providers):
        raise NotOnDevice(
            f"{key} runs on {providers}, not {expected}: refused (its times would not be "
            f"{'GPU' if expected == CUDA_PROVIDER else 'CPU'} figures)"
        )


def _cuda_options(*sessions: Any) -> dict[str, str]:
    for session in sessions:
        with contextlib.suppress(Exception):
            options = session.get_provider_options().get(CUDA_PROVIDER)
            if options:
                return {k: str(v) for k, v in sorted(options.items())}
    return {}


def build_variant(
    key: str,
    model: PreparedModel,
    tile_memory_bytes: int,
    device: Device = CPU,
    torch_model: torch.nn.Module | None = None,
) -> Built:
    """Build one variant (sessions and device copies are made here, not per call).

    Args:
        key: one of :data:`GPU_VARIANT_KEYS` (the CPU benchmark uses :data:`VARIANT_KEYS`).
        model: the exported model.
        tile_memory_bytes: memory budget of one tiled run ((b), (d) to (g)).
        device: where the variant runs ((g) always runs on the host's CPU).
        torch_model: the PyTorch model already on ``device`` (shared by (a) and (b)); default
            ``model.mc_model`` on the CPU, a copy moved to the device otherwise.

    Raises:
        NotOnDevice: it does not run where it must (e.g. CUDA asked, CPU given).
        ValueError: an unknown variant.
    """
    variant = next((v for v in GPU_VARIANTS if v.key == key), None)
    if variant is None:
        raise ValueError(f"variant must be one of {GPU_VARIANT_KEYS}, got {key!r}")
    output = model.source.config.outputs[0]
    if key in ("torch_loop", "torch_tiled"):
        target = torch.device(device.torch_device)
        mc = torch_model
        if mc is None:
            mc = model.mc_model if not device.cuda else copy.deepcopy(model.mc_model).to(target)
        where = next(mc.parameters()).device
        if where.type != target.type:
            raise NotOnDevice(f"{key}: the PyTorch model is on {where}, not {target}")
        providers = [f"torch {where}"]
        if key == "torch_loop":

            def torch_loop(rows: Rows, num_samples: int) -> OutputStats:
                x = torch.from_numpy(rows).to(target)
                with torch.inference_mode():
                    samples = torch.stack([mc(x) for _ in range(num_samples)])
                return _stats(output, samples.cpu().numpy())

            return Built(_synchronised(torch_loop, device), providers)

        budget_rows = _tile_budget_rows(model, tile_memory_bytes)

        def torch_tiled(rows: Rows, num_samples: int) -> OutputStats:
            num_rows = rows.shape[0]
            chunk = chunk_samples(num_samples, num_rows, budget_rows)
            accumulator = _accumulator(output)
            # (chunk*B, ...) sample-major: row t*B + b is a copy of row b, as the engines tile.
            tiled = torch.from_numpy(rows).to(target).repeat(chunk, *([1] * (rows.ndim - 1)))
            with torch.inference_mode():
                for done in range(0, num_samples, chunk):
                    t = min(chunk, num_samples - done)
                    out = mc(tiled[: t * num_rows]).cpu().numpy()
                    accumulator.update(out.reshape(t, num_rows, *out.shape[1:]))
            return accumulator.result()

        return Built(_synchronised(torch_tiled, device), providers)

    where_device = device if variant.on_device else CPU
    config = session_config(where_device)
    if key == "ort_loop":
        session = create_session(model.model_path, config)
        providers = [session.get_providers()[0]]
        _check_providers(key, providers, where_device.provider)

        def ort_loop(rows: Rows, num_samples: int) -> OutputStats:
            feed = {INPUT_NAME: rows}
            samples = [session.run([OUTPUT_NAME], feed)[0] for _ in range(num_samples)]
            return _stats(output, np.stack(samples))

        return Built(ort_loop, providers, "InferenceSession", _cuda_options(session))

    kinds: dict[str, EngineKind] = {"ort_tiled": "tiled", "engine_split_graph": "split-graph"}
    engine = build_engine(model.source, config, tile_memory_bytes, kinds.get(key, "auto"))
    sessions = list(engine.sessions().values())  # every role: prefix, sampler(s)
    providers = [engine.provider] + [s.get_providers()[0] for s in sessions]
    _check_providers(key, providers, where_device.provider)

    def run_engine(rows: Rows, num_samples: int) -> OutputStats:
        return engine.run({INPUT_NAME: rows}, num_samples)[0]

    detail = f"{engine.kind} engine"
    return Built(run_engine, sorted(set(providers)), detail, _cuda_options(*sessions))


def make_runner(
    variant: str, model: PreparedModel, tile_memory_bytes: int, device: Device = CPU
) -> Runner:
    """The runner of one variant: :func:`build_variant`'s, without the details."""
    return build_variant(variant, model, tile_memory_bytes, device).runner


def build_runners(
    model: PreparedModel, variants: Sequence[str], tile_memory_bytes: int, device: Device = CPU
) -> tuple[dict[str, Built], dict[str, str]]:
    """Every variant of one model; one that cannot be built is left out with its error.

    Returns:
        ({variant: built}, {variant: one-line error}).
    """
    built: dict[str, Built] = {}
    errors: dict[str, str] = {}
    torch_model: torch.nn.Module | None = None
    for key in variants:
        try:
            if key.startswith("torch_") and torch_model is None and device.cuda:
                # One copy on the device for both PyTorch variants.
                torch_model = copy.deepcopy(model.mc_model).to(torch.device(device.torch_device))
            built[key] = build_variant(key, model, tile_memory_bytes, device, torch_model)
        except Exception as exc:  # one variant must not stop the others (recorded)
            errors[key] = describe_error(exc)
            log.warning("%s %s: cannot build: %s", model.spec.name, key, errors[key])
    return built, errors


def engine_class(model: PreparedModel, config: EngineBenchConfig) -> str:
    """The class name of the engine ``build_engine`` returns for ``model``."""
    engine = build_engine(model.source, session_config(CPU), config.tile_memory_bytes)
    return type(engine).__name__


def describe_error(exc: BaseException) -> str:
    """One line: the exception's first line, and its last when it has more (a log tail)."""
    lines = [line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
    text = lines[0][:300]
    if len(lines) > 1:
        text += " ... " + lines[-1][:300]
    return text


def _timed(runner: Call, rows: Any, num_samples: int) -> float:
    started = time.perf_counter()
    runner(rows, num_samples)
    return time.perf_counter() - started


def estimate_call_s(runner: Call, rows: Any, num_samples: int, config: EngineBenchConfig) -> float:
    """Estimated seconds of one call with ``num_samples``, from probes with fewer samples.

    Time is about a + b*T, so T/p times a probe with p samples overestimates it by the fixed
    part a; while that estimate is above the cap, probe again with 10x the samples, as long as
    that probe itself is expected to stay within the cap. Each probe size runs
    ``config.probe_calls`` times, the last one timed. The probes also warm the runner up.
    """
    calls = max(1, config.probe_calls)
    probe = min(num_samples, config.probe_samples)
    while True:
        for _ in range(calls - 1):
            runner(rows, probe)
        probe_s = _timed(runner, rows, probe)
        estimate_s = probe_s * num_samples / probe
        next_probe = min(num_samples, 10 * probe)
        if (
            estimate_s <= config.call_cap_s
            or probe == num_samples
            or calls * probe_s * next_probe / probe > config.call_cap_s
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


def measure_cell(
    cell: Cell,
    runners: Mapping[str, Call],
    rows: Any,
    config: EngineBenchConfig,
    *,
    deadline: float | None = None,
    required: bool | Collection[str] = False,
) -> tuple[CellResult, dict[str, str]]:
    """Probe, warm up and time every variant of one cell in interleaved rounds.

    Args:
        cell: what is measured.
        runners: the variants, by key.
        rows: the B input rows (passed to every runner as they are).
        config: repeats, budgets and caps.
        deadline: ``time.monotonic()`` after which no round beyond MIN_ROUNDS starts.
        required: never skip a variant, whatever its estimated time: True for every variant,
            or the keys of those never skipped.

    Returns:
        The cell's result, and ``{variant: error}`` for every variant that raised (dropped
        from the cell, its times cleared; the others go on).
    """
    result = CellResult(cell, {key: Measurement() for key in runners})
    errors: dict[str, str] = {}
    active: list[str] = []

    def failed(key: str, exc: Exception) -> None:
        errors[key] = describe_error(exc)
        result.measurements[key].times_s.clear()
        result.measurements[key].skipped = "error"
        log.warning("%s %s failed: %s", cell.key, key, errors[key], exc_info=True)

    for key, runner in runners.items():
        measurement = result.measurements[key]
        try:
            measurement.estimate_s = estimate_call_s(runner, rows, cell.num_samples, config)
            never_skip = required is True or (not isinstance(required, bool) and key in required)
            if measurement.estimate_s > config.call_cap_s and not never_skip:
                measurement.skipped = (
                    f"skipped (about {measurement.estimate_s:.2g} s per call > "
                    f"{config.call_cap_s:g} s cap)"
                )
                log.info("%s %s: %s", cell.key, key, measurement.skipped)
                continue
            runner(rows, cell.num_samples)  # full-size warm-up: arena growth, first run
        except Exception as exc:  # one failing variant must not stop the cell
            failed(key, exc)
            continue
        active.append(key)
        time.sleep(config.pause_s)

    started = time.perf_counter()
    while active and _another_round(
        result.rounds,
        time.perf_counter() - started,
        config,
        deadline is not None and time.monotonic() > deadline,
    ):
        shift = result.rounds % len(active)
        gc.collect()
        for key in active[shift:] + active[:shift]:
            try:
                result.measurements[key].times_s.append(
                    _timed(runners[key], rows, cell.num_samples)
                )
            except Exception as exc:
                failed(key, exc)
                active.remove(key)
            time.sleep(config.pause_s)
        result.rounds += 1
    return result, errors


def measure_cells(
    models: dict[str, PreparedModel],
    cells: Sequence[Cell],
    config: EngineBenchConfig,
    variants: Sequence[str] = VARIANT_KEYS,
    required: Collection[str] = (),
    *,
    device: Device = CPU,
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
        device: where the variants run.

    Raises:
        RuntimeError: a variant could not be built or failed (this benchmark's tables need
            every variant; bench.gpu records such failures instead).
    """
    results: list[CellResult] = []
    for name, model in models.items():
        model_cells = [c for c in cells if c.model == name]
        if not model_cells:
            continue
        built, errors = build_runners(model, variants, config.tile_memory_bytes, device)
        if errors:
            raise RuntimeError(f"{name}: cannot build {errors}")
        runners = {key: b.runner for key, b in built.items()}
        for cell in model_cells:
            rows = model.spec.rows(cell.num_rows, seed=config.seed)
            result, errors = measure_cell(
                cell, runners, rows, config, required=cell.key in required
            )
            if errors:
                raise RuntimeError(f"{cell.key}: {errors}")
            summary = ", ".join(
                f"{k} {m.median_s * 1e3:.1f} ms" if m.times_s else f"{k} skipped"
                for k, m in result.measurements.items()
            )
            log.info("%s (%d rounds): %s", cell.key, result.rounds, summary)
            results.append(result)
        del runners, built
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
    peaks: dict[str, int] = {}
    for key, num_rows, num_samples in request["runs"]:
        rows = model.spec.rows(int(num_rows), seed=int(request["seed"]))
        runner = make_runner(key, model, int(request["tile_memory_bytes"]))
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
