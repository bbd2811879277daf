"""The integration suite's test models, exported once here and carried to a GPU host as files.

``python -m tests.gpu.bundle DIR`` runs the body of tests/integration/conftest.py's
``test_models`` fixture (the same models, export and example rows) into ``DIR/repository`` and
saves every PyTorch reference model's weights and the example rows next to it (about 1 MB).
``GPU_TEST_MODELS=DIR pytest tests/gpu`` then uses them instead of exporting in the test session,
so the CUDA tests need neither the exporter's dependencies (onnxscript) nor training on the GPU
host, and the PyTorch references keep the exact weights of the exported graphs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ENV", "load", "prepare"]

#: The environment variable naming a prepared bundle (tests/gpu/conftest.py reads it).
ENV = "GPU_TEST_MODELS"
WEIGHTS = "torch_models.pt"
EXAMPLES = "examples.pt"
MANIFEST = "bundle.json"


def _builders() -> dict[str, Callable[[dict[str, torch.Tensor]], nn.Module]]:
    """Reference model name -> a fresh module of its architecture, given its state dict."""
    from export.examples import DigitsCNN, HousingMLP
    from tests.integration.conftest import tiny_classifier, tiny_dropout2d_cnn, tiny_regressor

    return {
        "tiny_cls": lambda _: tiny_classifier(),
        "tiny_reg@1": lambda _: tiny_regressor(seed=20),
        "tiny_reg": lambda _: tiny_regressor(seed=2),
        "tiny_d2": lambda _: tiny_dropout2d_cnn(),
        "digits": lambda _: DigitsCNN(),
        "housing": lambda state: HousingMLP(int(state["x_mean"].shape[0])),
    }


class _Factory:
    """Stands in for pytest's tmp_path_factory: ``mktemp(name)`` is ``root / name``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str, numbered: bool = True) -> Path:
        del numbered
        path = self.root / name
        path.mkdir(parents=True, exist_ok=False)
        return path


def prepare(directory: Path) -> None:
    """Export the test models into ``directory`` (which must not hold a repository yet)."""
    from tests.integration import conftest

    fixture: Any = conftest.test_models
    body = getattr(fixture, "__wrapped__", fixture)
    models = body(_Factory(directory))
    if models.repository != directory / "repository":
        raise RuntimeError(f"the fixture wrote {models.repository}, not {directory}/repository")
    unknown = set(models.torch_models) - set(_builders())
    if unknown:
        raise RuntimeError(f"no builder for the reference models {sorted(unknown)}: add them")
    torch.save({k: m.state_dict() for k, m in models.torch_models.items()}, directory / WEIGHTS)
    torch.save(dict(models.examples), directory / EXAMPLES)
    manifest = {"torch": torch.__version__, "models": sorted(models.torch_models)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def load(directory: Path) -> Any:
    """The bundle as the ``test_models`` fixture returns it (an ``ExportedModels``)."""
    from tests.integration.conftest import ExportedModels

    if not (directory / "repository").is_dir():
        raise FileNotFoundError(
            f"{directory} holds no prepared bundle (python -m tests.gpu.bundle)"
        )
    builders = _builders()
    states = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    torch_models: dict[str, nn.Module] = {}
    for name, state in states.items():
        model = builders[name](state)
        model.load_state_dict(state)
        torch_models[name] = model
    examples = torch.load(directory / EXAMPLES, map_location="cpu", weights_only=True)
    return ExportedModels(
        repository=directory / "repository", torch_models=torch_models, examples=examples
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.gpu.bundle", description=__doc__)
    parser.add_argument("directory", type=Path, help="where to write the bundle")
    args = parser.parse_args(argv)
    prepare(args.directory)
    size = sum(p.stat().st_size for p in args.directory.rglob("*") if p.is_file())
    print(f"wrote {args.directory} ({size / 1e6:.1f} MB); use it with {ENV}={args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
