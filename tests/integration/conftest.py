"""Integration fixtures: a model repository exported in the test session, and the real server
(``python -m service``) started on 127.0.0.1 port 0 in a subprocess (tests/support/server.py,
which re-exports here as ``RunningServer``, ``start_server`` and ``stop_server``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from export import export_model
from export.examples import export_example, train_digits, train_housing
from mcdropout_client import Client
from tests.support.server import RunningServer, running_server, start_server, stop_server

__all__ = ["ExportedModels", "RunningServer", "start_server", "stop_server", "test_models"]

ROOT = Path(__file__).resolve().parents[2]
TEST_MAX_SAMPLES = 20_000


class TinyClassifier(nn.Module):
    """MLP with BatchNorm (running stats made non-trivial) and dropout in the head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.4), nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(16, 4))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def tiny_classifier() -> nn.Module:
    torch.manual_seed(1)
    model = TinyClassifier()
    bn = model.body[1]
    assert isinstance(bn, nn.BatchNorm1d)
    with torch.no_grad():  # running stats far from (0, 1): BatchNorm in training mode would show
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 3.0)
    return model


def tiny_regressor(seed: int = 2) -> nn.Module:
    """Dropout before every weight layer, two outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Dropout(0.1), nn.Linear(5, 24), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(24, 2))  # fmt: skip


def tiny_dropout2d_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3),
                         nn.Flatten(), nn.Linear(6 * 5 * 5, 3))  # fmt: skip


@dataclass
class ExportedModels:
    repository: Path
    torch_models: dict[str, nn.Module]
    #: example input rows of the bundled example models, by model name
    examples: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> ExportedModels:
    repository = tmp_path_factory.mktemp("repository")
    models: dict[str, nn.Module] = {}
    # Verification is tested in tests/unit/test_export.py; here a chance failure of it would
    # error every integration test, so it runs at a false-failure probability of 1e-6.
    common = {"repository": repository, "max_num_samples": TEST_MAX_SAMPLES,
              "verify_samples": 2000, "false_failure_probability": 1e-6}  # fmt: skip

    models["tiny_cls"] = tiny_classifier()
    export_model(models["tiny_cls"], torch.randn(8, 6), name="tiny_cls", task="classification",
                 input_names=["x"], output_names=["logits"], labels=["ant", "bee", "cat", "dog"],
                 default_num_samples=50, **common)  # fmt: skip
    models["tiny_reg@1"] = tiny_regressor(seed=20)
    export_model(models["tiny_reg@1"], torch.randn(8, 5), name="tiny_reg", task="regression",
                 input_names=["features"], output_names=["y"], **common)  # fmt: skip
    models["tiny_reg"] = tiny_regressor(seed=2)
    export_model(models["tiny_reg"], torch.randn(8, 5), name="tiny_reg", task="regression",
                 input_names=["features"], output_names=["y"], **common)  # fmt: skip
    models["tiny_d2"] = tiny_dropout2d_cnn()
    export_model(models["tiny_d2"], torch.randn(8, 2, 5, 5), name="tiny_d2", task="regression",
                 input_names=["image"], output_names=["y"], **common)  # fmt: skip
    # The bundled example models, trained briefly (the architecture and export path are what
    # matter here, not the accuracy).
    examples: dict[str, torch.Tensor] = {}
    for trained in (train_digits(epochs=2), train_housing(epochs=20)):
        export_example(trained, repository, verify_samples=2000)
        models[trained.name] = trained.model
        examples[trained.name] = trained.example
    _write_model_without_dropout(repository)
    return ExportedModels(repository=repository, torch_models=models, examples=examples)


def _write_model_without_dropout(repository: Path) -> None:
    """A hand-made version whose graph has no active dropout: the server must refuse it."""
    folder = repository / "deterministic" / "1"
    folder.mkdir(parents=True)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1)).eval()
    program = torch.onnx.export(model, (torch.randn(2, 3),), dynamo=True, opset_version=18,
                                input_names=["x"], output_names=["y"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)  # fmt: skip
    assert program is not None
    program.save(str(folder / "model.onnx"))
    config = {
        "name": "deterministic", "task": "regression",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1], "semantics": "values"}],
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def server(
    test_models: ExportedModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_server(test_models.repository, tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.target, timeout=60) as c:
        yield c
