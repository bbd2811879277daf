"""Fixtures shared by the test layers.

``zoo_export``: the real architectures of export.zoo (BERT, ViT, TransformerEncoder, LSTM,
EfficientNet-B0, MobileNetV3, heteroscedastic and two-head models, random weights), each
exported once per test session into one repository, so that the export tests
(tests/unit/test_export_architectures.py) and the serving tests
(tests/integration/test_architectures.py) share the minutes the exports cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from export import ExportReport, export_model, zoo

#: MC samples per side of each export's verification (its false-failure probability is
#: ZOO_FALSE_FAILURE whatever n: the thresholds follow n).
ZOO_VERIFY_SAMPLES = 1000
#: The convolutional nets run their whole trunk once per sample on the CPU: fewer samples, one
#: row.
ZOO_CONV_VERIFY_SAMPLES = 200
ZOO_CONV_NETS = ("efficientnet_b0", "mobilenet_v3_small")
ZOO_FALSE_FAILURE = 1e-4


@pytest.fixture(scope="session")
def zoo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo") / "models"


@pytest.fixture(scope="session")
def zoo_export(zoo_repository: Path) -> Callable[[str], ExportReport]:
    """Exports a zoo architecture (version 1 in ``zoo_repository``) once per session and
    returns the report of that export; skips when the architecture's packages are missing."""

    @functools.cache
    def export(name: str) -> ExportReport:
        entry = zoo.ZOO[name]
        if not entry.available:
            pytest.skip(f"{name} needs {', '.join(entry.requires)} (the dev extra pins them)")
        inputs = entry.example_inputs()
        conv = name in ZOO_CONV_NETS
        if conv:  # one row: the trunk dominates the cost of each sample
            inputs = tuple(t[:1] for t in inputs)
        return export_model(
            entry.build(),
            inputs,
            repository=zoo_repository,
            name=name,
            version=1,
            verify_samples=ZOO_CONV_VERIFY_SAMPLES if conv else ZOO_VERIFY_SAMPLES,
            false_failure_probability=ZOO_FALSE_FAILURE,
            **entry.export_args,
        )

    return export
