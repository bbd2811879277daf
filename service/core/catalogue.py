"""The statistics catalogue: which statistics each model output is answered with, their names,
dtypes and shapes. Both protocols' encoders and metadata read it; nothing else decides.

What exists depends on an output's semantics, never on the model's task, so a model may mix
heads (a classifier's logits beside a regressor's values, each with its own statistics):

==============================  ========  =======  ============================================
statistic (answer name suffix)  dtype     shape    exists for
==============================  ========  =======  ============================================
``mean``                        FP64      output   every output
``variance``                    FP64      output   every output (unbiased, ddof = 1)
``std``                         FP64      output   every output
``aleatoric_variance``          FP64      output   values outputs that a variance output
                                                   describes (heteroscedastic)
``total_variance``              FP64      output   the same
``predicted_class``             INT64     [B, ..]  logits and probabilities outputs
``predicted_label``             BYTES     [B, ..]  the same, when the output has labels
``entropy``                     FP64      [B, ..]  logits and probabilities outputs
``expected_entropy``            FP64      [B, ..]  the same
``mutual_information``          FP64      [B, ..]  the same
``variation_ratio``             FP64      [B, ..]  the same
==============================  ========  =======  ============================================

Class statistics have the output's shape without its last (class) axis: (B,) for a (B, C)
classifier, (B, L) for a token classifier's (B, L, C). And, only when a request asks for them:
``samples`` (FP64, (B, T, ...), every output, for ``return_samples``),
``interval_<method>_<level>_<bound>`` (FP64, output's shape, values outputs, for each interval
level; methods gaussian then empirical, bounds lower then upper), and the request's per-row T
``mc_samples_per_row`` (INT64, [B], adaptive sampling).

Answers name a statistic ``<output>_<statistic>`` (the Open Inference Protocol's and KServe
v2's outputs). They also answer each model output under its own name (``logits``): its MC mean,
in the graph's dtype and shape, so that a Triton or KServe script written for the deterministic
model (``as_numpy("logits")``) gets the averaged prediction; ``<output>_mean`` has the same
values in FP64. ``mcdropout.v1`` answers one ``OutputStatistics`` message per model output whose
fields are the statistics' :attr:`Statistic.field` names. A version whose names collide is
refused at load time (:class:`Catalogue`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.engine.runtime import OutputStats
from service.errors import InvalidInput, ModelLoadError, quote
from service.repository import ModelConfig, Semantics, TensorSpec
from service.tensors import BYTES, FP64, INT64, DType, from_numpy

__all__ = [
    "INTERVAL_BOUNDS",
    "INTERVAL_METHODS",
    "SAMPLES",
    "SAMPLES_PER_ROW",
    "SAMPLES_PER_ROW_NAME",
    "Answer",
    "Catalogue",
    "IntervalBound",
    "Statistic",
    "own_output",
    "statistics_of",
]


@dataclass(frozen=True)
class Statistic:
    """One statistic of a model output.

    Attributes:
        name: the suffix of its answer name ``<output>_<name>``.
        field: its name in ``mcdropout.v1``'s ``OutputStatistics``, which is also the
            attribute of the output's statistics object (``RegressionStats`` /
            ``ClassificationStats``) it is read from, except for the labels (read from
            ``predicted_class``) and the interval bounds (from ``intervals``).
        dtype: its wire type.
        per_row: one value per position of a class output (its shape without the class
            axis) rather than the output's shape.
    """

    name: str
    field: str
    dtype: DType
    per_row: bool = False

    def read(self, stats: OutputStats, labels: tuple[str, ...]) -> NDArray[Any]:
        """The statistic's values in one output's statistics.

        Raises:
            ValueError: the statistics lack it (the catalogue and the engine disagree: a bug).
        """
        value = getattr(stats, self.field, None)
        if not isinstance(value, np.ndarray):
            raise ValueError(f"the statistics of the output have no {self.field}")
        return value

    def shape(self, output: TensorSpec) -> tuple[int, ...]:
        """Its shape for ``output``, with -1 for the batch axis."""
        return output.shape[:-1] if self.per_row else output.shape


@dataclass(frozen=True)
class _Label(Statistic):
    """The label of each row's predicted class, as a str (encoders choose the bytes)."""

    def read(self, stats: OutputStats, labels: tuple[str, ...]) -> NDArray[Any]:
        classes = PREDICTED_CLASS.read(stats, labels)
        named: NDArray[Any] = np.array(labels, dtype=object)[classes]
        return named


@dataclass(frozen=True)
class IntervalBound(Statistic):
    """One bound of one prediction interval of a values output."""

    method: str = ""
    level: float = 0.0
    bound: str = ""

    def read(self, stats: OutputStats, labels: tuple[str, ...]) -> NDArray[Any]:
        for interval in getattr(stats, "intervals", ()):
            if interval.method == self.method and interval.level == self.level:
                value: NDArray[Any] = getattr(interval, self.bound)
                return value
        raise ValueError(f"the statistics of the output have no {self.method} {self.level}")


@dataclass(frozen=True)
class _Own(Statistic):
    """A model output under its own name: its MC mean, in the graph's float dtype."""

    def read(self, stats: OutputStats, labels: tuple[str, ...]) -> NDArray[Any]:
        return MEAN.read(stats, labels)


def own_output(output: TensorSpec) -> Statistic:
    """The statistic answered under ``output``'s own name: the mean, in the graph's dtype (FP64
    for a graph output that is not floating point)."""
    dtype = from_numpy(output.dtype)
    return _Own("", "mean", dtype if dtype is not None and dtype.numpy.kind == "f" else FP64)


@dataclass(frozen=True)
class _Samples(Statistic):
    """Every sample, (B, T, ...)."""

    def shape(self, output: TensorSpec) -> tuple[int, ...]:
        return (-1, -1, *output.shape[1:])


MEAN = Statistic("mean", "mean", FP64)
VARIANCE = Statistic("variance", "variance", FP64)
STD = Statistic("std", "std", FP64)
ALEATORIC_VARIANCE = Statistic("aleatoric_variance", "aleatoric_variance", FP64)
TOTAL_VARIANCE = Statistic("total_variance", "total_variance", FP64)
PREDICTED_CLASS = Statistic("predicted_class", "predicted_class", INT64, per_row=True)
PREDICTED_LABEL = _Label("predicted_label", "predicted_label", BYTES, per_row=True)
ENTROPY = Statistic("entropy", "predictive_entropy", FP64, per_row=True)
EXPECTED_ENTROPY = Statistic("expected_entropy", "expected_entropy", FP64, per_row=True)
MUTUAL_INFORMATION = Statistic("mutual_information", "mutual_information", FP64, per_row=True)
VARIATION_RATIO = Statistic("variation_ratio", "variation_ratio", FP64, per_row=True)
SAMPLES = _Samples("samples", "samples", FP64)
#: The per-row T of adaptive sampling: a statistic of the request, not of an output.
SAMPLES_PER_ROW = Statistic("samples_per_row", "num_samples_per_row", INT64, per_row=True)
SAMPLES_PER_ROW_NAME = "mc_samples_per_row"

_MOMENTS = (MEAN, VARIANCE, STD)
_CLASSIFICATION = (
    *_MOMENTS,
    PREDICTED_CLASS,
    PREDICTED_LABEL,
    ENTROPY,
    EXPECTED_ENTROPY,
    MUTUAL_INFORMATION,
    VARIATION_RATIO,
)
#: The statistics of each output semantics, in answer order, before the conditions below.
_BY_SEMANTICS: dict[Semantics, tuple[Statistic, ...]] = {
    Semantics.LOGITS: _CLASSIFICATION,
    Semantics.PROBABILITIES: _CLASSIFICATION,
    Semantics.VALUES: (*_MOMENTS, ALEATORIC_VARIANCE, TOTAL_VARIANCE),
    Semantics.VARIANCE: _MOMENTS,
    Semantics.LOG_VARIANCE: _MOMENTS,
}
#: Semantics whose outputs get prediction intervals, and the methods, in answer order.
_INTERVAL_SEMANTICS = frozenset({Semantics.VALUES})
INTERVAL_METHODS = ("gaussian", "empirical")
INTERVAL_BOUNDS = ("lower", "upper")


def statistics_of(output: TensorSpec, config: ModelConfig) -> tuple[Statistic, ...]:
    """The statistics every answer gives for ``output`` of ``config``, in answer order."""
    semantics = output.semantics or Semantics.VALUES
    heteroscedastic = config.variance_output(output.name) is not None
    return tuple(
        s
        for s in _BY_SEMANTICS[semantics]
        if (s is not PREDICTED_LABEL or output.labels)
        and (s not in (ALEATORIC_VARIANCE, TOTAL_VARIANCE) or heteroscedastic)
    )


def has_intervals(output: TensorSpec) -> bool:
    """Whether prediction intervals are computed for ``output``."""
    return (output.semantics or Semantics.VALUES) in _INTERVAL_SEMANTICS


@dataclass(frozen=True)
class Answer:
    """One named output of an answer: a statistic of a model output, or of the request.

    Attributes:
        name: ``<output>_<statistic>``, the output's own name (its mean: :func:`own_output`),
            or :data:`SAMPLES_PER_ROW_NAME`.
        statistic: what it holds.
        output: the model output it describes; None for a statistic of the request.
    """

    name: str
    statistic: Statistic
    output: TensorSpec | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Its shape, with -1 for the batch (and the sample) axis."""
        return self.statistic.shape(self.output) if self.output is not None else (-1,)


def _answer(output: TensorSpec, statistic: Statistic) -> Answer:
    return Answer(f"{output.name}_{statistic.name}", statistic, output)


class Catalogue:
    """Every statistic one model version answers, decided once, when it loads.

    Args:
        config: the version's config.

    Raises:
        ModelLoadError: two statistic outputs would have the same name (output ``x`` with a
            variance output and output ``x_total`` would both give ``x_total_variance``).
    """

    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        self._statistics = {o.name: statistics_of(o, config) for o in config.outputs}
        #: the outputs every answer has (and metadata lists), in answer order: per model
        #: output, its own name (the mean, in the graph's dtype), then its statistics
        self.answers: tuple[Answer, ...] = tuple(
            answer
            for o in config.outputs
            for answer in (
                Answer(o.name, own_output(o), o),
                *(_answer(o, s) for s in self._statistics[o.name]),
            )
        )
        #: whether some output gets prediction intervals
        self.has_intervals = any(has_intervals(o) for o in config.outputs)
        # Interval names end in "_<level>_<bound>" and no other statistic ends in a bound, so
        # one level stands for all of them.
        every = self.available(return_samples=True, interval_levels=(0.5,), adaptive=True)
        twice = [name for name, count in Counter(a.name for a in every).items() if count > 1]
        if twice:
            sources = [
                "the request's"
                if a.output is None
                else f"output {a.output.name!r} itself"
                if a.name == a.output.name
                else f"{a.statistic.name} of {a.output.name!r}"
                for a in every
                if a.name == twice[0]
            ]
            raise ModelLoadError(
                f"model {config.name!r}: the statistic output {twice[0]!r} would be both "
                f"{' and '.join(sources)}; rename an output"
            )

    def statistics(self, output: str) -> tuple[Statistic, ...]:
        """The statistics every answer gives for the model output named ``output``."""
        return self._statistics[output]

    def extras(
        self, *, return_samples: bool, interval_levels: Sequence[float], adaptive: bool
    ) -> tuple[Answer, ...]:
        """The outputs that exist only when a request asks for them, in answer order: raw
        samples, interval bounds, and the per-row T of adaptive sampling."""
        extra: list[Answer] = []
        for output in self._config.outputs:
            if return_samples:
                extra.append(_answer(output, SAMPLES))
            if has_intervals(output):
                extra.extend(
                    _answer(output, _interval(method, level, bound))
                    for level in interval_levels
                    for method in INTERVAL_METHODS
                    for bound in INTERVAL_BOUNDS
                )
        if adaptive:
            extra.append(Answer(SAMPLES_PER_ROW_NAME, SAMPLES_PER_ROW))
        return tuple(extra)

    def available(
        self, *, return_samples: bool, interval_levels: Sequence[float], adaptive: bool
    ) -> tuple[Answer, ...]:
        """Every output a request with these options can be answered with, in answer order."""
        return self.answers + self.extras(
            return_samples=return_samples, interval_levels=interval_levels, adaptive=adaptive
        )

    def select(
        self,
        requested: Sequence[str] | None,
        *,
        return_samples: bool,
        interval_levels: Sequence[float],
        adaptive: bool,
    ) -> tuple[Answer, ...]:
        """The outputs to answer, in answer order: all of them when ``requested`` is None or
        empty, else those named, in the requested order.

        Raises:
            InvalidInput: an unknown or repeated name.
        """
        available = self.available(
            return_samples=return_samples, interval_levels=interval_levels, adaptive=adaptive
        )
        if not requested:
            return available
        by_name = {a.name: a for a in available}
        chosen: dict[str, Answer] = {}
        for name in requested:
            if name not in by_name:
                raise InvalidInput(
                    f"model {self._config.name!r} has no output {quote(name)} (outputs: "
                    f"{', '.join(by_name)})"
                )
            if name in chosen:
                raise InvalidInput(f"output {quote(name)} is requested twice")
            chosen[name] = by_name[name]
        return tuple(chosen.values())


def _interval(method: str, level: float, bound: str) -> IntervalBound:
    return IntervalBound(
        f"interval_{method}_{level:g}_{bound}", "intervals", FP64, method=method, level=level,
        bound=bound,
    )  # fmt: skip
