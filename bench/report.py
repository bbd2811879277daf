"""Renders docs/benchmarks.md from the measurements (pure formatting, no measuring here)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.engine import MIN_ROUNDS, VARIANTS, CellResult, EngineBenchConfig
from bench.flops import MatmulRate, ModelFlops
from bench.models import MODELS

__all__ = [
    "GPU_BEGIN",
    "GPU_END",
    "TARGETS",
    "EngineSection",
    "Target",
    "extract_gpu_section",
    "headline_json",
    "render",
    "replace_gpu_section",
    "target_rows",
]

#: The GPU section (bench/gpu.py) lies between these lines; bench/run.py keeps it as it is.
GPU_BEGIN = "<!-- gpu:begin -->"
GPU_END = "<!-- gpu:end -->"


@dataclass(frozen=True)
class Target:
    """A speed-up the issue asks for: ``headline[key] >= minimum``."""

    key: str
    description: str
    minimum: float


TARGETS: tuple[Target, ...] = (
    Target(
        "digits_cnn_b32_t50_speedup_vs_torch_loop",
        "digits CNN, B=32, T=50: (e) this engine against (a) the PyTorch loop",
        80.0,
    ),
    Target(
        "digits_cnn_b32_t50_speedup_vs_ort_tiled",
        "digits CNN, B=32, T=50: (e) this engine against (d) ONNX Runtime on the whole tiled graph",
        20.0,
    ),
    Target(
        "mlp_b32_t50_speedup_vs_torch_loop",
        "MLP, B=32, T=50: (e) this engine against (a) the PyTorch loop",
        3.0,
    ),
)


@dataclass(frozen=True)
class EngineSection:
    """Everything the engine part of the report shows.

    Attributes:
        results: the measured cells.
        config: the timing settings used.
        flops: FLOPs per row of each model.
        matmul: the machine's matmul rate: the faster of ``matmul_runs``.
        matmul_runs: the matmul rate measured before and after the engine cells.
        engine_classes: model -> the class build_engine returned.
        memory_note: how peak memory was measured (or why not).
    """

    results: Sequence[CellResult]
    config: EngineBenchConfig
    flops: Mapping[str, ModelFlops]
    matmul: MatmulRate
    matmul_runs: tuple[MatmulRate, ...]
    engine_classes: Mapping[str, str]
    memory_note: str


# ---------------------------------------------------------------- number formatting


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio >= 100:
        return f"{ratio:.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"


def _si(value: float, unit: str = "") -> str:
    """3 significant digits with k / M / G / T."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f} MiB"


# ---------------------------------------------------------------- sections


def _method(config: EngineBenchConfig, memory_note: str) -> list[str]:
    return [
        "How the engine figures are measured (`bench/engine.py`):",
        "",
        "- In one process, on the CPU, each model exported by `export.export_model` (dropout"
        " kept active, verified against PyTorch) into a temporary repository and loaded back"
        " with `service.repository.load_version`. Random (seeded) weights and inputs.",
        "- Variants: (a) the usual PyTorch MC dropout code, a loop of T forward passes of the B"
        " rows with dropout in train mode (`mc_dropout_copy`, `torch.inference_mode`,"
        " `torch.set_num_threads(cores)`); (b) PyTorch on the [T*B] tile, chunked to the same"
        " memory budget as (d); (c) ONNX Runtime, a loop of T session runs of the B rows;"
        " (d) ONNX Runtime on the whole tiled graph (`service.engine.runtime.TiledEngine`);"
        " (e) this engine (`service.engine.runtime.build_engine`, what the server runs)."
        " ONNX Runtime"
        " sessions come from `service.engine.onnx_session.create_session` with the server's CPU"
        " settings (threads = cores, spinning off).",
        "- Every variant ends with the same statistics, the server's float64 classification"
        " statistics of the (T, B, 10) logits (`service.maths.uncertainty`: mean and unbiased"
        " variance of the softmax per element, entropies, mutual information, votes).",
        f"- Timing: probe calls with fewer samples (T = {config.probe_samples}, then 10x more"
        " while needed) estimate each variant's call time, linearly in T; a variant estimated"
        f" above {config.call_cap_s:g} s per call is skipped for that cell (never in the B=32,"
        " T=50 cells, which the targets need). Then one full-size"
        " warm-up per variant, and the variants interleaved in rounds (the starting variant"
        f" rotates each round): at least {MIN_ROUNDS} rounds, {config.min_repeats} unless a"
        f" cell's rounds pass {config.max_cell_s:g} s, and more up to {config.max_repeats}"
        f" while within {config.cell_budget_s:g} s."
        " Figures are the median and the p10-p90 spread of the per-call wall time."
        " Tile memory budget"
        f" {config.tile_memory_bytes / 2**20:.0f} MiB (the server's default).",
        "- Speed-up = median time of (a) / median time of the variant; samples/s = B*T / median"
        " time.",
        f"- Peak memory: {memory_note}",
    ]


def _cell_table(results: Sequence[CellResult]) -> list[str]:
    header = "| B | T | rounds | " + " | ".join(f"({v.letter}) {v.label}" for v in VARIANTS) + " |"
    lines = [header, "|---:|---:|---:|" + "---|" * len(VARIANTS)]
    for result in results:
        cells = []
        for variant in VARIANTS:
            m = result.measurements.get(variant.key)
            if m is None:
                cells.append("-")
            elif not m.times_s:
                cells.append(m.skipped or "skipped")
            else:
                low, high = m.spread_s
                text = f"{_ms(m.median_s)} [{_ms(low)}-{_ms(high)}]"
                speedup = result.speedup(variant.key)
                if variant.key != "torch_loop" and speedup is not None:
                    text += f" **{_ratio(speedup)}**"
                cells.append(text)
        lines.append(
            f"| {result.cell.num_rows} | {result.cell.num_samples} | {result.rounds} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _throughput_table(results: Sequence[CellResult]) -> list[str]:
    header = "| B | T | " + " | ".join(f"({v.letter})" for v in VARIANTS) + " |"
    lines = [header, "|---:|---:|" + "---|" * len(VARIANTS)]
    for result in results:
        samples = result.cell.num_rows * result.cell.num_samples
        cells = []
        for variant in VARIANTS:
            m = result.measurements.get(variant.key)
            if m is None or not m.times_s:
                cells.append("-")
            else:
                cells.append(f"{_si(samples / m.median_s, '/s')}, {_mib(m.peak_rss_bytes)}")
        lines.append(
            f"| {result.cell.num_rows} | {result.cell.num_samples} | " + " | ".join(cells) + " |"
        )
    return lines


def _flops_rows(section: EngineSection) -> list[str]:
    rate = section.matmul.flops_per_s
    lines = [
        "| model | B | T | (e) median | useful work | useful FLOP/s | of matmul | naive T*B*model"
        " FLOPs | naive-equivalent FLOP/s | of matmul |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in section.results:
        flops = section.flops.get(result.cell.model)
        engine = result.measurements.get("engine")
        if flops is None or engine is None or not engine.times_s:
            continue
        b, t = result.cell.num_rows, result.cell.num_samples
        useful, naive = flops.useful(b, t), flops.naive(b, t)
        seconds = engine.median_s
        lines.append(
            f"| {result.cell.model} | {b} | {t} | {_ms(seconds)} ms | {_si(useful, 'FLOP')} | "
            f"{_si(useful / seconds, 'FLOP/s')} | {useful / seconds / rate:.1%} | "
            f"{_si(naive, 'FLOP')} | {_si(naive / seconds, 'FLOP/s')} | "
            f"{naive / seconds / rate:.0%} |"
        )
    return lines


def target_rows(headline: Mapping[str, float | None]) -> list[tuple[Target, float | None, bool]]:
    """(target, measured value, met) for every target."""
    rows = []
    for target in TARGETS:
        value = headline.get(target.key)
        rows.append((target, value, value is not None and value >= target.minimum))
    return rows


def _engine_markdown(section: EngineSection) -> list[str]:
    lines = ["## Engine level", "", *_method(section.config, section.memory_note), ""]
    for name, spec in MODELS.items():
        results = [r for r in section.results if r.cell.model == name]
        if not results:
            continue
        flops = section.flops.get(name)
        lines += [f"### `{name}`: {spec.title}", ""]
        if flops is not None:
            lines.append(
                f"{_si(flops.total_per_row, 'FLOP')} per row: {_si(flops.prefix_per_row, 'FLOP')}"
                f" in the deterministic prefix, {_si(flops.suffix_per_row, 'FLOP')} after the"
                f" first stochastic node. (e) is `{section.engine_classes.get(name, '?')}`."
            )
            lines.append("")
        lines += [
            "Time per call in ms, median [p10-p90], and **speed-up against (a)**:",
            "",
            *_cell_table(results),
            "",
            "Samples per second (B*T / median time) and peak memory of one call:",
            "",
            *_throughput_table(results),
            "",
        ]
    matmul = section.matmul
    lines += [
        "### Machine limit",
        "",
        f"numpy float32 matmul {matmul.size}x{matmul.size} ({matmul.blas}), {matmul.repeats}"
        " products before and after the engine cells, median (slowest to fastest): "
        + "; ".join(
            f"{_si(run.flops_per_s, 'FLOP/s')} ({_si(run.low_flops_per_s, 'FLOP/s')} to "
            f"{_si(run.high_flops_per_s, 'FLOP/s')})"
            for run in section.matmul_runs
        )
        + ". The machine limit used below is the higher median, "
        + f"**{_si(matmul.flops_per_s, 'FLOP/s')}**.",
        "",
        "What the engine achieves, counting 2 FLOPs per multiply-add of Conv/Gemm/MatMul"
        " (shapes from ONNX shape inference; other ops not counted). Useful work = B x prefix"
        " + T x B x suffix, the work left once the deterministic prefix runs once per row;"
        " naive = T x B x the whole model, what (a)-(d) compute:",
        "",
        *_flops_rows(section),
        "",
    ]
    return lines


def render(
    *,
    title_note: str,
    machine: Mapping[str, str],
    command: str,
    engine: EngineSection | None,
    service_markdown: str | None,
    service_note: str | None,
    headline: Mapping[str, float | None],
    gpu_section: str | None = None,
    real_markdown: str | None = None,
) -> str:
    """The whole docs/benchmarks.md.

    Args:
        title_note: one line under the title (mode, date, duration).
        machine: label -> value lines describing the machine and versions.
        command: the exact command that produced the report.
        engine: the engine section (None when not run).
        service_markdown: bench.service's section, when it ran.
        service_note: why the service section is missing (when it is).
        headline: the headline ratios (also printed as the JSON line).
        gpu_section: the GPU section of the document being replaced (markers included, see
            :func:`extract_gpu_section`), kept as it is at the end.
        real_markdown: bench.real's CPU section (realistic models), after the engine level.
    """
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by bench/run.py; edit the code, not this file -->",
        "",
        title_note,
        "",
        f"Command: `{command}`",
        "",
        *(f"- {label}: {value}" for label, value in machine.items()),
        "",
        "All figures below come from this one run on this one machine; the ratios carry over to"
        " other machines better than the absolute times.",
        "",
        "## Targets",
        "",
        "| target | required | measured | |",
        "|---|---:|---:|---|",
    ]
    for target, value, met in target_rows(headline):
        lines.append(
            f"| {target.description} | >= {target.minimum:g}x | {_ratio(value)} | "
            f"{'met' if met else 'NOT met'} |"
        )
    lines.append("")
    if engine is not None:
        lines += _engine_markdown(engine)
    if real_markdown is not None:  # bench.real's section brings its own heading
        lines += [real_markdown.strip(), ""]
    if service_markdown is not None:  # bench.service's section brings its own heading
        lines += [service_markdown.strip(), ""]
    else:
        lines += ["## Service level", "", service_note or "not run", ""]
    lines += [
        "## Headline",
        "",
        "The JSON line the run ends with:",
        "",
        "```json",
        headline_json(headline),
        "```",
        "",
    ]
    document = "\n".join(lines)
    return replace_gpu_section(document, gpu_section) if gpu_section else document


def extract_gpu_section(text: str) -> str | None:
    """The GPU section of a document, from GPU_BEGIN to GPU_END inclusive (None without one)."""
    begin = text.find(GPU_BEGIN)
    end = text.find(GPU_END, begin + len(GPU_BEGIN)) if begin >= 0 else -1
    if begin < 0 or end < 0:
        return None
    return text[begin : end + len(GPU_END)]


def replace_gpu_section(text: str, section: str) -> str:
    """``text`` with its GPU section replaced by ``section`` (markers included), or with
    ``section`` appended after a blank line when it has none; nothing else changes."""
    section = section.strip("\n")
    if not (section.startswith(GPU_BEGIN) and section.endswith(GPU_END)):
        raise ValueError(f"a GPU section must run from {GPU_BEGIN} to {GPU_END}")
    old = extract_gpu_section(text)
    if old is not None:
        begin = text.index(old)
        return text[:begin] + section + text[begin + len(old) :]
    if not text.strip():
        return section + "\n"
    return text.rstrip("\n") + "\n\n" + section + "\n"


def headline_json(headline: Mapping[str, Any]) -> str:
    """One JSON line, floats rounded to 4 significant digits."""
    return json.dumps(
        {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in headline.items()}
    )
