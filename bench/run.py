"""Run the benchmarks and write docs/benchmarks.md: ``python -m bench.run [--quick]``.

Full mode measures every cell of the engine benchmark (3 models x B in {1, 32, 256} x T in
{10, 50, 1000}, about 15 minutes on 2 cores), the realistic models of ``bench.real``
(MobileNetV3-Small and EfficientNet-B0 at (B, T) = (1, 100), (16, 100), (16, 1000) and a small
BERT at (1, 100), (8, 20) against PyTorch and deterministic passes: their export and about 7
minutes) and the full service benchmark; ``--quick`` a representative subset (B=32 T=50 on
every model, B=1 T=1000 on the digits CNN, MobileNetV3-Small at T = 100 and the BERT at
(8, 20), and the service benchmark's quick mode) in about 5 minutes. Progress goes to stderr;
stdout gets one JSON line of headline ratios at the end, e.g.
``{"digits_cnn_b32_t50_speedup_vs_torch_loop": 250.1, ...}``.

Exit status: 0 when every part ran, 1 when the service part or the realistic part failed
(the report and the JSON line are still written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.engine import (
    Cell,
    CellResult,
    EngineBenchConfig,
    engine_class,
    measure_cells,
    measure_peak_memory,
    set_torch_threads,
)
from bench.flops import MatmulRate, ModelFlops, count_model_flops, measure_matmul
from bench.models import MODELS, prepare_models
from bench.real import CpuPart, run_cpu
from bench.report import EngineSection, extract_gpu_section, headline_json, render

__all__ = ["engine_headline", "full_cells", "main", "quick_cells"]

log = logging.getLogger("bench.run")

DEFAULT_OUTPUT = Path("docs/benchmarks.md")

# Quick: small budgets; the B=32, T=50 cells (REQUIRED_CELLS) are never skipped.
QUICK_CONFIG = EngineBenchConfig(
    min_repeats=5, max_repeats=15, cell_budget_s=5.0, max_cell_s=15.0, call_cap_s=3.0
)
FULL_CONFIG = EngineBenchConfig(
    min_repeats=5, max_repeats=25, cell_budget_s=20.0, max_cell_s=60.0, call_cap_s=10.0
)

#: (cell, baseline variant) pairs reported as ``<cell>_speedup_vs_<baseline>``.
HEADLINE_SPEEDUPS: tuple[tuple[str, str], ...] = (
    ("digits_cnn_b32_t50", "torch_loop"),
    ("digits_cnn_b32_t50", "ort_tiled"),
    ("mlp_b32_t50", "torch_loop"),
    ("mlp_b32_t50", "ort_tiled"),
    ("cnn32_b32_t50", "torch_loop"),
    ("cnn32_b32_t50", "ort_tiled"),
    ("digits_cnn_b1_t1000", "torch_loop"),
    ("digits_cnn_b1_t1000", "ort_tiled"),
    ("cnn32_b256_t1000", "ort_loop"),
)
#: Cells measured whatever a call costs: the targets and the main headline ratios need them.
REQUIRED_CELLS = frozenset({"digits_cnn_b32_t50", "mlp_b32_t50", "cnn32_b32_t50"})
#: Cells whose engine FLOP/s, as a fraction of the matmul rate, are in the headline.
HEADLINE_FLOPS: tuple[str, ...] = ("cnn32_b32_t50", "mlp_b32_t50")


#: Below this 1-minute load average per core the machine counts as quiet.
QUIET_LOAD_PER_CORE = 0.25


def quick_cells() -> list[Cell]:
    """The representative subset: the target cells plus one large-T, single-row cell."""
    return [
        Cell("digits_cnn", 32, 50),
        Cell("digits_cnn", 1, 1000),
        Cell("mlp", 32, 50),
        Cell("cnn32", 32, 50),
    ]


def full_cells() -> list[Cell]:
    """Every model x B in (1, 32, 256) x T in (10, 50, 1000)."""
    return [Cell(m, b, t) for m in MODELS for b in (1, 32, 256) for t in (10, 50, 1000)]


def _is_b32_t50(cell: Cell) -> bool:
    return cell.num_rows == 32 and cell.num_samples == 50


def engine_headline(
    results: Sequence[CellResult], flops: dict[str, ModelFlops], matmul: MatmulRate
) -> dict[str, float | None]:
    """Headline ratios of the cells that were measured (None where a variant was skipped)."""
    by_key = {r.cell.key: r for r in results}
    headline: dict[str, float | None] = {}
    for cell_key, baseline in HEADLINE_SPEEDUPS:
        if cell_key in by_key:
            headline[f"{cell_key}_speedup_vs_{baseline}"] = by_key[cell_key].speedup(
                "engine", baseline
            )
    for cell_key in HEADLINE_FLOPS:
        result = by_key.get(cell_key)
        if result is None or result.cell.model not in flops:
            continue
        engine = result.measurements["engine"]
        useful = flops[result.cell.model].useful(result.cell.num_rows, result.cell.num_samples)
        headline[f"{cell_key}_engine_flops_vs_matmul"] = (
            useful / engine.median_s / matmul.flops_per_s if engine.times_s else None
        )
    return headline


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> str:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            kib = int(meminfo.readline().split()[1])
        return f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine_info(threads: int) -> dict[str, str]:
    """Label -> value lines naming the machine and the software versions."""
    load = os.getloadavg()
    return {
        "CPU": f"{_cpu_model()} ({platform.machine()}), {threads} cores usable "
        f"({os.cpu_count()} online), {_memory_total()} RAM",
        "Threads": f"PyTorch {torch.get_num_threads()}, ONNX Runtime intra-op {threads} "
        "(one per core), spinning off",
        "Software": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__} (CPU provider), onnx {onnx.__version__}, "
        f"numpy {np.__version__}; {platform.platform()}",
        "Load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in load)
        + (
            " - other processes were busy: every time is inflated, the PyTorch variants most"
            if load[0] > 2 * QUIET_LOAD_PER_CORE * threads
            else ""
        ),
    }


def wait_until_quiet(max_wait_s: float, max_load: float) -> None:
    """Sleep until the 1-minute load average is below ``max_load``, at most ``max_wait_s``."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        log.info("load average %.2f >= %.2f: waiting", os.getloadavg()[0], max_load)
        time.sleep(10.0)


def _command(argv: Sequence[str]) -> str:
    executable = Path(sys.executable)
    with contextlib.suppress(ValueError):  # outside the working directory: keep it absolute
        executable = executable.relative_to(Path.cwd())
    return shlex.join([str(executable), "-m", "bench.run", *argv])


def _run_service(quick: bool) -> tuple[dict[str, Any] | None, str | None, bool]:
    """(result, note when absent or failed, failed)."""
    try:
        from bench import service as service_bench  # noqa: PLC0415 (optional part)
    except ModuleNotFoundError as error:
        if error.name != "bench.service":
            raise
        note = "bench/service.py is not present: the service-level benchmark did not run."
        log.warning(note)
        return None, note, False
    try:
        return service_bench.run(quick), None, False
    except Exception as error:  # the engine results are still worth writing
        log.exception("the service benchmark failed")
        return None, f"The service benchmark failed: {type(error).__name__}: {error}", True


def _run_engine(quick: bool, threads: int) -> tuple[EngineSection, dict[str, float | None]]:
    config = QUICK_CONFIG if quick else FULL_CONFIG
    cells = quick_cells() if quick else full_cells()
    names = [name for name in MODELS if any(c.model == name for c in cells)]
    with tempfile.TemporaryDirectory(prefix="mcd-bench-") as tmp:
        repository = Path(tmp)
        log.info("exporting %s into %s", ", ".join(names), repository)
        models = prepare_models(names, repository, seed=config.seed)
        flops = {name: count_model_flops(model.model_path) for name, model in models.items()}
        engine_classes = {name: engine_class(model, config) for name, model in models.items()}
        log.info("measuring the matmul rate")
        matmul_before = measure_matmul()
        log.info("timing %d cells", len(cells))
        results = measure_cells(models, cells, config, required=REQUIRED_CELLS)
        matmul_after = measure_matmul()
        log.info("measuring peak memory in child processes")
        measure_peak_memory(
            results, repository, config, threads, only=_is_b32_t50 if quick else None
        )
    memory_note = (
        ("in this quick mode for the B=32, T=50 cells only: " if quick else "")
        + "peak RSS of one call above the RSS just before it, measured after the timing in a"
        " child process per model, each variant and cell with freshly built sessions and one"
        " T=1 call before (`malloc_trim`, then the peak mark reset through"
        " `/proc/self/clear_refs`). Differences of a few MiB are within the method's noise"
        " (allocator reuse between the variants of one child)."
    )
    section = EngineSection(
        results=results,
        config=config,
        flops=flops,
        matmul=max(matmul_before, matmul_after, key=lambda rate: rate.flops_per_s),
        matmul_runs=(matmul_before, matmul_after),
        engine_classes=engine_classes,
        memory_note=memory_note,
    )
    return section, engine_headline(results, flops, section.matmul)


def _existing_gpu_section(path: Path) -> str | None:
    """The GPU section of the report about to be replaced, if it has one."""
    try:
        return extract_gpu_section(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="representative subset, ~5 min")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="markdown report to write"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write every measurement to this JSON file"
    )
    parser.add_argument("--skip-service", action="store_true", help="engine benchmark only")
    parser.add_argument(
        "--skip-real", action="store_true", help="leave out the realistic models (bench.real)"
    )
    parser.add_argument(
        "--real-repository",
        type=Path,
        metavar="DIR",
        help="export the realistic models into DIR, reusing what an earlier run exported there "
        "(default: a temporary folder, exported every run)",
    )
    parser.add_argument(
        "--wait-quiet-s",
        type=float,
        default=0.0,
        help="first wait up to this long for the 1-minute load average to drop below "
        f"{QUIET_LOAD_PER_CORE} per core (for shared machines)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    for noisy in ("export", "service", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    started = time.perf_counter()
    started_at = datetime.now(UTC)
    threads = len(os.sched_getaffinity(0))
    if args.wait_quiet_s > 0:
        wait_until_quiet(args.wait_quiet_s, QUIET_LOAD_PER_CORE * threads)
    set_torch_threads(threads)
    machine = machine_info(threads)

    engine, headline = _run_engine(args.quick, threads)
    engine_s = time.perf_counter() - started
    log.info("engine benchmark done in %.0f s", engine_s)

    real: CpuPart | None = None
    real_s = 0.0
    if not args.skip_real:
        real_started = time.perf_counter()
        real = run_cpu(
            "quick" if args.quick else "full",
            command=_command(argv),
            repository=args.real_repository,
        )
        headline.update(real.headline)
        real_s = time.perf_counter() - real_started
        log.info("realistic models done in %.0f s", real_s)

    service: dict[str, Any] | None = None
    service_note: str | None = "skipped (--skip-service)"
    service_failed = False
    if not args.skip_service:
        service, service_note, service_failed = _run_service(args.quick)
    if service is not None:
        headline.update(service.get("headline", {}))

    machine["Load average at the end (1, 5, 15 min; includes this run)"] = ", ".join(
        f"{x:.2f}" for x in os.getloadavg()
    )
    elapsed_s = time.perf_counter() - started
    mode = "quick subset (`--quick`)" if args.quick else "full"
    title_note = (
        f"Mode: {mode}. Run at {started_at:%Y-%m-%d %H:%M} UTC; engine part {engine_s:.0f} s, "
        + (f"realistic models {real_s:.0f} s, " if real is not None else "")
        + f"total {elapsed_s:.0f} s."
    )
    markdown = render(
        title_note=title_note,
        machine=machine,
        command=_command(argv),
        engine=engine,
        service_markdown=service.get("markdown") if service is not None else None,
        service_note=service_note,
        headline=headline,
        # The GPU section (python -m bench.gpu, measured on another machine) stays as it is.
        gpu_section=_existing_gpu_section(args.output),
        real_markdown=real.markdown if real is not None else None,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown, encoding="utf-8")
    log.info("wrote %s in %.0f s", args.output, elapsed_s)
    if args.json is not None:
        raw = {
            "headline": headline,
            "machine": machine,
            "command": _command(argv),
            "engine": [result.to_dict() for result in engine.results],
            "service": service.get("results") if service is not None else None,
            "real": real.result if real is not None else None,
        }
        args.json.write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    sys.stdout.write(headline_json(headline) + "\n")
    return 1 if service_failed or (real is not None and real.error is not None) else 0


if __name__ == "__main__":
    raise SystemExit(main())
