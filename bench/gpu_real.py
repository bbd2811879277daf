"""The realistic part of the GPU benchmark (``bench.gpu``): its cells, the service at
concurrency 64 against the engine, the headline and the markdown.

The engine-level cells are ``bench.real``'s (ResNet-50 with a dropout head at B = 32, T = 100;
ViT-B/16 and BERT-base with dropout everywhere at B = 8, T = 20; each in fp32 and fp16, against
the PyTorch anchors in the same precision). The service part starts ``python -m service`` once
with the served models (the ResNet-50 head in fp32 and fp16), drives each with
``bench/loadgen.py`` at C closed-loop clients of one row per request (T = 100), and divides its
rows x samples per second by the engine's at B = C rows in process (what the server's batcher
can at most hand the engine at C = 64), measured in the same run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.engine import Cell, Device, EngineBenchConfig, describe_error
from bench.real import (
    CPU_TILE_MEMORY_BYTES,
    SERVICE_MINIMUM,
    RealCell,
    RealTarget,
    gpu_targets,
    gpu_tile_memory_bytes,
    measure_real,
    real_headline,
    render_real,
)
from bench.realistic import PreparedReal, Size, model_name, prepare_real
from bench.service import Plan, Running, run_loadgen, served_provider
from export.precision import Precision
from tools.launcher import start_service

__all__ = [
    "HEADLINE_KEY",
    "REAL_SERVICE_PLAN",
    "SMOKE_REAL_SERVICE_PLAN",
    "RealPart",
    "RealServicePlan",
    "gpu_real_headline",
    "measure_part",
    "prepare_part",
    "real_section_lines",
    "reference_cells",
    "run_real_service",
    "service_ratios",
]

#: The GPU run's main headline figure: engine time / hand-written PyTorch MC time.
HEADLINE_KEY = "gpu_resnet50_head_b32_t100_engine_vs_torch_prefix_once"
#: Least time left for the service part to start at all.
REAL_SERVICE_MIN_S = 30.0
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class RealServicePlan:
    """The service measurement of the realistic part.

    Attributes:
        model: a key of ``REAL_MODELS`` with one input.
        precisions: the exports served (one server serves them all).
        concurrency: C, closed-loop clients.
        rows: B of one request.
        samples: T of one request.
        duration_s: the measurement window per model.
        warmup_s: warm-up before it.
    """

    model: str = "resnet50_head"
    precisions: tuple[Precision, ...] = ("fp32", "fp16")
    concurrency: int = 64
    rows: int = 1
    samples: int = 100
    duration_s: float = 5.0
    warmup_s: float = 2.0

    def names(self) -> list[str]:
        return [model_name(self.model, p) for p in self.precisions]


REAL_SERVICE_PLAN = RealServicePlan()
SMOKE_REAL_SERVICE_PLAN = RealServicePlan(concurrency=4, samples=5, duration_s=0.5, warmup_s=0.3)


@dataclass(frozen=True)
class RealPart:
    """What the realistic part of a GPU run measures.

    Attributes:
        cells: the engine-level cells (the service's engine cells are added to them).
        config: repeats, budgets and caps of the cells.
        size: "full", or "smoke" (tiny models, for tests).
        repository: export into, and reuse from, this folder (None: a temporary one).
        service: the service measurement (None: not run).
        tile_memory_bytes: the engine's (and (b)'s) budget of one run; None: 60% of the GPU's
            memory on CUDA, the server's default on the CPU.
    """

    cells: tuple[RealCell, ...]
    config: EngineBenchConfig
    size: Size = "full"
    repository: Path | None = None
    service: RealServicePlan | None = REAL_SERVICE_PLAN
    tile_memory_bytes: int | None = None

    def all_cells(self) -> list[RealCell]:
        extra = reference_cells(self.service) if self.service is not None else []
        return [*self.cells, *(c for c in extra if c not in self.cells)]

    def budget(self, device: Device) -> int:
        if self.tile_memory_bytes is not None:
            return self.tile_memory_bytes
        return gpu_tile_memory_bytes() if device.cuda else CPU_TILE_MEMORY_BYTES


def prepare_part(part: RealPart, repository: Path) -> dict[tuple[str, Precision], PreparedReal]:
    """Export (or reuse) every model the part needs (bench.realistic.prepare_real)."""
    wanted = list(dict.fromkeys((c.model, c.precision) for c in part.all_cells()))
    return prepare_real(wanted, repository, size=part.size)


def measure_part(
    part: RealPart,
    prepared: Mapping[tuple[str, Precision], PreparedReal],
    *,
    device: Device,
    cells_deadline: float | None,
    saved: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The engine-level cells of the part (``bench.real.measure_real``), the service's engine
    cells last; the result also names those (``reference_cells``)."""
    reference = reference_cells(part.service) if part.service is not None else []
    real = measure_real(
        prepared,
        part.all_cells(),
        part.config,
        device=device,
        tile_memory_bytes=part.budget(device),
        deadline=cells_deadline,
        saved=saved,
    )
    real["reference_cells"] = [asdict(c.cell) for c in reference]
    real["size"] = part.size
    return real


def reference_cells(plan: RealServicePlan) -> list[RealCell]:
    """The engine cells the service is compared with: B = C x rows, the same T, engine only."""
    return [
        RealCell(plan.model, precision, plan.concurrency * plan.rows, plan.samples, ("engine",))
        for precision in plan.precisions
    ]


def run_real_service(
    prepared: Mapping[tuple[str, Precision], PreparedReal],
    plan: RealServicePlan,
    *,
    device: Device,
    tile_memory_bytes: int,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Serve the plan's models from one ``python -m service`` and load each at C clients.

    Never raises: a failure is recorded in ``errors`` (and the cells measured so far stay).

    Returns:
        ``{"plan", "providers": {model: provider}, "cells": [{model, precision, concurrency,
        rows_samples_per_s, p50_ms, p99_ms, errors}], "errors": [...]}``.
    """
    out: dict[str, Any] = {"plan": asdict(plan), "providers": {}, "cells": [], "errors": []}
    if deadline is not None and deadline - time.monotonic() < REAL_SERVICE_MIN_S:
        out["errors"].append("not run (time budget)")
        return out
    gpu = "gpu" if device.cuda else "cpu"
    try:
        with tempfile.TemporaryDirectory(prefix="mcd-bench-real-service-") as tmp:
            workdir = Path(tmp)
            repository = workdir / "repository"
            models = [prepared[(plan.model, p)] for p in plan.precisions]
            for model in models:
                if len(model.spec.input_names) != 1:
                    raise ValueError(f"{model.name}: the load generator sends one input")
                shutil.copytree(model.source.model_path.parent.parent, repository / model.name)
            inputs = workdir / "rows.npy"
            first = models[0]
            np.save(inputs, first.inputs(plan.rows)[first.spec.input_names[0]])
            flags = [
                "--device",
                gpu,
                "--metrics-port",
                "-1",
                "--tile-memory-bytes",
                str(tile_memory_bytes),
            ]
            server = start_service(
                repository,
                workdir,
                flags,
                name=f"python -m service --device {gpu}",
                stem="service-real",
                start_timeout_s=START_TIMEOUT_S,
            )
            try:
                for model in models:
                    out["providers"][model.name] = served_provider(server.target, model.name)
                    if out["providers"][model.name] != device.provider:
                        raise RuntimeError(
                            f"{model.name} is served on "
                            f"{out['providers'][model.name]}, not {device.provider}"
                        )
                    load = Plan(
                        concurrencies=(plan.concurrency,),
                        rows=(plan.rows,),
                        rounds=1,
                        duration_s=plan.duration_s,
                        warmup_s=plan.warmup_s,
                        model=model.name,
                        input_name=model.spec.input_names[0],
                        samples=plan.samples,
                    )
                    running = Running(server.target, Path(sys.executable), "mcdropout")
                    answer = run_loadgen(running, inputs, load)
                    for cell in answer["cells"]:
                        out["cells"].append(
                            {
                                "model": model.name,
                                "precision": model.precision,
                                **{
                                    k: cell.get(k)
                                    for k in (
                                        "concurrency",
                                        "rows_samples_per_s",
                                        "p50_ms",
                                        "p99_ms",
                                        "errors",
                                    )
                                },
                            }
                        )
            finally:
                server.stop(20.0)
    except Exception as exc:  # the engine figures are still worth reporting
        out["errors"].append(describe_error(exc))
    return out


def _engine_rate(entries: Sequence[Mapping[str, Any]], cell: RealCell) -> float | None:
    """B*T / median of the engine in ``cell`` (rows x samples per second)."""
    for entry in entries:
        if Cell(**entry["cell"]).key != cell.key:
            continue
        engine = entry.get("measurements", {}).get("engine", {})
        if engine.get("times_s"):
            return float(cell.num_rows * cell.num_samples / engine["median_s"])
    return None


def service_ratios(real: Mapping[str, Any]) -> dict[str, float | None]:
    """model name -> the service's rows x samples per second over the engine's (None when one
    of them is missing)."""
    service = real.get("service") or {}
    plan = RealServicePlan(
        **{
            **service.get("plan", {}),
            "precisions": tuple(service.get("plan", {}).get("precisions", ())),
        }
    )
    by_model = {c["model"]: c for c in service.get("cells", [])}
    ratios: dict[str, float | None] = {}
    for cell in reference_cells(plan):
        served = by_model.get(cell.name)
        engine = _engine_rate(real.get("cells", []), cell)
        rate = served.get("rows_samples_per_s") if served else None
        ratios[cell.name] = None if not rate or not engine else float(rate) / engine
    return ratios


def _service_key(plan: RealServicePlan, name: str) -> str:
    return f"gpu_{name}_service_c{plan.concurrency}_vs_engine_b{plan.concurrency * plan.rows}"


def gpu_real_headline(real: Mapping[str, Any]) -> dict[str, float | None]:
    """The realistic part's headline (engine time / anchor time, service / engine), with
    :data:`HEADLINE_KEY` always present (None when it was not measured)."""
    headline: dict[str, float | None] = {HEADLINE_KEY: None}
    reference = {Cell(**c).key for c in (real.get("reference_cells") or [])}
    cells = [e for e in real.get("cells", []) if Cell(**e["cell"]).key not in reference]
    headline.update(real_headline("gpu", cells))
    service = real.get("service")
    if service:
        plan = RealServicePlan(
            **{**service["plan"], "precisions": tuple(service["plan"]["precisions"])}
        )
        for name, ratio in service_ratios(real).items():
            headline[_service_key(plan, name)] = ratio
    return headline


def _service_lines(real: Mapping[str, Any], cuda: bool) -> tuple[list[RealTarget], list[str]]:
    service = real.get("service")
    if not service:
        return [], []
    raw = service["plan"]
    plan = RealServicePlan(**{**raw, "precisions": tuple(raw["precisions"])})
    targets = [
        RealTarget(
            name,
            "service",
            SERVICE_MINIMUM,
            f"{name}: the service at C={plan.concurrency} (B={plan.rows}, T={plan.samples})"
            f" in rows x samples/s over the engine's at B={plan.concurrency * plan.rows}",
        )
        for name in plan.names()
    ]
    ratios = service_ratios(real)
    lines = [
        "",
        f"Service: `python -m service --model-repository REPOSITORY --device"
        f" {'gpu' if cuda else 'cpu'} --metrics-port -1 --tile-memory-bytes"
        f" {real.get('tile_memory_bytes')}` (on 127.0.0.1, port 0, through"
        f" `tools/launcher.py`) serving {', '.join(plan.names())}, loaded by"
        f" `bench/loadgen.py`: C = {plan.concurrency} closed-loop grpc.aio clients on 127.0.0.1,"
        f" B = {plan.rows} row per request, T = {plan.samples}, {plan.warmup_s:g} s warm-up then"
        f" a {plan.duration_s:g} s window per model, one round. The engine figure is (e) at"
        f" B = {plan.concurrency * plan.rows} in process, from the cells above.",
        "",
        "| model | provider | rows x samples/s | p50 ms | p99 ms | errors | engine rows x samples/s"
        " | service / engine |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_model = {c["model"]: c for c in service.get("cells", [])}
    for cell in reference_cells(plan):
        served = by_model.get(cell.name)
        engine = _engine_rate(real.get("cells", []), cell)
        if served is None:
            lines.append(
                f"| {cell.name} | - | not measured | | | | "
                f"{'-' if engine is None else f'{engine:,.0f}'} | - |"
            )
            continue
        ratio = ratios.get(cell.name)

        def ms(value: Any) -> str:
            return "n/a" if value is None else f"{value:.1f}"

        lines.append(
            f"| {cell.name} | {service.get('providers', {}).get(cell.name, '?')} | "
            f"{served['rows_samples_per_s']:,.0f} | {ms(served.get('p50_ms'))} | "
            f"{ms(served.get('p99_ms'))} | {served.get('errors', 0)} | "
            f"{'-' if engine is None else f'{engine:,.0f}'} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    for error in service.get("errors", []):
        lines.append(f"- **Service failure**: {error}")
    return targets, lines


def real_section_lines(real: Mapping[str, Any] | None, *, command: str, cuda: bool) -> list[str]:
    """The realistic part of the GPU section (empty when it did not run)."""
    if not real:
        return []
    lines: list[str] = []
    for error in real.get("errors", []):
        lines.append(f"- **Realistic part failed**: {error}")
    reference = [Cell(**c).key for c in (real.get("reference_cells") or [])]
    cells = [
        RealCell(e["model"], e["precision"], e["cell"]["num_rows"], e["cell"]["num_samples"])
        for e in real.get("cells", [])
        if Cell(**e["cell"]).key not in reference
    ]
    service_targets, service_lines = _service_lines(real, cuda)
    lines += render_real(
        real,
        heading="### Realistic models",
        command=command,
        cuda=cuda,
        targets=[*gpu_targets(cells), *service_targets],
        service=service_ratios(real),
        extra=service_lines,
    )
    return lines
