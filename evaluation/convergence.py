"""How the answer converges with T: the spread of repeated answers, to justify the default T.

For a few fixed inputs of each example model (the digits CNN of the digits study, trained with
the recipe of the bundled ``digits``; the bundled ``housing`` model, trained by
``export.examples.train_housing``), the same request is repeated ``repeats`` times at every T
of ``sample_counts``. The spread of an estimate at T is its standard deviation across the
repeats (ddof=1): the Monte Carlo error a client sees from one request. For a mean it should
fall as 1/sqrt(T).

Statistics followed (rows of the server's answer):
    * digits: the mean probability of the reference class (the class with the highest mean
      probability at the largest T), and the mutual information (nats);
    * housing: the predictive mean and the predictive std (medv, $1000s).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from evaluation.digits import FULL_MODEL, DigitsPrepared
from export.examples import export_example, train_housing
from mcdropout_client import Client

__all__ = [
    "ConvergencePlan",
    "ConvergencePrepared",
    "ConvergenceResult",
    "StatisticSpread",
    "evaluate",
    "prepare",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
HOUSING_MODEL = "housing"


@dataclass(frozen=True)
class ConvergencePlan:
    """Attributes:
    sample_counts: the T values, increasing.
    repeats: requests per T (per model; each answers every input row).
    probability_threshold: target spread of a mean class probability.
    information_threshold: target spread of the mutual information, nats.
    housing_threshold: target spread of the housing mean and std, $1000s.
    seed: seeds the housing training and the noise image.
    """

    sample_counts: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
    repeats: int = 50
    probability_threshold: float = 0.01
    information_threshold: float = 0.01
    housing_threshold: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ConvergencePrepared:
    """The inputs followed: digits images (N, 1, 8, 8) with names, housing rows (M, 13)."""

    plan: ConvergencePlan
    digits_images: npt.NDArray[np.float32]
    digits_names: list[str]
    housing_rows: npt.NDArray[np.float32]
    housing_names: list[str]


def prepare(plan: ConvergencePlan, repository: Path, digits: DigitsPrepared) -> ConvergencePrepared:
    """Trains and exports the bundled housing model; picks the inputs to follow.

    Digits inputs: the test image the deterministic network is least sure of, the median one,
    the surest one, and one uniform-noise image, so the spread is seen across the range of
    per-sample variability.
    """
    trained = train_housing(seed=plan.seed)
    export_example(trained, repository, verify_samples=500)
    det = digits.full.deterministic_probabilities(digits.test_images)
    order = np.argsort(det.max(axis=1))  # least confident first
    picks = {
        "least confident test digit": int(order[0]),
        "median test digit": int(order[len(order) // 2]),
        "most confident test digit": int(order[-1]),
    }
    noise = np.random.default_rng(plan.seed + 7).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    images = np.concatenate([digits.test_images[list(picks.values())], noise])
    names = [f"{k} (label {digits.test_labels[i]})" for k, i in picks.items()] + ["uniform noise"]
    rows = trained.example.numpy().astype(np.float32)
    return ConvergencePrepared(
        plan,
        images,
        names,
        rows,
        [f"test row {i}" for i in range(len(rows))],
    )


@dataclass(frozen=True)
class StatisticSpread:
    """The spread across repeats of one statistic, per T and per input.

    Attributes:
        model: the served model.
        statistic: what is followed, e.g. "mean probability".
        unit: its unit, for axis labels.
        threshold: the target spread.
        sample_counts: (K,) the T values.
        input_names: (N,) the inputs.
        spread: (K, N) std across repeats (ddof=1); NaN where undefined (std at T = 1).
    """

    model: str
    statistic: str
    unit: str
    threshold: float
    sample_counts: list[int]
    input_names: list[str]
    spread: FloatArray

    def worst(self) -> FloatArray:
        """(K,) the largest spread over inputs at each T (NaN where every input is NaN)."""
        result: FloatArray = np.full(len(self.sample_counts), np.nan)
        for k, row in enumerate(self.spread):
            if np.isfinite(row).any():
                result[k] = np.nanmax(row)
        return result

    def first_below_threshold(self) -> int | None:
        """The smallest T from which the worst spread stays below the threshold (None: never)."""
        worst = self.worst()
        for k, t in enumerate(self.sample_counts):
            later = worst[k:]
            if np.isfinite(later).all() and (later < self.threshold).all():
                return t
        return None

    def required_samples(self) -> int:
        """T at which the worst spread reaches the threshold, extrapolated as c / sqrt(T).

        c is fitted (least squares on log spread) over T >= 100, where the 1/sqrt(T) law holds.
        """
        worst = self.worst()
        counts = np.asarray(self.sample_counts, np.float64)
        use = (counts >= 100) & np.isfinite(worst) & (worst > 0)
        if not use.any():
            use = np.isfinite(worst) & (worst > 0)
        log_c = float(np.mean(np.log(worst[use]) + 0.5 * np.log(counts[use])))
        # rounded first, so that float noise in an exact fit does not add a sample
        return max(1, math.ceil(round((math.exp(log_c) / self.threshold) ** 2, 6)))

    def at(self, num_samples: int) -> float:
        """The worst spread at T = num_samples (NaN if T was not measured)."""
        if num_samples not in self.sample_counts:
            return float("nan")
        return float(self.worst()[self.sample_counts.index(num_samples)])


@dataclass(frozen=True)
class ConvergenceResult:
    """Every statistic's spread, and each model's default T (from its metadata)."""

    plan: ConvergencePlan
    statistics: list[StatisticSpread]
    default_samples: dict[str, int]
    #: median wall time of one request (gRPC round trip on 127.0.0.1), per model, per T.
    latency_s: dict[str, list[float]]


Answers = dict[int, list[tuple[FloatArray, FloatArray, FloatArray | None]]]


def _repeat(
    client: Client, model: str, rows: npt.NDArray[np.float32], plan: ConvergencePlan
) -> tuple[Answers, list[float]]:
    """{T: [(mean, std, mutual information) per repeat]} and the median latency per T.

    Every request carries all of ``rows``.
    """
    answers: Answers = {}
    latency_s = []
    progress = tqdm(
        total=len(plan.sample_counts) * plan.repeats,
        desc=f"convergence {model}",
        unit="request",
        leave=False,
    )
    with progress:
        for t in plan.sample_counts:
            answers[t] = []
            durations = []
            for repeat in range(plan.repeats):
                # a seed of its own per (T, repeat): the repeats are independent, and the
                # whole study is reproducible
                seed = (plan.seed * 100_000 + t) * 1000 + repeat
                started = time.perf_counter()
                answer = client.predict(model, rows, num_samples=t, seed=seed)
                durations.append(time.perf_counter() - started)
                answers[t].append((answer.mean, answer.std, answer.mutual_information))
                progress.update()
            latency_s.append(float(np.median(durations)))
    return answers, latency_s


def _spread(values: list[FloatArray]) -> FloatArray:
    """Std across repeats (ddof=1) of per-row values: list of R (N,) -> (N,)."""
    stacked = np.stack(values)
    if not np.isfinite(stacked).all():
        return np.full(stacked.shape[1], np.nan)
    result: FloatArray = stacked.std(axis=0, ddof=1)
    return result


def evaluate(prepared: ConvergencePrepared, client: Client) -> ConvergenceResult:
    """Repeats the requests at every T and measures the spreads."""
    plan = prepared.plan
    counts = list(plan.sample_counts)
    digits, digits_latency = _repeat(client, FULL_MODEL, prepared.digits_images, plan)
    largest = digits[counts[-1]]
    reference = np.mean([mean for mean, _, _ in largest], axis=0).argmax(axis=1)  # (N,)
    rows = np.arange(len(reference))
    probability = np.stack(
        [_spread([mean[rows, reference] for mean, _, _ in digits[t]]) for t in counts]
    )
    # With one sample the mutual information is 0 by definition (nothing to disagree with):
    # its "spread" there is rounding noise, so it is left out like the std at T = 1.
    information = np.stack(
        [
            _spread([mi for _, _, mi in digits[t] if mi is not None])
            if t > 1
            else np.full(len(reference), np.nan)
            for t in counts
        ]
    )
    housing, housing_latency = _repeat(client, HOUSING_MODEL, prepared.housing_rows, plan)
    housing_mean = np.stack([_spread([mean[:, 0] for mean, _, _ in housing[t]]) for t in counts])
    housing_std = np.stack([_spread([std[:, 0] for _, std, _ in housing[t]]) for t in counts])
    statistics = [
        StatisticSpread(
            FULL_MODEL, "mean probability of the reference class", "probability",
            plan.probability_threshold, counts, prepared.digits_names, probability,
        ),
        StatisticSpread(
            FULL_MODEL, "mutual information", "nats",
            plan.information_threshold, counts, prepared.digits_names, information,
        ),
        StatisticSpread(
            HOUSING_MODEL, "predictive mean", "$1000s",
            plan.housing_threshold, counts, prepared.housing_names, housing_mean,
        ),
        StatisticSpread(
            HOUSING_MODEL, "predictive std", "$1000s",
            plan.housing_threshold, counts, prepared.housing_names, housing_std,
        ),
    ]  # fmt: skip
    defaults = {
        model: client.model_metadata(model).default_num_samples
        for model in (FULL_MODEL, HOUSING_MODEL)
    }
    latency = {FULL_MODEL: digits_latency, HOUSING_MODEL: housing_latency}
    return ConvergenceResult(plan, statistics, defaults, latency)
