"""The GPU benchmark's report plumbing (bench/gpu.py, bench/report.py): its section lives between
markers in docs/benchmarks.md, ``--merge`` replaces only that section, the CPU report keeps it,
and the timing loop records a failing variant and goes on. No model runs here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.engine import (
    GPU_VARIANTS,
    Cell,
    CellResult,
    EngineBenchConfig,
    Measurement,
    measure_cell,
)
from bench.gpu import SMOKE_CONFIG, merge, problems, render_section
from bench.report import GPU_BEGIN, GPU_END, extract_gpu_section, render, replace_gpu_section
from bench.run import _existing_gpu_section

DOCUMENT = "# Benchmarks\n\nCPU figures.\n\n## Headline\n\n```json\n{}\n```\n"


def section(body: str) -> str:
    return f"{GPU_BEGIN}\n## GPU (CUDA)\n\n{body}\n{GPU_END}\n"


def test_a_section_is_appended_to_a_document_without_one() -> None:
    merged = replace_gpu_section(DOCUMENT, section("first"))
    assert merged.startswith(DOCUMENT.rstrip("\n"))
    assert extract_gpu_section(merged) == section("first").strip("\n")
    assert merged.endswith(GPU_END + "\n")


def test_only_the_marked_section_is_replaced() -> None:
    after = "\n## After\n\ntext after the section\n"
    document = replace_gpu_section(DOCUMENT, section("first")) + after
    merged = replace_gpu_section(document, section("second"))
    assert merged == document.replace("first", "second")
    assert merged.count(GPU_BEGIN) == merged.count(GPU_END) == 1
    assert replace_gpu_section(merged, section("second")) == merged  # idempotent


def test_an_empty_document_gets_just_the_section() -> None:
    assert replace_gpu_section("", section("x")) == section("x")


def test_a_section_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="gpu:begin"):
        replace_gpu_section(DOCUMENT, "## GPU\n\nno markers\n")


def test_extract_needs_both_markers_in_order() -> None:
    assert extract_gpu_section(DOCUMENT) is None
    assert extract_gpu_section(f"{GPU_END}\nx\n{GPU_BEGIN}\n") is None


def test_the_cpu_report_keeps_an_existing_gpu_section(tmp_path: Path) -> None:
    old = tmp_path / "benchmarks.md"
    old.write_text(replace_gpu_section("# Benchmarks\n\nold CPU run\n", section("kept")))
    kept = _existing_gpu_section(old)
    assert kept == section("kept").strip("\n")
    markdown = render(
        title_note="new run",
        machine={"CPU": "test"},
        command="python -m bench.run",
        engine=None,
        service_markdown=None,
        service_note="skipped",
        headline={},
        gpu_section=kept,
    )
    assert "old CPU run" not in markdown
    assert extract_gpu_section(markdown) == kept
    assert _existing_gpu_section(tmp_path / "missing.md") is None
    # Without a GPU section the report is what it always was.
    plain = render(title_note="n", machine={}, command="c", engine=None, service_markdown=None,
                   service_note=None, headline={})  # fmt: skip
    assert GPU_BEGIN not in plain


def _measurement(times: list[float]) -> dict[str, Any]:
    m = Measurement(times_s=times)
    return {"times_s": times, "skipped": None, "estimate_s": None, "peak_rss_bytes": None,
            "median_s": m.median_s, "p10_s": m.spread_s[0], "p90_s": m.spread_s[1]}  # fmt: skip


def synthetic_result(mode: str = "cuda") -> dict[str, Any]:
    measurements = {v.key: _measurement([0.010, 0.011, 0.012]) for v in GPU_VARIANTS}
    measurements["torch_loop"] = _measurement([0.200, 0.210, 0.220])
    measurements["ort_loop"] = {"times_s": [], "skipped": "skipped (about 9 s per call > 2 s cap)"}
    measurements["engine_cpu"] = {"times_s": [], "skipped": "error"}
    return {
        "schema": "bench.gpu/1",
        "command": "python -m bench.gpu --repository build/gpu-models --json out.json",
        "started_at": "2026-01-01T00:00:00+00:00",
        "finished": True,
        "elapsed_s": 300.0,
        "budget_s": 380.0,
        "device": {
            "mode": mode,
            "gpu": "NVIDIA H100 80GB HBM3",
            "onnxruntime": "1.31.1",
            "nvidia_smi": {"driver_version": "580.1"},
        },
        "config": {"call_cap_s": 2.0, "tile_memory_bytes": 256 * 2**20},
        "models": {
            "mlp": {
                "providers": {"engine": ["CUDAExecutionProvider"]},
                "details": {"engine": "SplitSessionsEngine"},
                "build_errors": {"ort_tiled": "NotOnDevice: refused"},
            }
        },
        "cells": [
            {
                "cell": {"model": "mlp", "num_rows": 32, "num_samples": 50},
                "rounds": 3,
                "measurements": measurements,
                "errors": {"engine_cpu": "RuntimeError: boom"},
            },
        ],
        "not_run": ["cnn32_b256_t10000"],
        "errors": [],
        "service": {
            "plan": {"model": "digits_cnn", "rows": 1, "samples": 50, "concurrencies": [1]},
            "systems": ["this service, --device gpu", "naive PyTorch server on cuda"],
            "cells": [
                {
                    "system": "this service, --device gpu",
                    "concurrency": 1,
                    "rows_samples_per_s": 50_000.0,
                    "p50_ms": 1.0,
                    "p99_ms": 2.0,
                    "errors": 0,
                },
                {
                    "system": "naive PyTorch server on cuda",
                    "concurrency": 1,
                    "rows_samples_per_s": 5_000.0,
                    "p50_ms": 10.0,
                    "p99_ms": 20.0,
                    "errors": 0,
                },
            ],
            "errors": ["this service, --device cpu (same host): not run (time budget)"],
        },
    }


def test_the_section_renders_from_the_json_alone() -> None:
    result = synthetic_result()
    markdown = render_section(json.loads(json.dumps(result)))
    assert markdown.startswith(GPU_BEGIN)
    assert markdown.rstrip().endswith(GPU_END)
    assert "## GPU (CUDA)" in markdown
    assert "NVIDIA H100 80GB HBM3" in markdown
    assert f"Command: `{result['command']}`" in markdown
    assert "(e) is SplitSessionsEngine." in markdown
    assert "**(d) not built**: NotOnDevice: refused" in markdown
    assert "error: RuntimeError: boom" in markdown
    assert "skipped (about 9 s per call > 2 s cap)" in markdown
    assert "cnn32_b256_t10000" in markdown  # not run: said so
    # (e) 11 ms against (a) 210 ms.
    assert "**19.1x**" in markdown
    assert "| 1 | this service, --device gpu | 50,000 | 1.0 | 2.0 | 0 | 10.0x |" in markdown
    assert len(problems(result)) == 3  # a build error, a cell error, a service error


def test_the_cpu_test_mode_says_so_in_its_title() -> None:
    markdown = render_section(synthetic_result(mode="cpu-test"))
    assert "CPU TEST MODE (not GPU figures)" in markdown
    assert "## GPU (CUDA)" not in markdown


def test_merge_from_json_or_section_file_touches_only_the_section(tmp_path: Path) -> None:
    document = tmp_path / "benchmarks.md"
    document.write_text(DOCUMENT)
    raw = tmp_path / "gpu.json"
    raw.write_text(json.dumps(synthetic_result()))
    merge(raw, document)
    first = document.read_text()
    assert first.startswith(DOCUMENT.rstrip("\n"))
    assert extract_gpu_section(first) == render_section(synthetic_result()).strip("\n")
    # A section file (--out) merges the same way, replacing the previous section.
    section_file = tmp_path / "gpu.md"
    section_file.write_text(render_section(synthetic_result(mode="cpu-test")))
    merge(section_file, document)
    second = document.read_text()
    assert second.startswith(DOCUMENT.rstrip("\n"))
    assert "CPU TEST MODE" in second
    assert "## GPU (CUDA)" not in second
    bad = tmp_path / "bad.md"
    bad.write_text("no section here")
    with pytest.raises(SystemExit):
        merge(bad, document)


def test_a_failing_variant_is_recorded_and_the_others_are_timed() -> None:
    calls = {"late": 0}

    def fine(rows: Any, num_samples: int) -> Any:
        return None

    def broken(rows: Any, num_samples: int) -> Any:
        raise RuntimeError("CUDA error: out of memory")

    def late(rows: Any, num_samples: int) -> Any:
        calls["late"] += 1
        if calls["late"] > 4:  # 2 probes, the warm-up and round 1 pass; round 2 fails
            raise RuntimeError("failed later")

    config = EngineBenchConfig(**{**SMOKE_CONFIG.__dict__, "max_repeats": 5})
    rows = np.zeros((2, 3), dtype=np.float32)
    result, errors = measure_cell(
        Cell("mlp", 2, 4), {"fine": fine, "broken": broken, "late": late}, rows, config,
        deadline=1e18,
    )  # fmt: skip
    assert isinstance(result, CellResult)
    assert errors == {
        "broken": "RuntimeError: CUDA error: out of memory",
        "late": "RuntimeError: failed later",
    }
    assert len(result.measurements["fine"].times_s) == result.rounds >= 3
    assert result.measurements["broken"].skipped == "error"
    assert result.measurements["late"].times_s == []


def test_past_the_deadline_a_cell_stops_after_the_minimum_rounds() -> None:
    config = EngineBenchConfig(**{**SMOKE_CONFIG.__dict__, "min_repeats": 10, "max_repeats": 10,
                                  "max_cell_s": 1e9, "cell_budget_s": 1e9})  # fmt: skip
    rows = np.zeros((1, 1), dtype=np.float32)
    result, _ = measure_cell(
        Cell("mlp", 1, 2), {"x": lambda r, t: None}, rows, config, deadline=0.0
    )
    assert result.rounds == 3
