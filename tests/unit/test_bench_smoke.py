"""Smoke test of the engine benchmark harness (bench/): keeps it from rotting.

Runs one minimal cell (B=1, T=2) of every variant on the MLP, the peak-memory child, the FLOP
count and the report rendering. It asserts shapes and plumbing only, never timings: timing
assertions on shared CI machines only produce flaky failures. About 10 s on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.export]


def test_engine_benchmark_harness_runs_one_minimal_cell(tmp_path: Path) -> None:
    from bench.engine import (
        VARIANT_KEYS,
        Cell,
        EngineBenchConfig,
        make_runner,
        measure_cells,
        measure_peak_memory,
    )
    from bench.flops import count_model_flops, measure_matmul
    from bench.models import prepare_models
    from bench.report import EngineSection, headline_json, render
    from bench.run import engine_headline

    models = prepare_models(["mlp"], tmp_path, verify_samples=100)
    model = models["mlp"]
    config = EngineBenchConfig(
        min_repeats=1, max_repeats=1, cell_budget_s=0.0, call_cap_s=60.0, pause_s=0.0
    )

    # Every variant returns the same statistics object shape: (B, C) mean and variance.
    rows = model.spec.rows(3)
    for key in VARIANT_KEYS:
        stats = make_runner(key, model, config.tile_memory_bytes)(rows, 2)
        assert stats.mean.shape == (3, 10), key
        assert stats.variance.dtype == np.float64, key
        np.testing.assert_allclose(stats.mean.sum(axis=1), 1.0, rtol=1e-6)

    results = measure_cells(models, [Cell("mlp", 1, 2)], config)
    assert len(results) == 1
    measurements = results[0].measurements
    assert set(measurements) == set(VARIANT_KEYS)
    rounds = results[0].rounds
    assert rounds >= 1
    assert all(len(m.times_s) == rounds and m.skipped is None for m in measurements.values())

    measure_peak_memory(results, tmp_path, config, threads=1)
    assert all(m.peak_rss_bytes is not None for m in measurements.values())

    flops = {"mlp": count_model_flops(model.model_path)}
    # 64x256 before the first dropout; 256x256 twice and 256x10 after it (2 FLOPs per MAC).
    assert flops["mlp"].prefix_per_row == 2 * 64 * 256
    assert flops["mlp"].suffix_per_row == 2 * (2 * 256 * 256 + 256 * 10)
    matmul = measure_matmul(size=64, repeats=2)
    assert matmul.flops_per_s > 0

    headline = engine_headline(results, flops, matmul)
    markdown = render(
        title_note="smoke",
        machine={"CPU": "test"},
        command="python -m bench.run",
        engine=EngineSection(
            results=results,
            config=config,
            flops=flops,
            matmul=matmul,
            matmul_runs=(matmul,),
            engine_classes={"mlp": "X"},
            memory_note="test",
        ),
        service_markdown=None,
        service_note="not run",
        headline=headline,
    )
    assert f"| 1 | 2 | {rounds} |" in markdown
    line = json.loads(headline_json(headline))
    assert all(v is None or math.isfinite(v) for v in line.values())


def test_gpu_benchmark_runs_every_path_on_the_cpu(tmp_path: Path) -> None:
    """bench.gpu with --device cpu: bench.engine's runners and cell measurement for all seven
    variants, then bench.service's measurement (servers through tools/launcher.py, the load
    generator) of this service and the naive server, and the section rendered from the JSON."""
    from dataclasses import replace

    from bench.engine import CPU, GPU_VARIANT_KEYS, Cell
    from bench.gpu import (
        SMOKE_CONFIG,
        SMOKE_SERVICE_PLAN,
        prepare_repository,
        problems,
        render_section,
        run_benchmark,
    )

    models = tmp_path / "models"
    prepare_repository(models, names=["mlp"])
    plan = replace(SMOKE_SERVICE_PLAN, model="mlp", concurrencies=(2,))
    result = run_benchmark(
        device=CPU,
        cells=[Cell("mlp", 3, 7)],
        config=SMOKE_CONFIG,
        repository=models,
        budget_s=600.0,
        service_plan=plan,
        command="pytest",
        json_path=tmp_path / "gpu.json",
    )
    assert problems(result) == []
    assert result["finished"]

    (cell,) = result["cells"]
    assert set(cell["measurements"]) == set(GPU_VARIANT_KEYS)
    assert all(m["times_s"] for m in cell["measurements"].values()), cell["measurements"]
    providers = result["models"]["mlp"]["providers"]
    assert providers["torch_loop"] == ["torch cpu"]
    assert providers["engine"] == ["CPUExecutionProvider"]

    service = result["service"]
    systems = [
        "this service, --device cpu",
        "naive PyTorch server on cpu",
        "this service, --device cpu (same host)",
    ]
    assert service["systems"] == systems
    assert service["providers"] == {systems[0]: "CPUExecutionProvider",
                                    systems[2]: "CPUExecutionProvider"}  # fmt: skip
    by_system = {c["system"]: c for c in service["cells"]}
    assert set(by_system) == set(systems)
    for cell in by_system.values():
        assert cell["concurrency"] == 2
        assert cell["errors"] == 0
        assert cell["rows_samples_per_s"] > 0

    saved = json.loads((tmp_path / "gpu.json").read_text())
    markdown = render_section(saved)
    assert "CPU TEST MODE" in markdown
    for system in systems:
        assert f"| 2 | {system} |" in markdown
