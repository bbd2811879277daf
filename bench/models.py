"""The benchmark models, and their export into a throw-away model repository.

Three shapes of MC dropout network, with random (seeded) weights: speed does not depend on
training.

* ``digits_cnn``: the bundled digits CNN (export.examples.DigitsCNN), (B, 1, 8, 8) -> (B, 10):
  convolutions first, dropout only in the head, so almost all the work is deterministic.
* ``mlp``: 64 -> 256 -> 256 -> 256 -> 10 with Dropout(0.2) after every hidden layer, so only
  the first layer is deterministic.
* ``cnn32``: a larger CNN on (B, 3, 32, 32) (three Conv-BN-ReLU-MaxPool blocks, then
  Linear-ReLU-Dropout-Linear), about 6 MFLOPs per row, almost all before the dropout.

Each is exported with ``export.export_model`` (dropout kept active, graph checks, statistical
verification against PyTorch) exactly as a user would, and loaded back with
``service.repository.load_version``, so the engines benchmarked run the server's own files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from export.api import ExportReport, export_model
from export.errors import VerificationError
from export.mc_mode import mc_dropout_copy
from service.repository import VersionSource, load_version

__all__ = [
    "MODELS",
    "BenchModel",
    "ConvNet32",
    "DropoutMLP",
    "PreparedModel",
    "build_mc_model",
    "digits_cnn",
    "load_prepared",
    "prepare_models",
]

log = logging.getLogger(__name__)

#: MC samples per side used by export verification (the default 4,000 is slower than needed here).
VERIFY_SAMPLES = 500
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
VERSION = 1
#: Exports tried before a failed verification stops the run (see ``_export``).
EXPORT_ATTEMPTS = 3


def digits_cnn() -> nn.Module:
    """The bundled example's architecture, export.examples.DigitsCNN, untrained."""
    # Imported here: export.examples pulls in scikit-learn (over a second to import), which
    # the other models and the peak-memory child processes do not need.
    from export.examples import DigitsCNN  # noqa: PLC0415

    return DigitsCNN()


class DropoutMLP(nn.Module):
    """(B, 64) -> (B, 10) logits: Linear-ReLU-Dropout after every hidden layer."""

    def __init__(
        self, in_features: int = 64, hidden: int = 256, depth: int = 3, dropout: float = 0.2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class ConvNet32(nn.Module):
    """(B, 3, 32, 32) -> (B, 10) logits, about 3.1 M multiply-adds per row.

    Three Conv(3x3)-BatchNorm-ReLU-MaxPool blocks (16, 32, 64 channels: 32x32 -> 4x4), then
    Linear(1024, 256)-ReLU-Dropout(0.5)-Linear(256, 10).
    """

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 3
        for width in (16, 32, 64):
            blocks += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: how to build it and what its input rows look like.

    Attributes:
        name: short name, used in result keys (``digits_cnn_b32_t50_...``) and as folder name.
        title: one line for the report.
        row_shape: the shape of one input row (without the batch dimension).
        build: returns a fresh module with random weights (call under a fixed torch seed).
        uniform_inputs: inputs in [0, 1) (pixels) instead of standard normal.
    """

    name: str
    title: str
    row_shape: tuple[int, ...]
    build: Callable[[], nn.Module]
    uniform_inputs: bool = False

    def rows(self, num_rows: int, seed: int = 0) -> npt.NDArray[np.float32]:
        """(num_rows, *row_shape) float32 input rows, reproducible from ``seed``."""
        rng = np.random.default_rng(seed)
        shape = (num_rows, *self.row_shape)
        values = rng.random(shape) if self.uniform_inputs else rng.standard_normal(shape)
        return values.astype(np.float32)


MODELS: dict[str, BenchModel] = {
    model.name: model
    for model in (
        BenchModel(
            name="digits_cnn",
            title="digits CNN (1x8x8, Conv-BN-ReLU x2, max-pool, Linear-ReLU-Dropout(0.5)-Linear)",
            row_shape=(1, 8, 8),
            build=digits_cnn,
            uniform_inputs=True,
        ),
        BenchModel(
            name="mlp",
            title="MLP (64-256-256-256-10, Dropout(0.2) after every hidden layer)",
            row_shape=(64,),
            build=DropoutMLP,
        ),
        BenchModel(
            name="cnn32",
            title=(
                "larger CNN (3x32x32, Conv-BN-ReLU-MaxPool x3 with 16/32/64 channels, "
                "Linear(1024,256)-ReLU-Dropout(0.5)-Linear)"
            ),
            row_shape=(3, 32, 32),
            build=ConvNet32,
        ),
    )
}


@dataclass(frozen=True)
class PreparedModel:
    """A benchmark model exported, verified and published into a repository.

    Attributes:
        spec: the model definition.
        mc_model: the PyTorch module in MC dropout mode (eval, dropout modules in train),
            the reference the PyTorch variants run.
        source: the published version, as the server loads it.
        export_s: seconds the export (with verification) took.
    """

    spec: BenchModel
    mc_model: nn.Module
    source: VersionSource
    export_s: float

    @property
    def model_path(self) -> Path:
        return self.source.model_path


def _randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm running statistics non-trivial values (as after training), so the
    exported graph folds a real affine map rather than the identity."""
    for child in module.modules():
        if not isinstance(child, nn.BatchNorm2d):
            continue
        if child.running_mean is not None and child.running_var is not None:
            with torch.no_grad():
                child.running_mean.normal_(0.0, 0.1, generator=generator)
                child.running_var.uniform_(0.5, 1.5, generator=generator)


def build_mc_model(spec: BenchModel, seed: int = 0) -> nn.Module:
    """The model with seeded random weights, in MC dropout mode (a fresh copy)."""
    return mc_dropout_copy(_build(spec, seed))


def _build(spec: BenchModel, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = spec.build()
    _randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return model


def _export(
    spec: BenchModel, model: nn.Module, repository: Path, seed: int, verify_samples: int
) -> ExportReport:
    """export_model, retried when the statistical verification fails.

    Verification is a test at a small false-failure probability, and ONNX Runtime's samples
    are freshly seeded on every run: a correct export can fail it by chance, and a benchmark
    run should not die of that. A broken export fails every attempt.
    """

    def export() -> ExportReport:
        return export_model(
            model,
            torch.from_numpy(spec.rows(8, seed=seed)),
            repository=repository,
            name=spec.name,
            task="classification",
            version=VERSION,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verify_samples=verify_samples,
            description=spec.title,
        )

    for attempt in range(1, EXPORT_ATTEMPTS):
        try:
            return export()
        except VerificationError as error:
            first_line = str(error).splitlines()[0]
            log.warning("%s: attempt %d: %s; exporting again", spec.name, attempt, first_line)
    return export()


def prepare_models(
    names: list[str], repository: Path, seed: int = 0, verify_samples: int = VERIFY_SAMPLES
) -> dict[str, PreparedModel]:
    """Build, export, verify and load the named benchmark models.

    Args:
        names: keys of :data:`MODELS`.
        repository: an (empty) model repository folder, e.g. a temporary directory.
        seed: torch seed for the random weights.
        verify_samples: MC samples per side for export verification (>= 100).

    Returns:
        name -> the prepared model, in the order of ``names``.

    Raises:
        KeyError: an unknown model name.
        export.errors.ExportError: the export failed, or its verification failed
            ``EXPORT_ATTEMPTS`` times.
    """
    prepared: dict[str, PreparedModel] = {}
    for name in names:
        spec = MODELS[name]
        model = _build(spec, seed)
        report = _export(spec, model, repository, seed, verify_samples)
        log.info("exported and verified %s in %.1f s", name, report.elapsed_s)
        prepared[name] = PreparedModel(
            spec=spec,
            mc_model=mc_dropout_copy(model),
            source=load_version(repository / name, VERSION),
            export_s=report.elapsed_s,
        )
    return prepared


def load_prepared(name: str, repository: Path, seed: int = 0) -> PreparedModel:
    """A model that :func:`prepare_models` already published into ``repository`` (used by
    child processes: the PyTorch module is rebuilt from the same seed, not exported again)."""
    spec = MODELS[name]
    return PreparedModel(
        spec=spec,
        mc_model=build_mc_model(spec, seed),
        source=load_version(repository / name, VERSION),
        export_s=0.0,
    )
