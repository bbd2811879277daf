"""GPU benchmark: the engine-level variants of bench/engine.py on CUDA, in one process and one run.

The measuring is bench/engine.py's (runners, probes, interleaved rounds) with its ``Device``
set to CUDA, and the service level is bench/service.py's (servers started through
tools/launcher.py, the same load generator); this module adds the time budget, the GPU
variants (f) and (g), the device description and the report section.

``python -m bench.gpu --repository DIR --json OUT.json --out SECTION.md`` measures, over cells
(model, B rows, T samples), with PyTorch on cuda and ONNX Runtime on the CUDA provider:

* (a) ``torch_loop``: the usual PyTorch MC dropout code, T forward passes of the B rows on cuda;
* (b) ``torch_tiled``: PyTorch on cuda on the [T*B] tile, chunked to the memory budget;
* (c) ``ort_loop``: ONNX Runtime (CUDA provider), T session runs of the B rows;
* (d) ``ort_tiled``: ONNX Runtime (CUDA) on the whole tiled graph (``TiledEngine``);
* (e) ``engine``: this engine, ``build_engine(..., SessionConfig(use_gpu=True))``, what the
  server runs with ``--device gpu``;
* (f) ``engine_split_graph``: the engine's one-graph form (Tile inside the graph, so the tile
  never crosses the PCIe bus), ``build_engine(kind="split-graph")``;
* (g) ``engine_cpu``: this engine on the CPU provider of the same host (all its cores), to show
  where the GPU wins.

Every variant ends with the same float64 statistics on the host (``service.maths.uncertainty``).
Timing is bench/engine.py's (probes, one full-size warm-up, interleaved rounds, median and
p10-p90) with ``torch.cuda.synchronize()`` before and after every PyTorch call (ONNX Runtime's
``run`` is synchronous from Python). A variant whose sessions do not really run on CUDA
(``get_providers()[0]``) is refused and reported as an error, never as a GPU figure. One failing
variant or cell is recorded as an error and the rest go on; the whole run keeps to a wall-clock
budget (``--budget-s``), and the JSON result is rewritten after every cell, so a run cut short
still leaves its measurements.

Optionally (unless ``--skip-service``) a service-level figure: the real server with
``--device gpu`` under bench/loadgen.py at a few concurrencies, against a naive PyTorch server
on cuda (``python -m bench.naive_server --device cuda``)
and the real server with ``--device cpu`` on the same host.

Then (unless ``--skip-real``) the realistic models of ``bench/real.py`` (``bench/gpu_real.py``):
ResNet-50 with a Dropout(0.5) head at B = 32, T = 100, ViT-B/16 and BERT-base with dropout
everywhere at B = 8, T = 20, each exported in fp32 and fp16 and measured against the PyTorch
anchors in the same precision ((a) the loop, (b) hand-written PyTorch MC with the backbone
once, or PyTorch on the tile, (b') the same under bf16 autocast, (c) and (c') one deterministic
pass), and the server at C = 64 against the engine at B = 64. The JSON result's ``headline``
carries ``gpu_resnet50_head_b32_t100_engine_vs_torch_prefix_once`` (engine time / hand-written
PyTorch time) and the other ratios; the run prints it as its last line. The realistic models
(about 1.5 GB of ONNX) are exported on the GPU host itself: ``--real-repository DIR`` keeps
them there for the next run (their export, minutes, is not counted in ``--budget-s``), and
``--prepare-real DIR`` only exports them.

Other modes:

* ``python -m bench.gpu --prepare DIR``: export the benchmark models here (bench/models.py, with
  verification) into DIR, with their PyTorch weights, to carry to a GPU host (about 4 MB).
* ``python -m bench.gpu --merge RESULT.json``: re-render the GPU section from a result file (or
  take a section file written by ``--out``) into docs/benchmarks.md, between the markers
  ``<!-- gpu:begin -->`` and ``<!-- gpu:end -->``, leaving the rest of the file untouched.
* ``--device cpu``: a test mode on a host without a GPU, every variant on the CPU (the report
  says so in its title); with ``--smoke``, tiny cells and budgets so that every code path runs.

The workflow for a borrowed GPU host: ``--prepare build/gpu-models`` here; carry that folder;
there ``--prepare-real build/gpu-real-models`` (one command, several minutes), then
``--repository build/gpu-models --real-repository build/gpu-real-models --json OUT/gpu.json
--out OUT/gpu.md`` (about 9 minutes on one H100 with 16 cores, bounded by ``--budget-s``, 540 s
by default, imports included); back here ``--merge gpu.json``. Without ``--out``, a CUDA run
writes its section into docs/benchmarks.md itself; the CPU test mode prints it instead. Exit
status 0 when everything ran, 1 when anything failed (every output is still written, the
failures listed in it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.engine import (
    CPU,
    CPU_PROVIDER,
    CUDA,
    GPU_VARIANT_KEYS,
    GPU_VARIANTS,
    MIN_ROUNDS,
    Cell,
    CellResult,
    Device,
    EngineBenchConfig,
    Measurement,
    NotOnDevice,
    Runner,
    build_runners,
    describe_error,
    measure_cell,
)
from bench.gpu_real import (
    REAL_SERVICE_PLAN,
    SMOKE_REAL_SERVICE_PLAN,
    RealPart,
    gpu_real_headline,
    measure_part,
    prepare_part,
    real_section_lines,
    run_real_service,
)
from bench.gpu_shapes import shapes_lines
from bench.models import (
    INPUT_NAME,
    MODELS,
    VERSION,
    PreparedModel,
    build_mc_model,
    prepare_models,
)
from bench.real import GPU_CELLS, GPU_SMOKE_CELLS, RealCell, parse_real_cells
from bench.real import GPU_CONFIG as REAL_GPU_CONFIG
from bench.realistic import PreparedReal
from bench.report import GPU_BEGIN, GPU_END, _ms, _ratio, headline_json, replace_gpu_section
from bench.service import (
    Fixture,
    Plan,
    Running,
    Starter,
    measure,
    served_provider,
    start_naive,
    start_this_service,
)
from export.precision import Precision
from service.repository import load_version

__all__ = [
    "GPU_VARIANTS",
    "default_cells",
    "load_repository",
    "main",
    "prepare_repository",
    "problems",
    "render_section",
    "run_benchmark",
]

log = logging.getLogger("bench.gpu")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
SCHEMA = "bench.gpu/1"
#: PyTorch weights of a prepared model, next to its version folders (ignored by the server).
STATE_DICT_FILE = "torch_state_dict.pt"
MANIFEST_FILE = "bench-gpu.json"
#: module:callable building each benchmark model (for the naive server's --factory).
FACTORIES = {
    "digits_cnn": "bench.models:digits_cnn",
    "mlp": "bench.models:DropoutMLP",
    "cnn32": "bench.models:ConvNet32",
}


VARIANT_KEYS = GPU_VARIANT_KEYS
LETTER = {v.key: v.letter for v in GPU_VARIANTS}

#: GPU calls are short: smaller per-cell budgets than the CPU benchmark, a cap on slow loops.
GPU_CONFIG = EngineBenchConfig(
    min_repeats=5,
    max_repeats=15,
    cell_budget_s=4.0,
    max_cell_s=10.0,
    call_cap_s=2.0,
    probe_samples=10,
    probe_calls=2,
    pause_s=0.002,
)
#: --smoke: every code path once, as fast as possible.
SMOKE_CONFIG = EngineBenchConfig(
    min_repeats=1,
    max_repeats=3,
    cell_budget_s=0.0,
    max_cell_s=0.0,
    call_cap_s=5.0,
    probe_samples=2,
    probe_calls=2,
    pause_s=0.0,
)
#: Wall-clock budget of a run's measuring (exports of realistic models come on top): a GPU
#: host gives a command 10 minutes; leave margin.
DEFAULT_BUDGET_S = 540.0
#: Time kept for the service part when it runs.
SERVICE_RESERVE_S = 95.0
#: Time kept for the realistic cells (6 exports' variants built: sessions of up to 330 MB of
#: weights, PyTorch copies; then 8 cells), and for their service part (one server start).
REAL_RESERVE_S = 240.0
REAL_SERVICE_RESERVE_S = 60.0


def default_cells() -> list[Cell]:
    """Every model x B in (1, 32, 256) x T in (50, 1000), then the large tiles where a GPU
    should win most (the extra cells run last, so a tight budget cuts them first)."""
    grid = [Cell(m, b, t) for m in MODELS for b in (1, 32, 256) for t in (50, 1000)]
    extra = [Cell("digits_cnn", 1, 10_000), Cell("mlp", 256, 10_000), Cell("cnn32", 256, 10_000)]
    return grid + extra


def smoke_cells() -> list[Cell]:
    return [Cell("digits_cnn", 1, 5), Cell("mlp", 3, 7), Cell("cnn32", 2, 4)]


def parse_cells(text: str) -> list[Cell]:
    """``model:B:T,model:B:T`` -> cells."""
    cells = []
    for part in text.split(","):
        name, rows, samples = part.strip().split(":")
        if name not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {name!r} (one of {list(MODELS)})")
        cells.append(Cell(name, int(rows), int(samples)))
    return cells


# ---------------------------------------------------------------- the model repository


def prepare_repository(
    directory: Path, seed: int = 0, names: Sequence[str] = tuple(MODELS)
) -> dict[str, PreparedModel]:
    """Export, verify and publish the benchmark models ``names`` (every one by default) into
    ``directory`` (bench/models.py), with each model's PyTorch weights next to its version
    folder and a small manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    models = prepare_models(list(names), directory, seed=seed)
    for name, model in models.items():
        torch.save(model.mc_model.state_dict(), directory / name / STATE_DICT_FILE)
    manifest = {
        "seed": seed,
        "models": list(models),
        "torch": torch.__version__,
        "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": _command(sys.argv[1:]),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return models


def load_repository(
    directory: Path, names: Sequence[str], seed: int = 0
) -> dict[str, PreparedModel]:
    """The models ``prepare_repository`` published: ONNX versions as the server loads them,
    PyTorch modules from the saved weights (rebuilt from ``seed`` when there are none)."""
    models: dict[str, PreparedModel] = {}
    for name in names:
        spec = MODELS[name]
        mc_model = build_mc_model(spec, seed)
        weights = directory / name / STATE_DICT_FILE
        if weights.exists():
            mc_model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        else:
            log.warning("%s: no %s, PyTorch weights rebuilt from seed %d", name, weights, seed)
        models[name] = PreparedModel(
            spec=spec,
            mc_model=mc_model,
            source=load_version(directory / name, VERSION),
            export_s=0.0,
        )
    return models


# ---------------------------------------------------------------- the device


def _try(info: dict[str, Any], key: str, value: Callable[[], Any]) -> None:
    try:
        info[key] = value()
    except Exception as exc:  # a missing detail must never stop the benchmark
        info[key] = f"unknown ({type(exc).__name__}: {exc})"


def _nvidia_smi() -> dict[str, str]:
    fields = ("name", "driver_version", "memory.total", "clocks.max.sm", "power.limit")
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    first = done.stdout.strip().splitlines()[0]
    return dict(zip(fields, (v.strip() for v in first.split(",")), strict=True))


def _driver_cuda_version() -> str:
    """The CUDA version the driver supports (cuDriverGetVersion), e.g. "13.0"."""
    version = ctypes.c_int()
    if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
        raise RuntimeError("cuDriverGetVersion failed")
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info(device: Device) -> dict[str, Any]:
    """Everything that names the machine and software; every field fails soft."""
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    info: dict[str, Any] = {
        "mode": "cuda" if device.cuda else "cpu-test",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": f"{_cpu_model()}, {len(os.sched_getaffinity(0))} cores usable "
        f"({os.cpu_count()} online)",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "torch_threads": torch.get_num_threads(),
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "torch_cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    }
    if device.cuda:
        _try(info, "torch_cuda_available", torch.cuda.is_available)
        _try(info, "gpu", lambda: torch.cuda.get_device_name(0))
        _try(
            info, "gpu_capability", lambda: ".".join(map(str, torch.cuda.get_device_capability(0)))
        )
        _try(
            info,
            "gpu_memory",
            lambda: f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB",
        )
        _try(info, "torch_cudnn", torch.backends.cudnn.version)
        _try(info, "driver_cuda", _driver_cuda_version)
        _try(info, "nvidia_smi", _nvidia_smi)
        from service.engine.onnx_session import cuda_usable  # noqa: PLC0415

        _try(info, "ort_cuda_usable", cuda_usable)
    return info


# ---------------------------------------------------------------- service level

#: bench/service.py's plan for the GPU host: one model, B = 1, T = 50, one round.
SERVICE_PLAN = Plan(
    concurrencies=(1, 8, 64), rows=(1,), rounds=1, duration_s=3.0, warmup_s=1.0,
    model="digits_cnn", input_name=INPUT_NAME, samples=50,
)  # fmt: skip
SMOKE_SERVICE_PLAN = replace(SERVICE_PLAN, concurrencies=(1, 4), duration_s=0.5, warmup_s=0.3)
#: Least time left for a system to be started at all (start-up + cells).
SYSTEM_MIN_S = 25.0


def _service_starters(device: Device, plan: Plan, providers: dict[str, str]) -> dict[str, Starter]:
    """Every system of the service level, in order; a starter of this service checks that it
    serves ``plan.model`` on the expected provider (recorded in ``providers``)."""
    gpu = "gpu" if device.cuda else "cpu"

    def service(label: str, stem: str, flags: list[str], provider: str) -> Starter:
        @contextlib.contextmanager
        def start(fixture: Fixture, workdir: Path) -> Iterator[Running]:
            flags_ = ["--metrics-port", "-1", *flags]
            with start_this_service(fixture, workdir, flags_, name=label, stem=stem) as running:
                served = served_provider(running.target, plan.model)
                providers[label] = served
                if served != provider:
                    raise NotOnDevice(f"the server runs {plan.model} on {served}, not {provider}")
                yield running

        return start

    starters = {
        f"this service, --device {gpu}": service(
            f"this service, --device {gpu}", "service-gpu", ["--device", gpu], device.provider
        )
    }
    if device.cuda:  # also the other cuDNN algorithm searches (the default is heuristic)
        for algo in ("exhaustive", "default"):
            label = f"this service, --device gpu --cuda-conv-algo-search {algo}"
            flags = ["--device", gpu, "--cuda-conv-algo-search", algo]
            starters[label] = service(label, f"service-gpu-{algo}", flags, device.provider)
    naive = f"naive PyTorch server on {device.torch_device}"
    naive_flags = ["--device", device.torch_device, "--factory", FACTORIES[plan.model],
                   "--model-name", plan.model, "--input-name", plan.input_name]  # fmt: skip
    starters[naive] = functools.partial(start_naive, flags=naive_flags, name=naive)
    cpu = "this service, --device cpu (same host)"
    starters[cpu] = service(cpu, "service-cpu", ["--device", "cpu"], CPU_PROVIDER)
    return starters


def run_service(models_dir: Path, device: Device, plan: Plan, deadline: float) -> dict[str, Any]:
    """bench/service.py's measurement of each system in turn, alone on the host, within the
    run's time budget."""
    spec = MODELS[plan.model]
    out: dict[str, Any] = {"plan": asdict(plan), "providers": {}}
    with tempfile.TemporaryDirectory(prefix="mcd-bench-gpu-service-") as tmp:
        workdir = Path(tmp)
        repository = workdir / "repository"
        shutil.copytree(models_dir / plan.model, repository / plan.model)
        inputs = {rows: workdir / f"rows-{rows}.npy" for rows in plan.rows}
        for rows, path in inputs.items():
            np.save(path, spec.rows(rows, seed=0))
        model_dir = repository / plan.model
        fixture = Fixture(
            repository, model_dir / str(VERSION) / "model.onnx", model_dir / STATE_DICT_FILE, inputs
        )
        starters = _service_starters(device, plan, out["providers"])
        out["systems"] = list(starters)
        out["cells"], out["errors"] = measure(
            plan, fixture, workdir, starters, deadline=deadline, min_system_s=SYSTEM_MIN_S
        )
    return out


# ---------------------------------------------------------------- the run


def _command(argv: Sequence[str]) -> str:
    """The command line that reproduces this run (with PYTHONPATH, which a GPU host may need
    for its onnxruntime-gpu)."""
    executable = Path(sys.executable)
    with contextlib.suppress(ValueError):
        executable = executable.relative_to(Path.cwd())
    command = shlex.join([str(executable), "-m", "bench.gpu", *argv])
    pythonpath = os.environ.get("PYTHONPATH")
    return f"PYTHONPATH={shlex.quote(pythonpath)} {command}" if pythonpath else command


def _process_age_s() -> float:
    """Seconds since this process started (imports included), 0 where /proc cannot tell."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - int(stat[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _write_json(path: Path | None, result: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _prepared(repository: Path | None, seed: int, names: Sequence[str]) -> Iterator[Path]:
    """The model repository to use: the given one, or a fresh export of ``names`` in a
    temporary folder."""
    if repository is not None:
        yield repository
        return
    with tempfile.TemporaryDirectory(prefix="mcd-bench-gpu-") as tmp:
        if names:
            log.info("no --repository: exporting %s into %s", ", ".join(names), tmp)
            prepare_repository(Path(tmp), seed, names)
        yield Path(tmp)


@contextlib.contextmanager
def _real_repository(part: RealPart | None) -> Iterator[Path | None]:
    if part is None:
        yield None
    elif part.repository is not None:
        yield part.repository
    else:
        with tempfile.TemporaryDirectory(prefix="mcd-bench-gpu-real-") as tmp:
            yield Path(tmp)


def run_benchmark(
    *,
    device: Device,
    cells: Sequence[Cell],
    config: EngineBenchConfig,
    repository: Path | None,
    budget_s: float,
    service_plan: Plan | None,
    command: str,
    json_path: Path | None = None,
    variants: Sequence[str] = VARIANT_KEYS,
    started: float | None = None,
    real: RealPart | None = None,
) -> dict[str, Any]:
    """Measure every cell (and the service level, and the realistic part), never raising:
    every failure is recorded in the result, which is also written to ``json_path`` after every
    cell.

    The realistic models are exported (or reused) first; that time is added to the budget, which
    bounds the measuring. Then the small models' cells, the realistic cells, the small models'
    service level and the realistic one, each part keeping time for the ones after it."""
    started = time.monotonic() if started is None else started
    deadline = started + budget_s
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "finished": False,
        "elapsed_s": None,
        "budget_s": budget_s,
        "device": {"mode": "cuda" if device.cuda else "cpu-test"},
        "config": asdict(config),
        "variants": [asdict(v) for v in GPU_VARIANTS if v.key in variants],
        "models": {},
        "cells": [],
        "not_run": [],
        "errors": [],
        "service": None,
        "real": None,
        "headline": {},
    }

    def save() -> None:
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        if result["real"] is not None:
            result["headline"] = gpu_real_headline(result["real"])
        try:
            _write_json(json_path, result)
        except OSError:
            log.exception("cannot write %s", json_path)

    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        result["device"] = device_info(device)
        save()
        with contextlib.ExitStack() as stack:
            prepared: dict[tuple[str, Precision], PreparedReal] = {}
            if real is not None:
                real_dir = stack.enter_context(_real_repository(real))
                assert real_dir is not None
                result["real"] = {"cells": [], "models": {}, "errors": []}
                exporting = time.monotonic()
                try:
                    prepared = prepare_part(real, real_dir)
                except Exception as exc:  # the small models still run
                    result["real"]["errors"].append(f"export failed: {describe_error(exc)}")
                    log.error("realistic export failed:\n%s", traceback.format_exc())
                export_s = time.monotonic() - exporting
                deadline += export_s
                result["real_export_s"] = round(export_s, 1)
                save()
            reserve_real = REAL_RESERVE_S if prepared else 0.0
            reserve_real_service = (
                REAL_SERVICE_RESERVE_S if prepared and real is not None and real.service else 0.0
            )
            reserve_service = SERVICE_RESERVE_S if service_plan is not None else 0.0
            engine_deadline = deadline - reserve_service - reserve_real - reserve_real_service
            names = [n for n in MODELS if any(c.model == n for c in cells)]
            models_dir = stack.enter_context(_prepared(repository, config.seed, names))
            _run_small(
                result,
                cells,
                names,
                models_dir,
                device=device,
                config=config,
                variants=variants,
                deadline=engine_deadline,
                save=save,
            )
            if real is not None and prepared:

                def saved(partial: dict[str, Any]) -> None:
                    result["real"] = {**partial, "errors": result["real"]["errors"]}
                    save()

                errors = result["real"]["errors"]
                result["real"] = {
                    **measure_part(
                        real,
                        prepared,
                        device=device,
                        cells_deadline=deadline - reserve_service - reserve_real_service,
                        saved=saved,
                    ),
                    "errors": errors,
                }
                save()
            if service_plan is not None:
                result["service"] = run_service(
                    models_dir, device, service_plan, deadline - reserve_real_service
                )
                save()
            if real is not None and real.service is not None and prepared:
                result["real"]["service"] = run_real_service(
                    prepared,
                    real.service,
                    device=device,
                    tile_memory_bytes=real.budget(device),
                    deadline=deadline,
                )
    except Exception as exc:  # the result so far is still written
        result["errors"].append(f"run aborted: {describe_error(exc)}")
        log.error("run aborted:\n%s", traceback.format_exc())
    result["finished"] = True
    save()
    return result


def _run_small(
    result: dict[str, Any],
    cells: Sequence[Cell],
    names: Sequence[str],
    models_dir: Path,
    *,
    device: Device,
    config: EngineBenchConfig,
    variants: Sequence[str],
    deadline: float,
    save: Callable[[], None],
) -> None:
    """The small models' cells (bench/models.py), each model's variants built once."""
    models: dict[str, PreparedModel] = {}
    for name in names:  # one model that cannot load must not stop the others
        try:
            models.update(load_repository(models_dir, [name], config.seed))
        except Exception as exc:
            result["models"][name] = {"build_errors": {"load": describe_error(exc)}}
            log.warning("%s: cannot load", name, exc_info=True)
    runners: dict[str, dict[str, Runner]] = {}
    for name, model in models.items():
        runners[name] = _build_model(
            name, model, device=device, config=config, variants=variants, result=result
        )
        save()
    for cell in cells:
        if time.monotonic() > deadline:
            result["not_run"].append(cell.key)
            continue
        result["cells"].append(_run_cell(cell, models, runners, config, deadline))
        save()
    if result["not_run"]:
        log.warning("time budget: not run: %s", ", ".join(result["not_run"]))
    del runners
    gc.collect()
    if device.cuda:
        torch.cuda.empty_cache()


def _build_model(
    name: str,
    model: PreparedModel,
    *,
    device: Device,
    config: EngineBenchConfig,
    variants: Sequence[str],
    result: dict[str, Any],
) -> dict[str, Runner]:
    """Every variant of one model (bench.engine.build_runners); one that cannot be built is
    recorded and left out."""
    built, errors = build_runners(model, variants, config.tile_memory_bytes, device)
    options = next((b.provider_options for b in built.values() if b.provider_options), {})
    result["models"][name] = {
        "title": model.spec.title,
        "activation_bytes_per_row": model.source.config.activation_bytes_per_row,
        "providers": {key: b.providers for key, b in built.items()},
        "details": {key: b.detail for key, b in built.items()},
        "build_errors": errors,
        "cuda_provider_options": options,
    }
    log.info("%s: %s", name, result["models"][name]["providers"])
    return {key: b.runner for key, b in built.items()}


def _run_cell(
    cell: Cell,
    models: Mapping[str, PreparedModel],
    runners: Mapping[str, Mapping[str, Runner]],
    config: EngineBenchConfig,
    deadline: float,
) -> dict[str, Any]:
    model_runners = runners.get(cell.model, {})
    if cell.model not in models or not model_runners:
        why = "the model did not load" if cell.model not in models else "no variant was built"
        return {**CellResult(cell, {}).to_dict(), "errors": {"cell": why}}
    try:
        rows = models[cell.model].spec.rows(cell.num_rows, seed=config.seed)
        cell_result, errors = measure_cell(cell, model_runners, rows, config, deadline=deadline)
    except Exception as exc:
        log.warning("%s failed", cell.key, exc_info=True)
        return {**CellResult(cell, {}).to_dict(), "errors": {"cell": describe_error(exc)}}
    summary = ", ".join(
        f"{k} {m.median_s * 1e3:.2f} ms" if m.times_s else f"{k} {m.skipped}"
        for k, m in cell_result.measurements.items()
    )
    log.info("%s (%d rounds): %s", cell.key, cell_result.rounds, summary)
    return {**cell_result.to_dict(), "errors": errors}


# ---------------------------------------------------------------- the markdown section


def _cell_result(entry: Mapping[str, Any]) -> CellResult:
    cell = Cell(**entry["cell"])
    measurements = {
        key: Measurement(
            times_s=list(m.get("times_s") or []),
            skipped=m.get("skipped"),
            estimate_s=m.get("estimate_s"),
            peak_rss_bytes=m.get("peak_rss_bytes"),
        )
        for key, m in entry.get("measurements", {}).items()
    }
    return CellResult(cell, measurements, int(entry.get("rounds", 0)))


def _rate(value: float) -> str:
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}/s"
    return f"{value:.3g} /s"


def _device_lines(info: Mapping[str, Any], cuda: bool) -> list[str]:
    smi = info.get("nvidia_smi") if isinstance(info.get("nvidia_smi"), dict) else {}
    # Details that could not be read say "unknown (why)"; the why stays in the JSON.
    info = {
        k: "?" if isinstance(v, str) and v.startswith("unknown (") and k != "gpu" else v
        for k, v in info.items()
    }
    lines = []
    if cuda:
        driver = smi.get("driver_version", "unknown") if smi else "unknown"
        lines.append(
            f"- GPU: {info.get('gpu', 'unknown')} (compute capability "
            f"{info.get('gpu_capability', '?')}, {info.get('gpu_memory', '?')}), NVIDIA driver "
            f"{driver} (CUDA {info.get('driver_cuda', '?')})"
            + (
                f", max SM clock {smi.get('clocks.max.sm')}, power limit {smi.get('power.limit')}"
                if smi
                else ""
            )
        )
    lines += [
        f"- Host: {info.get('cpu', 'unknown')}; {info.get('platform', '')}",
        f"- Software: Python {info.get('python')}, torch {info.get('torch')} (CUDA "
        f"{info.get('torch_cuda')}, cuDNN {info.get('torch_cudnn', '-')}; float32 matmul "
        f"precision {info.get('torch_float32_matmul_precision')}, cudnn.benchmark "
        f"{info.get('torch_cudnn_benchmark')}, cuDNN TF32 {info.get('torch_cudnn_allow_tf32')}), "
        f"onnxruntime {info.get('onnxruntime')} (providers offered: "
        f"{', '.join(info.get('ort_available_providers') or [])}), onnx {info.get('onnx')}, "
        f"numpy {info.get('numpy')}",
    ]
    return lines


def _provider_lines(result: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, entry in result.get("models", {}).items():
        used = "; ".join(
            f"({LETTER.get(k, '?')}) {', '.join(p)}" for k, p in entry.get("providers", {}).items()
        )
        lines.append(f"- `{name}`: {used or 'nothing built'}")
        for key, error in entry.get("build_errors", {}).items():
            what = f"({LETTER[key]}) not built" if key in LETTER else f"{key} failed"
            lines.append(f"  - **{what}**: {error}")
    return lines


def _method_lines(result: Mapping[str, Any], cuda: bool) -> list[str]:
    config = result.get("config", {})
    options: dict[str, str] = {}
    for entry in result.get("models", {}).values():
        options = options or entry.get("cuda_provider_options", {})
    shown = ", ".join(
        f"{k}={options[k]}"
        for k in ("cudnn_conv_algo_search", "use_tf32", "arena_extend_strategy", "device_id")
        if k in options
    )
    where = (
        "on the GPU (torch cuda, ONNX Runtime CUDAExecutionProvider)"
        if cuda
        else ("on the CPU (**test mode**: torch cpu, ONNX Runtime CPUExecutionProvider)")
    )
    return [
        "How these figures are measured (`bench/gpu.py`, timing as `bench/engine.py`):",
        "",
        f"- In one process, {where}; the models of `bench/models.py` (random seeded weights,"
        " exported and verified by `export.export_model`), loaded with"
        " `service.repository.load_version`, PyTorch weights from the same export.",
        "- Variants: (a) the usual PyTorch MC dropout loop of T passes of the B rows (dropout in"
        " train mode, `torch.inference_mode`); (b) PyTorch on the [T*B] tile in chunks of the"
        " memory budget; (c) ONNX Runtime, T session runs of the B rows; (d) ONNX Runtime on the"
        " whole tiled graph (`TiledEngine`); (e) this engine, `build_engine` with"
        " `SessionConfig(use_gpu=True)`, what `python -m service --device gpu` runs;"
        ' (f) its one-graph form (`kind="split-graph"`: the Tile at the cut is inside the'
        " graph, so only the B rows cross to the GPU); (g) this engine on the CPU provider of"
        " the same host (all cores), for the GPU-against-CPU ratio. Every variant ends with the"
        " same float64 statistics on the host (`service.maths.uncertainty`), the samples copied"
        " back"
        " from the GPU as the server does.",
        "- Timing: `torch.cuda.synchronize()` before and after every PyTorch call (ONNX Runtime's"
        " `run` returns when its outputs are on the host). Probe calls (each size run twice,"
        " the second timed, so one-off cuDNN algorithm searches do not count) estimate a call;"
        f" a variant estimated above {config.get('call_cap_s', '?')} s per call is skipped for"
        " the cell. Then one full-size warm-up per variant and interleaved rounds (rotating"
        f" start): at least {MIN_ROUNDS}, {config.get('min_repeats', '?')} unless a cell passes"
        f" {config.get('max_cell_s', '?')} s, up to {config.get('max_repeats', '?')} within"
        f" {config.get('cell_budget_s', '?')} s. Median and p10-p90 of the per-call wall time."
        f" Tile memory budget {int(config.get('tile_memory_bytes', 0)) / 2**20:.0f} MiB (the"
        " server's default).",
        "- A variant whose ONNX Runtime sessions do not all report the expected provider first"
        " (`get_providers()[0]`) is refused, never reported."
        + (f" CUDA provider options in use: {shown}." if shown else ""),
        "- Ratios are median / median of variants measured in the same cell of this run:"
        ' "X vs Y" = median time of Y / median time of X.',
    ]


def _model_tables(
    name: str, entries: list[CellResult], errors: list[dict[str, str]], detail: str
) -> list[str]:
    spec = MODELS.get(name)
    lines = [f"### `{name}`: {spec.title if spec else name}", ""]
    if detail:
        lines += [f"(e) is {detail}.", ""]
    header = "| B | T | rounds | " + " | ".join(f"({v.letter}) {v.label}" for v in GPU_VARIANTS)
    lines += [
        "Time per call in ms, median [p10-p90], and **speed-up against (a)**:",
        "",
        header + " |",
        "|---:|---:|---:|" + "---|" * len(GPU_VARIANTS),
    ]
    for result, cell_errors in zip(entries, errors, strict=True):
        cells = []
        for variant in GPU_VARIANTS:
            m = result.measurements.get(variant.key)
            if variant.key in cell_errors:
                cells.append(f"error: {cell_errors[variant.key]}")
            elif m is None:
                cells.append("-")
            elif not m.times_s:
                cells.append(m.skipped or "not timed")
            else:
                low, high = m.spread_s
                text = f"{_ms(m.median_s)} [{_ms(low)}-{_ms(high)}]"
                speedup = result.speedup(variant.key, "torch_loop")
                if variant.key != "torch_loop" and speedup is not None:
                    text += f" **{_ratio(speedup)}**"
                cells.append(text)
        if "cell" in cell_errors:
            cells = [f"cell failed: {cell_errors['cell']}"] + ["-"] * (len(GPU_VARIANTS) - 1)
        lines.append(
            f"| {result.cell.num_rows} | {result.cell.num_samples} | {result.rounds} | "
            + " | ".join(c.replace("|", "/") for c in cells)
            + " |"
        )
    lines += [
        "",
        "Ratios, and the samples per second (B*T / median) of (e):",
        "",
        "| B | T | (e) vs (a) | (e) vs (b) | (e) vs (c) | (e) vs (d) | (f) vs (e) | (e) GPU vs"
        " (g) CPU | (e) samples/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in entries:
        engine = result.measurements.get("engine")
        rate = (
            _rate(result.cell.num_rows * result.cell.num_samples / engine.median_s)
            if engine is not None and engine.times_s
            else "-"
        )
        ratios = [
            result.speedup("engine", "torch_loop"),
            result.speedup("engine", "torch_tiled"),
            result.speedup("engine", "ort_loop"),
            result.speedup("engine", "ort_tiled"),
            result.speedup("engine_split_graph", "engine"),
            result.speedup("engine", "engine_cpu"),
        ]
        lines.append(
            f"| {result.cell.num_rows} | {result.cell.num_samples} | "
            + " | ".join(_ratio(r) for r in ratios)
            + f" | {rate} |"
        )
    lines.append("")
    return lines


def _rows(rows: object) -> str:
    """B of the service plan: a list since bench.service.Plan, an int in older results."""
    return ", ".join(map(str, rows)) if isinstance(rows, list | tuple) else str(rows)


def _service_lines(service: Mapping[str, Any] | None, cuda: bool) -> list[str]:
    if service is None:
        return []
    plan = service.get("plan", {})
    lines = [
        "### Service level over gRPC",
        "",
        f"`{plan.get('model')}`, B = {_rows(plan.get('rows'))} row per request, T ="
        f" {plan.get('samples')}; `bench/loadgen.py`, C closed-loop grpc.aio clients on"
        f" 127.0.0.1, {plan.get('warmup_s')} s warm-up then a {plan.get('duration_s')} s window"
        " per C, one system up at a time, one round (no spread). Systems: `python -m service"
        f" --device {'gpu' if cuda else 'cpu'}` (default settings otherwise, so"
        " `--cuda-conv-algo-search heuristic`; on CUDA also with the other two searches);"
        " the naive server"
        " of `bench/naive_server.py` with its model and T passes on"
        f" {'cuda' if cuda else 'cpu'} (`python -m bench.naive_server --device cuda`, 4 handler"
        " threads); `python -m service --device cpu` on the same host. Throughput is rows x"
        " samples per second of successful calls.",
        "",
    ]
    for error in service.get("errors", []):
        lines.append(f"- **Failure**: {error}")
    if service.get("errors"):
        lines.append("")
    systems = list(service.get("systems", []))
    by_key = {(c["system"], c["concurrency"]): c for c in service.get("cells", [])}
    naive = next((s for s in systems if s.startswith("naive")), None)
    cpu = next((s for s in systems if s.endswith("(same host)")), None)
    lines += [
        "| C | system | rows x samples/s | p50 ms | p99 ms | errors | vs naive | vs --device cpu |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in plan.get("concurrencies", []):
        for system in systems:
            cell = by_key.get((system, c))
            if cell is None:
                lines.append(f"| {c} | {system} | not measured | | | | | |")
                continue

            def ratio(other: str | None, cell: Mapping[str, Any] = cell, c: int = c) -> str:
                base = by_key.get((other, c)) if other else None
                if base is None or not base.get("rows_samples_per_s"):
                    return "-"
                return _ratio(cell["rows_samples_per_s"] / base["rows_samples_per_s"])

            def ms(value: float | None) -> str:
                return "n/a" if value is None else f"{value:.1f}"

            lines.append(
                f"| {c} | {system} | {cell['rows_samples_per_s']:,.0f} | {ms(cell.get('p50_ms'))}"
                f" | {ms(cell.get('p99_ms'))} | {cell.get('errors', 0)} | {ratio(naive)} |"
                f" {ratio(cpu)} |"
            )
    lines.append("")
    return lines


def render_section(result: Mapping[str, Any]) -> str:
    """The markdown section (with its markers) from a result of :func:`run_benchmark` (or its
    JSON file): a pure function of the result, so ``--merge`` re-renders it anywhere."""
    info = result.get("device", {})
    cuda = info.get("mode") == "cuda"
    title = "## GPU (CUDA)" if cuda else "## GPU benchmark in CPU TEST MODE (not GPU figures)"
    finished = "" if result.get("finished") else " **The run did not finish: partial results.**"
    lines = [
        GPU_BEGIN,
        title,
        "",
        "<!-- generated by bench/gpu.py; `python -m bench.gpu --merge RESULT.json` re-renders"
        " it from the run's JSON. Edit the code, not this section. -->",
        "",
        f"Run at {result.get('started_at', '?')} (UTC), {result.get('elapsed_s', '?')} s in"
        f" all.{finished}",
        "",
        f"Command: `{result.get('command', '?')}`",
        "",
        *_device_lines(info, cuda),
        "- Providers actually used, per model and variant:",
        *(f"  {line}" for line in _provider_lines(result)),
    ]
    for error in result.get("errors", []):
        lines.append(f"- **Error**: {error}")
    if result.get("not_run"):
        lines.append(
            f"- **Not run** (time budget {result.get('budget_s')} s): "
            + ", ".join(result["not_run"])
        )
    lines += ["", *_method_lines(result, cuda), ""]
    cells = [(_cell_result(e), e.get("errors", {})) for e in result.get("cells", [])]
    for name in MODELS:
        mine = [(r, e) for r, e in cells if r.cell.model == name]
        if not mine:
            continue
        detail = result.get("models", {}).get(name, {}).get("details", {}).get("engine", "")
        lines += _model_tables(name, [r for r, _ in mine], [e for _, e in mine], detail)
    lines += _service_lines(result.get("service"), cuda)
    lines += real_section_lines(
        result.get("real"), command=str(result.get("command", "?")), cuda=cuda
    )
    lines += shapes_lines(result.get("shapes"))
    if result.get("headline"):
        lines += [
            "### Headline",
            "",
            "Engine time / anchor time (below 1: the engine is faster), and the service's"
            " throughput over the engine's; the run's JSON result carries it as `headline`:",
            "",
            "```json",
            headline_json(result["headline"]),
            "```",
            "",
        ]
    lines.append(GPU_END)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__.splitlines()[0] if __doc__ else None
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", type=Path, metavar="DIR", help="export the models into DIR")
    mode.add_argument(
        "--merge",
        type=Path,
        metavar="FILE",
        help="render RESULT.json (or take a section .md) into --output, between the markers",
    )
    parser.add_argument(
        "--repository", type=Path, help="models prepared by --prepare (default: export now)"
    )
    parser.add_argument("--json", type=Path, help="write the raw results here (after every cell)")
    parser.add_argument("--out", type=Path, help="write the markdown section to this file")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="the document the section goes into (default docs/benchmarks.md): --merge, and a "
        "CUDA run without --out",
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: test mode, no GPU figures"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny cells and budgets (testing)")
    parser.add_argument("--cells", type=parse_cells, help="model:B:T,... instead of the defaults")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget of the run"
    )
    parser.add_argument("--skip-service", action="store_true", help="engine level only")
    parser.add_argument(
        "--skip-small", action="store_true", help="leave out the small models (bench/models.py)"
    )
    parser.add_argument(
        "--skip-real", action="store_true", help="leave out the realistic models (bench/real.py)"
    )
    parser.add_argument(
        "--real-cells",
        type=parse_real_cells,
        help="model:precision:B:T,... instead of the realistic defaults",
    )
    parser.add_argument(
        "--real-repository",
        type=Path,
        metavar="DIR",
        help="export the realistic models into DIR, reusing what an earlier run exported "
        "there (default: a temporary folder, exported every run)",
    )
    parser.add_argument(
        "--prepare-real",
        type=Path,
        metavar="DIR",
        help="only export the realistic models into DIR (for --real-repository DIR)",
    )
    parser.add_argument(
        "--real-tile-memory-bytes",
        type=int,
        help="the engine's budget of one run in the realistic cells (default: 60%% of the "
        "GPU's memory; the server's 256 MiB on the CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def merge(source: Path, output: Path) -> None:
    """Put the section of ``source`` (a result JSON, or a section file) into ``output``."""
    text = source.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        section = render_section(json.loads(text))
    elif GPU_BEGIN in text and GPU_END in text:
        section = text[text.index(GPU_BEGIN) : text.index(GPU_END) + len(GPU_END)] + "\n"
    else:
        raise SystemExit(f"{source}: neither a bench.gpu JSON result nor a marked GPU section")
    existing = output.read_text(encoding="utf-8") if output.exists() else ""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(replace_gpu_section(existing, section), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic() - _process_age_s()  # the budget counts the imports too
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    for noisy in ("export", "service", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.merge is not None:
        merge(args.merge, args.output)
        log.info("merged %s into %s", args.merge, args.output)
        return 0
    if args.prepare is not None:
        prepare_repository(args.prepare, args.seed)
        size = sum(p.stat().st_size for p in args.prepare.rglob("*") if p.is_file())
        log.info("prepared %s (%.1f MB)", args.prepare, size / 1e6)
        return 0
    real = _real_part(args)
    if args.prepare_real is not None:
        prepare_part(replace(real, repository=args.prepare_real), args.prepare_real)
        log.info("prepared the realistic models in %s", args.prepare_real)
        return 0

    device = CUDA if args.device == "cuda" else CPU
    config = SMOKE_CONFIG if args.smoke else GPU_CONFIG
    config = EngineBenchConfig(**{**asdict(config), "seed": args.seed})
    cells = (
        []
        if args.skip_small
        else (args.cells or (smoke_cells() if args.smoke else default_cells()))
    )
    plan = (
        None
        if args.skip_service or args.skip_small
        else (SMOKE_SERVICE_PLAN if args.smoke else SERVICE_PLAN)
    )
    result = run_benchmark(
        device=device,
        cells=cells,
        config=config,
        repository=args.repository,
        budget_s=args.budget_s,
        service_plan=plan,
        command=_command(argv),
        json_path=args.json,
        started=started,
        real=None if args.skip_real else real,
    )
    section = render_section(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(section, encoding="utf-8")
        log.info("wrote %s", args.out)
    elif device.cuda:
        existing = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        args.output.write_text(replace_gpu_section(existing, section), encoding="utf-8")
        log.info("wrote the GPU section of %s", args.output)
    else:  # test mode never touches the committed report unless asked (--out)
        sys.stdout.write(section)
    sys.stdout.write(headline_json(result.get("headline", {})) + "\n")
    found = problems(result)
    log.info(
        "done in %.0f s: %d cells measured, %d not run (time budget), %d problems%s",
        time.monotonic() - started,
        len(result["cells"]),
        len(result["not_run"]),
        len(found),
        "".join(f"\n  {problem}" for problem in found),
    )
    return 1 if found else 0


def problems(result: Mapping[str, Any]) -> list[str]:
    """Everything that failed in a run (the exit status is 1 when there is any)."""
    found = [f"run: {error}" for error in result.get("errors", [])]
    for name, entry in result.get("models", {}).items():
        found += [f"{name} {key}: {e}" for key, e in entry.get("build_errors", {}).items()]
    for cell in result.get("cells", []):
        key = Cell(**cell["cell"]).key
        found += [f"{key} {variant}: {e}" for variant, e in cell.get("errors", {}).items()]
    service = result.get("service") or {}
    found += [f"service: {error}" for error in service.get("errors", [])]
    real = result.get("real") or {}
    found += [f"realistic: {error}" for error in real.get("errors", [])]
    for name, entry in real.get("models", {}).items():
        found += [f"{name} {key}: {e}" for key, e in entry.get("build_errors", {}).items()]
    for cell in real.get("cells", []):
        key = Cell(**cell["cell"]).key
        found += [f"{key} {variant}: {e}" for variant, e in cell.get("errors", {}).items()]
    found += [f"realistic: not run (time budget): {key}" for key in real.get("not_run", [])]
    real_service = real.get("service") or {}
    found += [f"realistic service: {error}" for error in real_service.get("errors", [])]
    return found


def _real_part(args: argparse.Namespace) -> RealPart:
    """The realistic part the command line asks for."""
    smoke = bool(args.smoke)
    cells: list[RealCell] = list(args.real_cells or (GPU_SMOKE_CELLS if smoke else GPU_CELLS))
    return RealPart(
        cells=tuple(cells),
        config=EngineBenchConfig(
            **{**asdict(SMOKE_CONFIG if smoke else REAL_GPU_CONFIG), "seed": args.seed}
        ),
        size="smoke" if smoke else "full",
        repository=args.real_repository,
        service=None
        if args.skip_service
        else (SMOKE_REAL_SERVICE_PLAN if smoke else REAL_SERVICE_PLAN),
        tile_memory_bytes=args.real_tile_memory_bytes,
    )


if __name__ == "__main__":
    raise SystemExit(main())
