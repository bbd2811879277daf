"""Digits classification: calibration, misclassification and out-of-distribution detection.

Two ``export.examples.DigitsCNN`` networks are trained in process (seeded, the recipe of
``export.examples.train_digits``: scikit-learn ``load_digits`` scaled to [0, 1], stratified
80/20 split with random_state=0, Adam lr 1e-3, batches of 64, 15 epochs):

* ``digits_eval``: on all ten classes;
* ``digits_holdout9``: on the same training images less class 9 (still ten outputs; class 9
  is never a target), for the held-out-class test.

MC dropout answers come from the server (T = 100 by default). The deterministic baseline is
the *same weights with dropout off*: each network is exported a second time in eval mode
(``torch.onnx.export``, dynamo, opset 18) and run in process with ONNX Runtime on the CPU,
since the server only serves stochastic models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from evaluation.common import seed_everything
from evaluation.metrics import (
    ReliabilityBins,
    accuracy,
    auroc,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from export import export_model
from export.examples import DigitsCNN
from mcdropout_client import Client

__all__ = ["DigitsPlan", "DigitsPrepared", "DigitsResult", "evaluate", "prepare"]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Images = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

FULL_MODEL = "digits_eval"
HOLDOUT_MODEL_PREFIX = "digits_holdout"
#: The scores compared, in table order: (column title, key).
SCORES = (
    ("deterministic 1 - max softmax", "det_max_softmax"),
    ("MC 1 - max mean prob.", "mc_max_prob"),
    ("MC entropy", "mc_entropy"),
    ("MC mutual information", "mc_mutual_information"),
    ("MC variation ratio", "mc_variation_ratio"),
)


@dataclass(frozen=True)
class DigitsPlan:
    """Attributes: epochs, T of the MC requests, the T values of the sweep (detection and
    calibration measured again at each, for section 3), the held-out class, the seed."""

    epochs: int = 15
    num_samples: int = 100
    sweep_samples: tuple[int, ...] = (10, 30, 100, 300, 1000, 3000)
    held_out_class: int = 9
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Network:
    """One trained network: its served name and its deterministic ONNX Runtime session."""

    name: str
    deterministic: ort.InferenceSession

    def deterministic_probabilities(self, images: Images) -> FloatArray:
        """(N, 1, 8, 8) -> (N, 10) softmax of the eval-mode (dropout off) network."""
        (logits,) = self.deterministic.run(None, {"image": images})
        logits = np.asarray(logits, np.float64)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        result: FloatArray = shifted / shifted.sum(axis=1, keepdims=True)
        return result


@dataclass(frozen=True)
class DigitsPrepared:
    """The exported networks and the test sets (images (N, 1, 8, 8) float32 in [0, 1])."""

    plan: DigitsPlan
    full: Network
    holdout: Network
    test_images: Images
    test_labels: IntArray
    ood_sets: dict[str, Images]


def load_split() -> tuple[Images, IntArray, Images, IntArray]:
    """``load_digits`` / 16, stratified 80/20 (random_state=0).

    Returns:
        (x_train, y_train, x_test, y_test); images (N, 1, 8, 8) float32 in [0, 1].
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def train_cnn(images: Images, labels: IntArray, plan: DigitsPlan, description: str) -> DigitsCNN:
    """Trains a DigitsCNN with cross-entropy (seeded by ``plan.seed``)."""
    generator = seed_everything(plan.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    model.train()
    for _ in tqdm(range(plan.epochs), desc=description, unit="epoch", leave=False):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), plan.batch_size):
            batch = order[start : start + plan.batch_size]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
    return model.eval()


def _deterministic_session(model: nn.Module, example: Images, path: Path) -> ort.InferenceSession:
    """Exports ``model`` in eval mode (dropout off) and opens it with ONNX Runtime (CPU)."""
    program = torch.onnx.export(
        model.eval(),
        (torch.from_numpy(example),),
        dynamo=True,
        opset_version=18,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    assert program is not None
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _export(model: nn.Module, name: str, example: Images, repository: Path, note: str) -> None:
    export_model(
        model,
        torch.from_numpy(example),
        repository=repository,
        name=name,
        task="classification",
        input_names=["image"],
        output_names=["logits"],
        labels=[str(i) for i in range(10)],
        default_num_samples=100,
        max_num_samples=10_000,
        verify_samples=500,
        description=f"digits CNN (evaluation): {note}",
    )


def ood_images(test_images: Images, seed: int) -> dict[str, Images]:
    """The shifted inputs, one per test image: uniform noise, inverted (1 - x), rotated 90 deg."""
    rng = np.random.default_rng(seed)
    return {
        "uniform noise": rng.uniform(0.0, 1.0, test_images.shape).astype(np.float32),
        "inverted (1 - x)": (1.0 - test_images).astype(np.float32),
        "rotated 90 degrees": np.ascontiguousarray(np.rot90(test_images, k=1, axes=(2, 3))),
    }


def prepare(plan: DigitsPlan, repository: Path, workdir: Path) -> DigitsPrepared:
    """Trains and exports both networks, and their deterministic ONNX copies."""
    x_train, y_train, x_test, y_test = load_split()
    kept = y_train != plan.held_out_class
    networks = []
    for name, images, labels, note in (
        (FULL_MODEL, x_train, y_train, "all ten classes"),
        (
            f"{HOLDOUT_MODEL_PREFIX}{plan.held_out_class}",
            x_train[kept],
            y_train[kept],
            f"class {plan.held_out_class} held out of training",
        ),
    ):
        model = train_cnn(images, labels, plan, f"training {name}")
        _export(model, name, x_test[:4], repository, note)
        session = _deterministic_session(model, x_test[:4], workdir / f"{name}_deterministic.onnx")
        networks.append(Network(name, session))
    return DigitsPrepared(
        plan, networks[0], networks[1], x_test, y_test, ood_images(x_test, plan.seed + 1)
    )


@dataclass(frozen=True)
class Calibration:
    """Scores of one predictor on the in-distribution test set."""

    accuracy: float
    nll: float
    brier: float
    ece: float
    bins: ReliabilityBins


def calibration(probabilities: FloatArray, labels: IntArray) -> Calibration:
    """Accuracy, NLL, Brier, ECE (15 bins) and the reliability bins of (N, C) probabilities."""
    return Calibration(
        accuracy=accuracy(probabilities, labels),
        nll=negative_log_likelihood(probabilities, labels),
        brier=brier_score(probabilities, labels),
        ece=expected_calibration_error(probabilities, labels),
        bins=reliability_bins(probabilities, labels),
    )


@dataclass(frozen=True)
class Detection:
    """AUROC of every score for telling ``num_positive`` positives from ``num_negative`` rows."""

    name: str
    num_negative: int
    num_positive: int
    auroc: dict[str, float]


@dataclass(frozen=True)
class Scores:
    """Per-row uncertainty scores of one input set (higher = more uncertain), by SCORES key."""

    values: dict[str, FloatArray]
    mc_probabilities: FloatArray
    det_probabilities: FloatArray


def score(network: Network, images: Images, client: Client, num_samples: int, seed: int) -> Scores:
    """MC statistics from the server and the deterministic softmax, for (N, 1, 8, 8) images."""
    answer = client.predict(network.name, images, num_samples=num_samples, seed=seed)
    assert answer.predictive_entropy is not None
    assert answer.mutual_information is not None
    assert answer.variation_ratio is not None
    det = network.deterministic_probabilities(images)
    values = {
        "det_max_softmax": 1.0 - det.max(axis=1),
        "mc_max_prob": 1.0 - answer.mean.max(axis=1),
        "mc_entropy": answer.predictive_entropy,
        "mc_mutual_information": answer.mutual_information,
        "mc_variation_ratio": answer.variation_ratio,
    }
    return Scores(values, answer.mean, det)


def _misclassification(scores: Scores, labels: IntArray) -> Detection:
    """Positives: the rows each predictor gets wrong (its own errors, so counts may differ)."""
    mc_wrong = scores.mc_probabilities.argmax(axis=1) != labels
    det_wrong = scores.det_probabilities.argmax(axis=1) != labels
    result = {}
    for _, key in SCORES:
        wrong = det_wrong if key.startswith("det") else mc_wrong
        values = scores.values[key]
        result[key] = (
            auroc(values[~wrong], values[wrong]) if 0 < wrong.sum() < wrong.size else float("nan")
        )
    return Detection(
        "misclassified (in-distribution test set)",
        num_negative=int((~mc_wrong).sum()),
        num_positive=int(mc_wrong.sum()),
        auroc=result,
    )


def _ood(name: str, inside: Scores, outside: Scores) -> Detection:
    aurocs = {key: auroc(inside.values[key], outside.values[key]) for _, key in SCORES}
    size_in = len(inside.mc_probabilities)
    return Detection(name, size_in, len(outside.mc_probabilities), aurocs)


@dataclass(frozen=True)
class SweepRow:
    """Calibration and OOD detection of MC dropout (``digits_eval``) at one T."""

    num_samples: int
    nll: float
    ece: float
    #: AUROC by OOD set name, for the mutual information and the predictive entropy.
    mutual_information_auroc: dict[str, float]
    entropy_auroc: dict[str, float]


def sweep(prepared: DigitsPrepared, client: Client) -> list[SweepRow]:
    """The headline MC figures of ``digits_eval`` again at every T of ``plan.sweep_samples``."""
    plan, labels = prepared.plan, prepared.test_labels
    rows = []
    for t in tqdm(plan.sweep_samples, desc="digits vs T", unit="T", leave=False):
        test = score(prepared.full, prepared.test_images, client, t, plan.seed)
        shifted = {
            name: score(prepared.full, images, client, t, plan.seed)
            for name, images in prepared.ood_sets.items()
        }
        rows.append(
            SweepRow(
                num_samples=t,
                nll=negative_log_likelihood(test.mc_probabilities, labels),
                ece=expected_calibration_error(test.mc_probabilities, labels),
                mutual_information_auroc={
                    name: _ood(name, test, s).auroc["mc_mutual_information"]
                    for name, s in shifted.items()
                },
                entropy_auroc={
                    name: _ood(name, test, s).auroc["mc_entropy"] for name, s in shifted.items()
                },
            )
        )
    return rows


@dataclass(frozen=True)
class DigitsResult:
    """Calibration of both predictors, misclassification and OOD detection, the scores kept."""

    plan: DigitsPlan
    num_test: int
    mc: Calibration
    deterministic: Calibration
    misclassification: Detection
    ood: list[Detection]
    holdout_accuracy: dict[str, float]
    #: per-row mutual information / 1 - max softmax by input set, for the histogram figure.
    mutual_information: dict[str, FloatArray] = field(default_factory=dict)
    det_max_softmax: dict[str, FloatArray] = field(default_factory=dict)
    #: the MC figures again at several T (section 3)
    sweep: list[SweepRow] = field(default_factory=list)


def evaluate(prepared: DigitsPrepared, client: Client) -> DigitsResult:
    """Every query of the digits study (MC from the server, deterministic in process)."""
    plan, t = prepared.plan, prepared.plan.num_samples
    labels = prepared.test_labels
    sets = list(prepared.ood_sets.items())
    progress = tqdm(total=len(sets) + 3, desc=f"digits, T={t}", unit="set", leave=False)
    with progress:
        test = score(prepared.full, prepared.test_images, client, t, plan.seed)
        progress.update()
        shifted = {}
        for name, images in sets:
            shifted[name] = score(prepared.full, images, client, t, plan.seed)
            progress.update()
        held_out = labels == plan.held_out_class
        holdout_in = score(prepared.holdout, prepared.test_images[~held_out], client, t, plan.seed)
        progress.update()
        holdout_out = score(prepared.holdout, prepared.test_images[held_out], client, t, plan.seed)
        progress.update()
    ood = [_ood(name, test, scores) for name, scores in shifted.items()]
    ood.append(
        _ood(f"held-out class {plan.held_out_class} (second network)", holdout_in, holdout_out)
    )
    kept_labels = labels[~held_out]
    holdout_accuracy = {
        "mc": accuracy(holdout_in.mc_probabilities, kept_labels),
        "deterministic": accuracy(holdout_in.det_probabilities, kept_labels),
    }
    mi = {"test digits": test.values["mc_mutual_information"]}
    det = {"test digits": test.values["det_max_softmax"]}
    for name, scores in shifted.items():
        mi[name] = scores.values["mc_mutual_information"]
        det[name] = scores.values["det_max_softmax"]
    mi[f"class {plan.held_out_class} (held out)"] = holdout_out.values["mc_mutual_information"]
    det[f"class {plan.held_out_class} (held out)"] = holdout_out.values["det_max_softmax"]
    return DigitsResult(
        plan=plan,
        num_test=len(labels),
        mc=calibration(test.mc_probabilities, labels),
        deterministic=calibration(test.det_probabilities, labels),
        misclassification=_misclassification(test, labels),
        ood=ood,
        holdout_accuracy=holdout_accuracy,
        mutual_information=mi,
        det_max_softmax=det,
        sweep=sweep(prepared, client),
    )
