"""Realistic models: MC dropout requests against PyTorch and deterministic passes.

The CPU part (``bench.run``: MobileNetV3-Small, EfficientNet-B0, a small BERT) and the GPU part
(``bench.gpu``: ResNet-50 with a dropout head, ViT-B/16, BERT-base, fp32 and fp16) are the same
code: the models of ``bench/realistic.py``, the variants of ``bench/anchors.py`` ((a) the
PyTorch loop, (b) hand-written PyTorch MC with the prefix once, (c) one deterministic pass,
(e) this engine, ...), and the timing of ``bench/engine.py`` (probes, one full-size warm-up,
interleaved rounds, median and p10-p90), on a ``bench.engine.Device``.

What is reported per cell (model, precision, B rows, T samples), from medians of one run:

* (e) / (c): the engine's time in deterministic passes of the same B rows (ONNX Runtime on the
  same graph with Dropout removed): what an MC dropout request costs over a plain prediction;
* (e) / (T x (c)): for dropout-everywhere models, against T deterministic passes (all T samples
  must run the whole model; the question is the overhead on top);
* (e) / (b): against hand-written PyTorch MC on the same device and precision;
* (e) / (a): against the PyTorch loop (estimated from its probes when it was too slow to run).

``python -m bench.real --cells mobilenet_v3_small:fp32:16:100`` measures cells on their own
and prints the section (``--device cuda`` on a GPU host; ``--smoke`` for tiny models).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from bench.anchors import (
    FP16_VARIANTS,
    FP32_VARIANTS,
    REAL_VARIANTS,
    build_real_variants,
)
from bench.engine import (
    CPU,
    CUDA,
    MIN_ROUNDS,
    Cell,
    CellResult,
    Device,
    EngineBenchConfig,
    Measurement,
    describe_error,
    measure_cell,
)
from bench.realistic import REAL_MODELS, PreparedReal, Size, model_name, prepare_real
from export.precision import Precision

__all__ = [
    "CPU_CELLS",
    "CPU_FULL_CELLS",
    "CPU_QUICK_CELLS",
    "CPU_SMOKE_CELLS",
    "GPU_CELLS",
    "GPU_CONFIG",
    "GPU_SMOKE_CELLS",
    "CpuPart",
    "RealCell",
    "RealTarget",
    "cell_ratios",
    "cpu_targets",
    "gpu_targets",
    "measure_real",
    "real_headline",
    "render_real",
    "run_cpu",
    "target_lines",
]

log = logging.getLogger("bench.real")

LETTER = {v.key: v.letter for v in REAL_VARIANTS}
#: Variants never skipped for their cost: the ones the targets and the headline divide by.
REQUIRED_VARIANTS = frozenset({"engine", "ort_deterministic", "torch_prefix_once"})
CPU_TILE_MEMORY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RealCell:
    """One realistic benchmark point.

    Attributes:
        model: a key of ``REAL_MODELS``.
        precision: the export measured ("fp16": the half-precision export, PyTorch in float16).
        num_rows: B.
        num_samples: T.
        variants: the variants measured (None: every variant of the precision).
    """

    model: str
    precision: Precision
    num_rows: int
    num_samples: int
    variants: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        """The exported model's name (``resnet50_head_fp16``)."""
        return model_name(self.model, self.precision)

    @property
    def cell(self) -> Cell:
        return Cell(self.name, self.num_rows, self.num_samples)

    @property
    def key(self) -> str:
        return self.cell.key

    def wanted(self) -> tuple[str, ...]:
        if self.variants is not None:
            return self.variants
        return FP16_VARIANTS if self.precision == "fp16" else FP32_VARIANTS


def _cells(
    model: str, shapes: Sequence[tuple[int, int]], precision: Precision = "fp32"
) -> list[RealCell]:
    return [RealCell(model, precision, b, t) for b, t in shapes]


_CNN_SHAPES = ((1, 100), (16, 100), (16, 1000))
_BERT_SHAPES = ((1, 100), (8, 20))
#: The CPU cells of ``make bench``: the issue's (B, T) for the head-dropout CNNs and the BERT.
CPU_FULL_CELLS: tuple[RealCell, ...] = (
    *_cells("mobilenet_v3_small", _CNN_SHAPES),
    *_cells("efficientnet_b0", _CNN_SHAPES),
    *_cells("bert_small", _BERT_SHAPES),
)
#: ``make bench-quick``: one CNN at T = 100 and the BERT at B = 8, T = 20.
CPU_QUICK_CELLS: tuple[RealCell, ...] = (
    *_cells("mobilenet_v3_small", ((1, 100), (16, 100))),
    *_cells("bert_small", ((8, 20),)),
)
CPU_SMOKE_CELLS: tuple[RealCell, ...] = (
    *_cells("mobilenet_v3_small", ((1, 6), (3, 20))),
    *_cells("efficientnet_b0", ((2, 5),)),
    *_cells("bert_small", ((2, 4),)),
)
#: The GPU cells of ``make bench-gpu``, each model in fp32 and fp16.
GPU_CELLS: tuple[RealCell, ...] = tuple(
    RealCell(model, precision, b, t)
    for model, b, t in (("resnet50_head", 32, 100), ("vit_b16", 8, 20), ("bert_base", 8, 20))
    for precision in get_args(Precision)
)
GPU_SMOKE_CELLS: tuple[RealCell, ...] = tuple(
    RealCell(model, precision, b, t)
    for model, b, t in (("resnet50_head", 3, 6), ("vit_b16", 2, 3), ("bert_base", 2, 3))
    for precision in get_args(Precision)
)


def parse_real_cells(text: str) -> list[RealCell]:
    """``model:precision:B:T[:variant+variant...],...`` -> cells (without variants: every
    variant of the precision)."""
    cells = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) not in (4, 5):
            raise argparse.ArgumentTypeError(f"{part!r} is not model:precision:B:T[:variants]")
        model, precision, rows, samples = fields[:4]
        if model not in REAL_MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {model!r} ({list(REAL_MODELS)})")
        if precision not in get_args(Precision):
            raise argparse.ArgumentTypeError(f"precision must be fp32 or fp16, got {precision!r}")
        variants = tuple(fields[4].split("+")) if len(fields) == 5 else None
        unknown = [v for v in variants or () if v not in LETTER]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown variants {unknown} ({list(LETTER)})")
        cells.append(
            RealCell(model, precision, int(rows), int(samples), variants)  # type: ignore[arg-type]
        )
    return cells


# ---------------------------------------------------------------- measuring


def _free(device: Device) -> None:
    gc.collect()
    if device.cuda:
        torch.cuda.empty_cache()


def measure_real(
    prepared: Mapping[tuple[str, Precision], PreparedReal],
    cells: Sequence[RealCell],
    config: EngineBenchConfig,
    *,
    device: Device,
    tile_memory_bytes: int,
    deadline: float | None = None,
    saved: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time every cell, never raising: failures are recorded in the result.

    Cells are grouped by exported model: its variants are built once, its cells measured one
    after the other (variants interleaved within a cell), then everything is freed before the
    next model. A cell left when ``deadline`` (``time.monotonic()``) has passed is not run.

    Args:
        prepared: the exported models, by (key, precision).
        cells: what to measure, in order within each model.
        config: repeats, budgets and caps (its ``tile_memory_bytes`` is not used).
        device: where everything runs.
        tile_memory_bytes: the engine's memory budget of one run; (b) runs as many rows.
        deadline: no cell starts after it.
        saved: called with the result after every cell (to write it out).

    Returns:
        ``{"tile_memory_bytes", "config", "models": {name: {...}}, "cells": [...],
        "not_run": [cell keys]}``.
    """
    result: dict[str, Any] = {
        "tile_memory_bytes": tile_memory_bytes,
        "config": asdict(config),
        "models": {},
        "cells": [],
        "not_run": [],
    }
    groups: dict[tuple[str, Precision], list[RealCell]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.precision), []).append(cell)
    for (key, precision), group in groups.items():
        name = model_name(key, precision)
        if deadline is not None and time.monotonic() > deadline:
            result["not_run"] += [cell.key for cell in group]
            continue
        model = prepared.get((key, precision))
        if model is None:
            result["models"][name] = {"build_errors": {"export": "not exported"}}
            result["cells"] += [_failed(cell, "the model was not exported") for cell in group]
            continue
        variants = list(dict.fromkeys(v for cell in group for v in cell.wanted()))
        built, errors = build_real_variants(
            model, variants, device=device, tile_memory_bytes=tile_memory_bytes
        )
        result["models"][name] = {
            "model": key,
            "precision": precision,
            "family": model.spec.family,
            "title": model.spec.title,
            "size": model.size,
            "dimensions": model.spec.sizes[model.size],
            "export_s": round(model.export_s, 1),
            "activation_bytes_per_row": model.source.config.activation_bytes_per_row,
            "providers": {k: b.providers for k, b in built.items()},
            "details": {k: b.detail for k, b in built.items()},
            "build_errors": errors,
        }
        log.info("%s: built %s; errors %s", name, sorted(built), errors)
        for cell in group:
            if deadline is not None and time.monotonic() > deadline:
                result["not_run"].append(cell.key)
                continue
            calls = {k: built[k].call for k in cell.wanted() if k in built}
            result["cells"].append(_run_cell(cell, model, calls, config, deadline))
            if saved is not None:
                saved(result)
        del built
        _free(device)
    return result


def _failed(cell: RealCell, why: str) -> dict[str, Any]:
    return {**_entry(cell, CellResult(cell.cell, {})), "errors": {"cell": why}}


def _entry(cell: RealCell, result: CellResult) -> dict[str, Any]:
    return {**result.to_dict(), "model": cell.model, "precision": cell.precision}


def _run_cell(
    cell: RealCell,
    model: PreparedReal,
    calls: Mapping[str, Any],
    config: EngineBenchConfig,
    deadline: float | None,
) -> dict[str, Any]:
    if not calls:
        return _failed(cell, "no variant was built")
    try:
        inputs = model.inputs(cell.num_rows, seed=config.seed)
        result, errors = measure_cell(
            cell.cell, calls, inputs, config, deadline=deadline, required=REQUIRED_VARIANTS
        )
    except Exception as exc:  # the other cells go on
        log.warning("%s failed", cell.key, exc_info=True)
        return _failed(cell, describe_error(exc))
    summary = ", ".join(
        f"{k} {m.median_s * 1e3:.2f} ms" if m.times_s else f"{k} {m.skipped}"
        for k, m in result.measurements.items()
    )
    log.info("%s (%d rounds): %s", cell.key, result.rounds, summary)
    return {**_entry(cell, result), "errors": errors}


# ---------------------------------------------------------------- ratios, targets, headline


def _median(measurements: Mapping[str, Any], key: str, *, estimate: bool = False) -> float | None:
    m = measurements.get(key)
    if m is None:
        return None
    if m.get("times_s"):
        value: float = m["median_s"]
        return value
    if estimate and m.get("estimate_s"):
        estimated: float = m["estimate_s"]
        return estimated
    return None


def cell_ratios(entry: Mapping[str, Any]) -> dict[str, float | None]:
    """Engine time over each anchor's, for one measured cell (None where one is missing).

    Keys: ``deterministic`` ((e) / (c)), ``t_deterministic`` ((e) / (T x (c))),
    ``prefix_once`` ((e) / (b)), ``bf16`` ((e) / (b')), ``loop`` ((e) / (a), from (a)'s probe
    estimate when it was skipped; ``loop_estimated`` says so), ``torch_eval`` ((e) / (c')).
    """
    m = entry.get("measurements", {})
    samples = int(entry["cell"]["num_samples"])
    engine = _median(m, "engine")

    def over(value: float | None) -> float | None:
        return None if engine is None or value is None or value <= 0 else engine / value

    deterministic = _median(m, "ort_deterministic")
    loop = _median(m, "torch_loop", estimate=True)
    return {
        "deterministic": over(deterministic),
        "t_deterministic": over(None if deterministic is None else samples * deterministic),
        "prefix_once": over(_median(m, "torch_prefix_once")),
        "bf16": over(_median(m, "torch_prefix_once_bf16")),
        "loop": over(loop),
        "loop_estimated": 1.0 if loop is not None and _median(m, "torch_loop") is None else 0.0,
        "torch_eval": over(_median(m, "torch_eval")),
    }


@dataclass(frozen=True)
class RealTarget:
    """A target of the issue on one cell: ``cell_ratios(cell)[ratio] <= maximum``.

    Attributes:
        cell_key: the cell (``RealCell.key``).
        ratio: a key of :func:`cell_ratios`, or "service" (service over engine throughput).
        maximum: the largest passing value (for "service": the smallest).
        description: one line: what is compared.
    """

    cell_key: str
    ratio: str
    maximum: float
    description: str


Verdict = Literal["PASS", "FAIL", "NOT MEASURED"]


def cpu_targets(cells: Sequence[RealCell]) -> list[RealTarget]:
    """The issue's CPU targets on these cells: a head-dropout CNN request within 2
    deterministic passes at T <= 100 and within 8 at T = 1000; a dropout-everywhere request
    within 1.2x of T deterministic passes."""
    targets = []
    for cell in cells:
        spec = REAL_MODELS[cell.model]
        where = f"{cell.name}, B={cell.num_rows}, T={cell.num_samples}"
        if spec.family == "head":
            limit = 8.0 if cell.num_samples >= 1000 else 2.0
            targets.append(
                RealTarget(
                    cell.key, "deterministic", limit, f"{where}: (e) in deterministic passes (c)"
                )
            )
        else:
            targets.append(
                RealTarget(
                    cell.key,
                    "t_deterministic",
                    1.2,
                    f"{where}: (e) against T deterministic passes (c)",
                )
            )
    return targets


#: Service throughput at C = 64 over the engine's, at least.
SERVICE_MINIMUM = 0.8


def gpu_targets(cells: Sequence[RealCell]) -> list[RealTarget]:
    """The issue's GPU targets: the ResNet-50 head within 1.2x of hand-written PyTorch MC;
    dropout-everywhere models within 1.1x of PyTorch on the tile in the same precision."""
    targets = []
    for cell in cells:
        if cell.variants is not None and "torch_prefix_once" not in cell.variants:
            continue
        spec = REAL_MODELS[cell.model]
        where = f"{cell.name}, B={cell.num_rows}, T={cell.num_samples}"
        if spec.family == "head":
            targets.append(
                RealTarget(
                    cell.key,
                    "prefix_once",
                    1.2,
                    f"{where}: (e) against hand-written PyTorch MC (b)",
                )
            )
        else:
            targets.append(
                RealTarget(
                    cell.key, "prefix_once", 1.1, f"{where}: (e) against PyTorch on the tile (b)"
                )
            )
    return targets


def verdict(target: RealTarget, value: float | None) -> Verdict:
    if value is None:
        return "NOT MEASURED"
    if target.ratio == "service":
        return "PASS" if value >= target.maximum else "FAIL"
    return "PASS" if value <= target.maximum else "FAIL"


def target_lines(
    targets: Sequence[RealTarget],
    entries: Sequence[Mapping[str, Any]],
    service: Mapping[str, float | None] | None = None,
) -> list[str]:
    """One markdown line per target: PASS / FAIL / NOT MEASURED, the figure and the limit."""
    by_key = {Cell(**e["cell"]).key: e for e in entries}
    lines = []
    for target in targets:
        if target.ratio == "service":
            value = (service or {}).get(target.cell_key)
            bound = f">= {target.maximum:g}"
        else:
            entry = by_key.get(target.cell_key)
            value = cell_ratios(entry)[target.ratio] if entry is not None else None
            bound = f"<= {target.maximum:g}"
        figure = "-" if value is None else f"{value:.2f}"
        lines.append(
            f"- **{verdict(target, value)}** {target.description}: {figure} (target {bound})"
        )
    return lines


def real_headline(prefix: str, entries: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Headline ratios (engine time / anchor time) of every measured cell:
    ``{prefix}_{cell}_engine_vs_torch_prefix_once`` (head family) or ``..._vs_torch_tile``
    (dropout everywhere), ``..._engine_vs_deterministic``, and for dropout everywhere
    ``..._engine_vs_t_deterministic``."""
    headline: dict[str, float | None] = {}
    for entry in entries:
        if entry.get("errors", {}).get("cell"):
            continue
        key = Cell(**entry["cell"]).key
        ratios = cell_ratios(entry)
        family = REAL_MODELS[entry["model"]].family
        anchor = "torch_prefix_once" if family == "head" else "torch_tile"
        measured = entry.get("measurements", {})
        if "torch_prefix_once" in measured:
            headline[f"{prefix}_{key}_engine_vs_{anchor}"] = ratios["prefix_once"]
        if "ort_deterministic" in measured:
            headline[f"{prefix}_{key}_engine_vs_deterministic"] = ratios["deterministic"]
            if family == "everywhere":
                headline[f"{prefix}_{key}_engine_vs_t_deterministic"] = ratios["t_deterministic"]
    return headline


# ---------------------------------------------------------------- markdown


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.3f}"


def _x(value: float | None, estimated: bool = False) -> str:
    if value is None:
        return "-"
    return ("~" if estimated else "") + (f"{value:.3g}" if value < 100 else f"{value:.0f}")


def _measurement(m: Mapping[str, Any]) -> Measurement:
    return Measurement(
        times_s=list(m.get("times_s") or []),
        skipped=m.get("skipped"),
        estimate_s=m.get("estimate_s"),
    )


def _model_lines(
    name: str, info: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], reproduce: str
) -> list[str]:
    family = info.get("family", "head")
    prefix_label = (
        "hand-written PyTorch MC, backbone once"
        if family == "head"
        else "PyTorch on the [T*B] tile"
    )
    labels = {**{v.key: v.label for v in REAL_VARIANTS}, "torch_prefix_once": prefix_label}
    keys = [
        v.key for v in REAL_VARIANTS if any(v.key in e.get("measurements", {}) for e in entries)
    ]
    lines = [
        f"#### `{name}`: {info.get('title', name)}",
        "",
        f"{info.get('dimensions', '')}; {info.get('precision', 'fp32')} export"
        + (f" (exported and verified in {info['export_s']:.0f} s)" if info.get("export_s") else "")
        + ". "
        + "; ".join(f"({LETTER.get(k, '?')}) {d}" for k, d in info.get("details", {}).items())
        + ".",
        "",
    ]
    for key, error in info.get("build_errors", {}).items():
        lines += [f"- **({LETTER.get(key, key)}) not built**: {error}", ""]
    lines += [
        "Time per call in ms, median [p10-p90]:",
        "",
        "| B | T | rounds | " + " | ".join(f"({LETTER[k]}) {labels[k]}" for k in keys) + " |",
        "|---:|---:|---:|" + "---|" * len(keys),
    ]
    for entry in entries:
        cells = []
        errors = entry.get("errors", {})
        for key in keys:
            raw = entry.get("measurements", {}).get(key)
            if key in errors:
                cells.append(f"error: {errors[key]}")
            elif raw is None:
                cells.append("-")
            elif not raw.get("times_s"):
                cells.append(raw.get("skipped") or "not timed")
            else:
                m = _measurement(raw)
                low, high = m.spread_s
                cells.append(f"{_ms(m.median_s)} [{_ms(low)}-{_ms(high)}]")
        if "cell" in errors:
            cells = [f"cell failed: {errors['cell']}"] + ["-"] * (len(keys) - 1)
        cell = entry["cell"]
        lines.append(
            f"| {cell['num_rows']} | {cell['num_samples']} | {entry.get('rounds', 0)} | "
            + " | ".join(c.replace("|", "/") for c in cells)
            + " |"
        )
    lines += [
        "",
        "The engine's time over each anchor's (below 1: the engine is faster; ~: against (a)'s"
        " probe estimate, (a) being too slow to time):",
        "",
        "| B | T | (e) ms | (e) / (c): deterministic passes | (e) / (T x (c)) | (e) / (b) |"
        " (e) / (a) | (e) / (c') | (e) / (b') |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        r = cell_ratios(entry)
        engine = _median(entry.get("measurements", {}), "engine")
        cell = entry["cell"]
        lines.append(
            f"| {cell['num_rows']} | {cell['num_samples']} | "
            f"{'-' if engine is None else _ms(engine)} | {_x(r['deterministic'])} | "
            f"{_x(r['t_deterministic'])} | {_x(r['prefix_once'])} | "
            f"{_x(r['loop'], bool(r['loop_estimated']))} | {_x(r['torch_eval'])} | "
            f"{_x(r['bf16'])} |"
        )
    lines += ["", f"One cell on its own: `{reproduce}`.", ""]
    return lines


def render_real(
    result: Mapping[str, Any],
    *,
    heading: str,
    command: str,
    cuda: bool,
    targets: Sequence[RealTarget],
    service: Mapping[str, float | None] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The markdown of a realistic-model part (a pure function of its result).

    Args:
        result: :func:`measure_real`'s result (or its JSON).
        heading: the heading line, e.g. "## Realistic models (CPU)".
        command: the command that produced the figures.
        cuda: GPU figures (else CPU ones).
        targets: the targets checked, as PASS / FAIL lines.
        service: the service ratios of the "service" targets, by their cell key.
        extra: more lines after the targets (the service table).
    """
    config = result.get("config", {})
    tile = int(result.get("tile_memory_bytes", 0))
    device = "cuda" if cuda else "cpu"
    where = (
        "PyTorch on cuda, ONNX Runtime on the CUDA provider"
        if cuda
        else "PyTorch and ONNX Runtime on the CPU (threads = cores, spinning off)"
    )
    smoke = any(info.get("size") == "smoke" for info in result.get("models", {}).values())
    lines = [
        heading,
        "",
        f"Command: `{command}`",
        "",
        *(
            ["**Smoke sizes: tiny models and budgets, not benchmark figures.**", ""]
            if smoke
            else []
        ),
        "Models of `bench/realistic.py` (library code, seeded random weights, BatchNorm"
        " statistics measured on random inputs), each exported by `export.export_model` and"
        f" verified against PyTorch; in one process, {where}. Variants (`bench/anchors.py`):",
        "",
        "- (a) the PyTorch loop: T forward passes of the B rows in MC mode (eval, dropout"
        " modules in train), the softmax statistics accumulated on the device;",
        "- (b) hand-written PyTorch MC, the deterministic part once: a head-dropout CNN runs its"
        " backbone once on the B rows and only the head (from its first dropout) on the [T*B]"
        " tile, sample-major; a dropout-everywhere model has no deterministic part, so (b) is"
        " PyTorch on the [T*B] tile. Runs of the engine's tile rows per run (the same memory"
        " budget); softmax mean, variance, entropy and mutual information on the device;",
        "- (b') (b) under `torch.autocast(dtype=torch.bfloat16)` on the float32 model (half-"
        "precision cells only);",
        "- (c) one deterministic pass of the B rows: ONNX Runtime on the same `model.onnx` with"
        " its default optimizations, which remove Dropout (`EliminateDropout`, which the server"
        " turns off), the random draws of dropout exported without a Dropout node (torchvision's"
        " in-place dropout) made constant; checked deterministic (copies of a row, and two runs,"
        " agree); (c') the same in PyTorch eval mode;",
        "- (e) this engine, `service.engine.runtime.build_engine`, what `python -m service"
        f" --device {'gpu' if cuda else 'cpu'}` runs, with"
        f" `tile_memory_bytes` = {tile / 2**20:,.0f} MiB"
        + (
            "."
            if not cuda
            else " (the server's `--tile-memory-bytes`; the server's default"
            " 256 MiB would cut these tiles into many runs on a GPU with this much memory)."
        ),
        '- fp16 cells: the export with `precision="fp16"` (float16 graph, float32 inputs,'
        " outputs and dropout) for (c) and (e); PyTorch (a), (b), (c') on a `.half()` copy of the"
        " model and float16 inputs, statistics in float32.",
        f"- Timing as `bench/engine.py`: probes estimate a call; a variant estimated above"
        f" {config.get('call_cap_s', '?')} s per call is skipped for the cell, except (b), (c)"
        " and (e); then one full-size warm-up each and interleaved rounds (rotating start): at"
        f" least {MIN_ROUNDS}, {config.get('min_repeats', '?')} unless a cell passes"
        f" {config.get('max_cell_s', '?')} s, up to {config.get('max_repeats', '?')} within"
        f" {config.get('cell_budget_s', '?')} s; median and p10-p90 of the per-call wall time"
        + (", `torch.cuda.synchronize()` around every PyTorch call." if cuda else "."),
        "",
        "Targets:",
        "",
        *target_lines(targets, result.get("cells", []), service),
        *extra,
        "",
    ]
    if result.get("not_run"):
        lines += [f"**Not run** (time budget): {', '.join(result['not_run'])}", ""]
    entries = list(result.get("cells", []))
    for name, info in result.get("models", {}).items():
        mine = [e for e in entries if e["cell"]["model"] == name]
        if not mine and not info.get("build_errors"):
            continue
        first = mine[0]["cell"] if mine else {"num_rows": 1, "num_samples": 100}
        reproduce = shlex.join(
            [
                "python",
                "-m",
                "bench.real",
                "--device",
                device,
                "--cells",
                f"{info.get('model', name)}:{info.get('precision', 'fp32')}:"
                f"{first['num_rows']}:{first['num_samples']}",
            ]
        )
        if info.get("size") == "smoke":
            reproduce += " --smoke"
        lines += _model_lines(name, info, mine, reproduce)
    return lines


# ---------------------------------------------------------------- the CPU part (bench.run)

Mode = Literal["full", "quick", "smoke"]

CPU_CONFIGS: Mapping[Mode, EngineBenchConfig] = {
    "full": EngineBenchConfig(
        min_repeats=5, max_repeats=15, cell_budget_s=20.0, max_cell_s=45.0, call_cap_s=15.0
    ),
    "quick": EngineBenchConfig(
        min_repeats=3, max_repeats=8, cell_budget_s=6.0, max_cell_s=15.0, call_cap_s=5.0
    ),
    "smoke": EngineBenchConfig(
        min_repeats=1, max_repeats=3, cell_budget_s=0.0, max_cell_s=0.0, call_cap_s=5.0,
        probe_samples=2, probe_calls=2, pause_s=0.0,
    ),
}  # fmt: skip
CPU_CELLS: Mapping[Mode, tuple[RealCell, ...]] = {
    "full": CPU_FULL_CELLS,
    "quick": CPU_QUICK_CELLS,
    "smoke": CPU_SMOKE_CELLS,
}
#: The GPU cells: calls of 5 ms (ResNet-50 head) to about 0.5 s (its PyTorch loop).
GPU_CONFIG = EngineBenchConfig(
    min_repeats=5, max_repeats=15, cell_budget_s=6.0, max_cell_s=15.0, call_cap_s=3.0,
    probe_samples=10, probe_calls=2, pause_s=0.002,
)  # fmt: skip
#: Wall-clock budget of the CPU cells (exports not counted): no cell starts after it.
CPU_BUDGET_S: Mapping[Mode, float] = {"full": 420.0, "quick": 90.0, "smoke": 600.0}
CPU_HEADING = "## Realistic models (CPU)"


@dataclass(frozen=True)
class CpuPart:
    """The CPU part's outcome.

    Attributes:
        result: :func:`measure_real`'s result (``None`` when the export failed).
        markdown: the section.
        headline: its headline ratios.
        error: why it did not run (``None`` when it did).
    """

    result: dict[str, Any] | None
    markdown: str
    headline: dict[str, float | None]
    error: str | None = None


def run_cpu(
    mode: Mode,
    *,
    command: str,
    repository: Path | None = None,
    cells: Sequence[RealCell] | None = None,
    config: EngineBenchConfig | None = None,
) -> CpuPart:
    """Export (or reuse) the CPU models and measure their cells: ``bench.run``'s realistic
    section. Never raises (a failure is in the section and in ``error``).

    Args:
        mode: "full" (``make bench``), "quick" (``make bench-quick``) or "smoke" (tests: tiny
            models and budgets).
        command: the command that produced the figures, for the section.
        repository: export into, and reuse from, this folder (None: a temporary one).
        cells: instead of the mode's cells.
        config: instead of the mode's timing settings.
    """
    chosen = list(cells if cells is not None else CPU_CELLS[mode])
    size: Size = "smoke" if mode == "smoke" else "full"
    try:
        with _repository(repository) as folder:
            wanted = list(dict.fromkeys((c.model, c.precision) for c in chosen))
            prepared = prepare_real(wanted, folder, size=size)
            deadline = time.monotonic() + CPU_BUDGET_S[mode]
            result = measure_real(
                prepared,
                chosen,
                config or CPU_CONFIGS[mode],
                device=CPU,
                tile_memory_bytes=CPU_TILE_MEMORY_BYTES,
                deadline=deadline,
            )
    except Exception as exc:  # the rest of the report is still worth writing
        log.exception("the realistic CPU part failed")
        error = describe_error(exc)
        markdown = f"{CPU_HEADING}\n\nCommand: `{command}`\n\n**Failed**: {error}\n"
        return CpuPart(None, markdown, {}, error)
    lines = render_real(
        result, heading=CPU_HEADING, command=command, cuda=False, targets=cpu_targets(chosen)
    )
    return CpuPart(result, "\n".join(lines), real_headline("cpu", result["cells"]))


# ---------------------------------------------------------------- command line


def _config(smoke: bool, cuda: bool) -> EngineBenchConfig:
    if smoke:
        return CPU_CONFIGS["smoke"]
    return GPU_CONFIG if cuda else CPU_CONFIGS["full"]


@contextlib.contextmanager
def _repository(folder: Path | None) -> Iterator[Path]:
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="mcd-bench-real-") as tmp:
        yield Path(tmp)


def gpu_tile_memory_bytes(fraction: float = 0.6) -> int:
    """The realistic GPU cells' tile budget: a fraction of the device's memory.

    The engine sizes its runs from the peak memory of a row on the tile, twice over (the
    arena grows in powers of two): tens of MB for ViT-B/16 and BERT-base at full size, so the
    server's default 256 MiB holds only a few samples per run, far below what an H200 holds.
    On a GPU the operator raises ``--tile-memory-bytes``; this benchmark gives both the engine
    and (b) the same budget, most of the device (the rest for weights and the arena's slack).
    """
    return int(torch.cuda.get_device_properties(0).total_memory * fraction)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure realistic cells on their own and print their section (and a JSON line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m bench.real", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cells", type=parse_real_cells, help="model:precision:B:T,...")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models and budgets")
    parser.add_argument("--repository", type=Path, help="export into (and reuse from) DIR")
    parser.add_argument("--tile-memory-bytes", type=int, help="the engine's budget of one run")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    for noisy in ("export", "service", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = CUDA if args.device == "cuda" else CPU
    size: Size = "smoke" if args.smoke else "full"
    default = (
        (GPU_SMOKE_CELLS if args.smoke else GPU_CELLS)
        if device.cuda
        else (CPU_SMOKE_CELLS if args.smoke else CPU_FULL_CELLS)
    )
    cells = list(args.cells or default)
    tile = args.tile_memory_bytes or (
        gpu_tile_memory_bytes() if device.cuda else CPU_TILE_MEMORY_BYTES
    )
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with _repository(args.repository) as repository:
        wanted = list(dict.fromkeys((c.model, c.precision) for c in cells))
        prepared = prepare_real(wanted, repository, size=size)
        result = measure_real(
            prepared, cells, _config(args.smoke, device.cuda), device=device, tile_memory_bytes=tile
        )
    command = shlex.join(["python", "-m", "bench.real", *argv])
    targets = gpu_targets(cells) if device.cuda else cpu_targets(cells)
    heading = f"## Realistic models ({'GPU' if device.cuda else 'CPU'})"
    markdown = render_real(
        result, heading=heading, command=command, cuda=device.cuda, targets=targets
    )
    sys.stdout.write("\n".join(markdown) + "\n")
    headline = real_headline("gpu" if device.cuda else "cpu", result["cells"])
    if args.json is not None:
        args.json.write_text(json.dumps({**result, "headline": headline}, indent=1, default=str))
    sys.stdout.write(json.dumps(headline) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
