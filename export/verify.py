"""Statistical verification of an exported graph against PyTorch MC dropout, before publishing.

The ONNX side always runs in a session from ``service.engine.onnx_session.create_session``, the same
factory the server uses, so the ``EliminateDropout`` trap is tested as it will be served.

Four checks, in this order (all run, so the report is complete):

1. ``repeated_runs_differ``: the same input run several times gives different outputs.
2. ``row_copies_differ``: 16 copies of one row in one run give different outputs (masks are
   drawn per row, which the server's [T*B, ...] tiling relies on).
3. ``mean_z_test``: per output element, the MC means of n ONNX Runtime samples and n PyTorch
   samples agree (z-test, Bonferroni threshold).
4. ``variance_ratio``: per output element, the MC variances agree (log ratio z-test with a
   kurtosis-based standard error, Bonferroni threshold).

Raw outputs (logits, not softmax) are compared. The false-failure probability is split
equally between checks 3 and 4; it holds whatever the number of samples and rows (the
thresholds follow K), fewer of them only cost power.

Time is bounded for large models: unless the caller fixes n, it is at most
``DEFAULT_SAMPLES`` and the rows and n are cut to fit ``time_budget_s`` (rows first, then n,
never below ``MIN_AUTO_SAMPLES``), from the timed first chunk of every row, and
n is cut again after any chunk whose pace would overrun it (``VerificationPlan`` says what
was chosen and why). PyTorch runs on CUDA when it is available (fp32 in full precision, no
TF32), with its fused attention fast paths off (``fastpath_disabled``) as at export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from torch import nn

from export.mc_mode import fastpath_disabled
from export.stats import MomentAccumulator, Moments, ZTestResult, mean_z_test, variance_ratio_test
from service.engine.onnx_session import SessionConfig
from service.engine.runtime import McEngine
from service.repository import ModelConfig, Semantics, Task
from service.repository import TensorSpec as ServiceTensorSpec

__all__ = [
    "COPIES_PER_ROW",
    "DEFAULT_SAMPLES",
    "DEFAULT_TIME_BUDGET_S",
    "FIRST_CHUNK_SAMPLES",
    "MAX_VERIFY_ROWS",
    "MIN_AUTO_SAMPLES",
    "REPEATED_RUNS",
    "OnnxSample",
    "VerificationCheck",
    "VerificationPlan",
    "VerificationReport",
    "onnx_sampler",
    "verify_model",
]

log = logging.getLogger(__name__)

#: Rows of the example input used for verification (more rows cost time, not power).
MAX_VERIFY_ROWS = 8
#: How many runs of the same input may look for a difference before the check fails.
REPEATED_RUNS = 8
#: Copies of one row in the tile of check 2.
COPIES_PER_ROW = 16
_COPY_ATTEMPTS = 4
#: n when the caller leaves it to verification (the most it takes).
DEFAULT_SAMPLES = 4000
#: The fewest samples an automatic plan cuts n to, whatever the time (at n = 500 the
#: variance test still tells p = 0.1 from p = 0.2 before a linear output: ratio 2.25).
MIN_AUTO_SAMPLES = 500
#: Wall time an automatic plan aims at for the sampling of both sides together.
DEFAULT_TIME_BUDGET_S = 60.0
#: Most samples (of every row) in the first chunk, timed to plan the rows and n.
FIRST_CHUNK_SAMPLES = 256

Array = npt.NDArray[Any]
#: Draws ``count`` MC samples of the rows ``inputs`` (each (B, ...)): per graph output, in graph
#: order, (count * B, ...) sample-major (row s * B + b is sample s of input row b).
OnnxSample = Callable[[Sequence[Array], int], list[Array]]

#: The tile budget of verification's engine (the server's default).
_VERIFY_TILE_BYTES = 256 * 2**20


def onnx_sampler(onnx_model: bytes, config: ModelConfig | None = None) -> OnnxSample:
    """The ONNX side of verification: samples drawn exactly as the server draws them.

    An engine of the server (``service.engine.runtime.McEngine``) on the CPU, built the way the
    server builds it when it loads the version: the same sessions (``EliminateDropout`` kept
    off), the same split, the same noise fed to the stochastic nodes (so ONNX Runtime's own
    CPU Dropout generator, whose masks repeat across runs, never draws a sample here either).

    Args:
        onnx_model: the serialized graph.
        config: the version's config, as the server will parse it; None describes every output
            of the graph as values (enough for raw samples).

    Returns:
        The sampling function.
    """
    model = onnx.load_from_string(onnx_model)
    engine = McEngine(
        model,
        config or _graph_config(model),
        "verification",
        session_config=SessionConfig(use_gpu=False),
        tile_memory_bytes=_VERIFY_TILE_BYTES,
    )
    names = [spec.name for spec in engine.config.inputs]

    def sample(inputs: Sequence[Array], count: int) -> list[Array]:
        outputs = engine.sample(dict(zip(names, inputs, strict=True)), count)
        return [o.reshape(o.shape[0] * o.shape[1], *o.shape[2:]) for o in outputs]

    return sample


def _graph_config(model: onnx.ModelProto) -> ModelConfig:
    """A config for a graph: its inputs and outputs (-1 where a dimension is not fixed),
    every output read as values."""
    initializers = {i.name for i in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto, semantics: Semantics | None) -> ServiceTensorSpec:
        dims = [d.dim_value if d.HasField("dim_value") else -1
                for d in value.type.tensor_type.shape.dim]  # fmt: skip
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        return ServiceTensorSpec(value.name, np.dtype(dtype), (-1, *dims[1:]), semantics)

    return ModelConfig(
        name="verification",
        task=Task.REGRESSION,
        description="",
        inputs=tuple(spec(v, None) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(spec(v, Semantics.VALUES) for v in model.graph.output),
        default_num_samples=1,
        max_num_samples=1,
        activation_bytes_per_row=None,
    )


@dataclass(frozen=True)
class VerificationCheck:
    """One verification check.

    Attributes:
        name: "repeated_runs_differ", "row_copies_differ", "mean_z_test" or "variance_ratio".
        passed: whether it passed.
        detail: a readable account (figures, and the failure when it failed).
        max_abs_z: z-tests: the largest |z|.
        threshold: z-tests: the Bonferroni threshold on |z|.
        min_ratio: variance test: the smallest variance ratio ONNX / PyTorch.
        max_ratio: variance test: the largest variance ratio.
        num_elements: z-tests: K, the output elements tested.
        alpha: z-tests: the false-failure probability of this test.
        num_deterministic: z-tests: elements without variance on both sides (compared for
            equality instead; when all are, the samples tell nothing about the dropout).
    """

    name: str
    passed: bool
    detail: str
    max_abs_z: float | None = None
    threshold: float | None = None
    min_ratio: float | None = None
    max_ratio: float | None = None
    num_elements: int | None = None
    alpha: float | None = None
    num_deterministic: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``verification.checks[]`` entry of metadata.json (unset figures omitted)."""
        entry: dict[str, Any] = {"name": self.name, "passed": self.passed}
        for key in (
            "max_abs_z",
            "threshold",
            "min_ratio",
            "max_ratio",
            "num_elements",
            "alpha",
            "num_deterministic",
        ):
            value = getattr(self, key)
            if value is not None:
                entry[key] = round(value, 6) if isinstance(value, float) else value
        entry["detail"] = self.detail
        return entry


@dataclass(frozen=True)
class VerificationPlan:
    """How many samples and rows verification took, on which device, and why.

    Attributes:
        num_samples: n, the MC samples drawn on each side.
        rows: rows of the example input tiled.
        torch_device: where the PyTorch reference ran ("cpu", "cuda", ...).
        reason: why these numbers ("fixed by the caller", "within the time budget", or
            what was cut to fit it).
        estimated_s: the estimated sampling time of the plan (both sides), from timed runs.
    """

    num_samples: int
    rows: int
    torch_device: str
    reason: str
    estimated_s: float

    def to_dict(self) -> dict[str, Any]:
        """The ``verification.plan`` object of metadata.json."""
        return {
            "rows": self.rows,
            "torch_device": self.torch_device,
            "reason": self.reason,
            "estimated_s": round(self.estimated_s, 3),
        }


@dataclass(frozen=True)
class VerificationReport:
    """Every verification check on one exported graph.

    Attributes:
        num_samples: n, the MC samples drawn on each side.
        false_failure_probability: total probability that a correct export fails.
        rows: rows of the example input that were tiled.
        checks: the checks, in the order they ran.
        elapsed_s: wall time of the verification.
        plan: how n and the rows were chosen; None for a report built by hand.
    """

    num_samples: int
    false_failure_probability: float
    rows: int
    checks: tuple[VerificationCheck, ...]
    elapsed_s: float = 0.0
    plan: VerificationPlan | None = None

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of the checks that failed."""
        return [check.name for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        """The ``verification`` object of metadata.json."""
        document: dict[str, Any] = {
            "passed": self.passed,
            "num_samples": self.num_samples,
            "false_failure_probability": self.false_failure_probability,
        }
        if self.plan is not None:
            document["plan"] = self.plan.to_dict()
        document["checks"] = [check.to_dict() for check in self.checks]
        return document

    def summary(self) -> str:
        """One line per check."""
        lines = [
            f"verification: n={self.num_samples} samples per side, {self.rows} rows, "
            f"false-failure probability {self.false_failure_probability:g}, "
            f"{self.elapsed_s:.2f} s"
        ]
        if self.plan is not None:
            lines.append(f"     PyTorch on {self.plan.torch_device}; {self.plan.reason}")
        for check in self.checks:
            lines.append(f"{'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
        return "\n".join(lines)


def _tile(array: Array, copies: int) -> Array:
    """(B, ...) -> (copies * B, ...), sample-major: row s * B + b is row b."""
    return np.tile(array, (copies,) + (1,) * (array.ndim - 1))


def _flatten_outputs(outputs: Sequence[Array], samples: int) -> npt.NDArray[np.float64]:
    """Outputs, each (samples * B, ...), -> (samples, K) float64, K = sum of B * row sizes."""
    return np.concatenate(
        [np.asarray(out, dtype=np.float64).reshape(samples, -1) for out in outputs], axis=1
    )


class _OnnxSampler:
    def __init__(self, sample: OnnxSample, inputs: Sequence[Array]) -> None:
        self.sample = sample
        self._inputs = inputs

    def run(self, inputs: Sequence[Array]) -> list[Array]:
        """One sample of every row of ``inputs``: per output, (B, ...)."""
        return self.sample(inputs, 1)

    def samples(self, count: int) -> npt.NDArray[np.float64]:
        return _flatten_outputs(self.sample(self._inputs, count), count)


@contextlib.contextmanager
def _full_fp32(device: torch.device) -> Iterator[None]:
    """CUDA: fp32 matmuls and convolutions in full precision (TF32 off), restored after.

    cuDNN convolutions default to TF32 (about 1e-3 relative error), which would fail the
    comparison of deterministic output elements (``DETERMINISTIC_RTOL``).
    """
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    # cudnn.conv / cudnn.rnn are set up at run time (no stubs): getattr keeps mypy content.
    settings: list[Any] = [
        torch.backends.cuda.matmul,
        getattr(cudnn, "conv"),  # noqa: B009
        getattr(cudnn, "rnn"),  # noqa: B009
    ]
    previous = [setting.fp32_precision for setting in settings]
    try:
        for setting in settings:
            setting.fp32_precision = "ieee"
    except RuntimeError as error:  # e.g. the caller mixed in the legacy allow_tf32 API
        log.warning("could not turn TF32 off for the PyTorch reference: %s", error)
    try:
        yield
    finally:
        for setting, value in zip(settings, previous, strict=True):
            setting.fp32_precision = value


class _TorchSampler:
    def __init__(self, mc_model: nn.Module, inputs: Sequence[Array], device: torch.device) -> None:
        self._model = mc_model
        self._device = device
        self._inputs = [torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in inputs]

    def samples(self, count: int) -> npt.NDArray[np.float64]:
        tiled = [x.repeat(count, *([1] * (x.dim() - 1))) for x in self._inputs]
        with torch.no_grad(), fastpath_disabled(), _full_fp32(self._device):
            result = self._model(*tiled)
        outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        return _flatten_outputs([o.detach().cpu().numpy() for o in outputs], count)


def _plan(
    seconds_per_sample: float,
    rows: int,
    num_samples: int | None,
    time_budget_s: float,
    device: torch.device,
) -> VerificationPlan:
    """Rows and n: the caller's n as is, or the most (up to DEFAULT_SAMPLES) that fit the budget.

    ``seconds_per_sample`` is the time of one sample of all ``rows`` rows on both sides;
    the cost of a sample is taken as proportional to its rows (what dominates for models
    large enough to matter). Rows are cut first (the same masks are tested, on fewer
    inputs), then n, not below MIN_AUTO_SAMPLES.
    """
    per_row = seconds_per_sample / rows
    if num_samples is not None:
        return VerificationPlan(
            num_samples,
            rows,
            str(device),
            "n fixed by the caller",
            num_samples * seconds_per_sample,
        )
    if DEFAULT_SAMPLES * seconds_per_sample <= time_budget_s:
        return VerificationPlan(
            DEFAULT_SAMPLES,
            rows,
            str(device),
            f"n={DEFAULT_SAMPLES} fits the time budget of {time_budget_s:g} s",
            DEFAULT_SAMPLES * seconds_per_sample,
        )
    fitted_rows = max(1, min(rows, int(time_budget_s / (DEFAULT_SAMPLES * per_row))))
    n = DEFAULT_SAMPLES
    if fitted_rows == 1:
        n = max(MIN_AUTO_SAMPLES, min(DEFAULT_SAMPLES, int(time_budget_s / per_row)))
    estimated_s = n * fitted_rows * per_row
    reason = (
        f"cut from n={DEFAULT_SAMPLES} x {rows} rows (estimated "
        f"{DEFAULT_SAMPLES * seconds_per_sample:.0f} s) to fit the time budget of "
        f"{time_budget_s:g} s"
    )
    if estimated_s > time_budget_s:
        reason += f" (n={MIN_AUTO_SAMPLES} x 1 row is the least it takes)"
    return VerificationPlan(n, fitted_rows, str(device), reason, estimated_s)


def _pick_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _repeated_runs_differ(sampler: _OnnxSampler, inputs: Sequence[Array]) -> VerificationCheck:
    first = sampler.run(inputs)
    for attempt in range(2, REPEATED_RUNS + 1):
        again = sampler.run(inputs)
        if any(not np.array_equal(a, b) for a, b in zip(first, again, strict=True)):
            largest = max(
                float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
                for a, b in zip(first, again, strict=True)
            )
            return VerificationCheck(
                "repeated_runs_differ",
                True,
                f"run {attempt} differed from run 1 (max |difference| {largest:.4g})",
            )
    return VerificationCheck(
        "repeated_runs_differ",
        False,
        f"{REPEATED_RUNS} runs on the same input gave identical outputs: the graph is "
        "deterministic in ONNX Runtime (dropout removed or frozen)",
    )


def _row_copies_differ(sampler: _OnnxSampler, inputs: Sequence[Array]) -> VerificationCheck:
    first_row = [x[:1] for x in inputs]
    for attempt in range(1, _COPY_ATTEMPTS + 1):
        outputs = sampler.sample(first_row, COPIES_PER_ROW)
        rows = _flatten_outputs(outputs, COPIES_PER_ROW)
        differing = int(np.sum(np.any(rows[1:] != rows[0], axis=1)))
        if differing:
            return VerificationCheck(
                "row_copies_differ",
                True,
                f"{differing} of {COPIES_PER_ROW - 1} copies of row 0 differ from the first "
                f"(run {attempt})",
            )
    return VerificationCheck(
        "row_copies_differ",
        False,
        f"{COPIES_PER_ROW} copies of row 0 in one run gave identical outputs "
        f"({_COPY_ATTEMPTS} runs): masks are not drawn per row",
    )


def _z_check(name: str, result: ZTestResult, num_samples: int) -> VerificationCheck:
    figures = (
        f"max |z| {result.max_abs_z:.2f} (threshold {result.threshold:.2f}, "
        f"K={result.num_elements}, n={num_samples}, alpha={result.alpha:g}"
    )
    if result.num_deterministic:
        figures += f", {result.num_deterministic} deterministic elements"
    figures += ")"
    if result.min_ratio is not None and result.max_ratio is not None:
        figures += f", variance ratio {result.min_ratio:.3f}..{result.max_ratio:.3f}"
    detail = "; ".join([figures, *result.problems])
    return VerificationCheck(
        name,
        result.passed,
        detail,
        max_abs_z=result.max_abs_z,
        threshold=result.threshold,
        min_ratio=result.min_ratio,
        max_ratio=result.max_ratio,
        num_elements=result.num_elements,
        alpha=result.alpha,
        num_deterministic=result.num_deterministic,
    )


def _element_namer(
    output_names: Sequence[str], output_row_shapes: Sequence[tuple[int, ...]], rows: int
) -> Callable[[int], str]:
    """Names a flat element index of one sample as ``output[row, index...]``."""
    sizes = [rows * math.prod(shape) for shape in output_row_shapes]

    def describe(flat: int) -> str:
        for name, shape, size in zip(output_names, output_row_shapes, sizes, strict=True):
            if flat < size:
                index = np.unravel_index(flat, (rows, *shape))
                return f"{name}[{', '.join(str(int(i)) for i in index)}]"
            flat -= size
        return f"element {flat}"

    return describe


@dataclass
class _Sampling:
    """Moments being accumulated on both sides, and the sampling time spent so far."""

    onnx: MomentAccumulator = dataclasses.field(default_factory=MomentAccumulator)
    torch: MomentAccumulator = dataclasses.field(default_factory=MomentAccumulator)
    done: int = 0
    spent_s: float = 0.0

    def draw(self, onnx_side: _OnnxSampler, torch_side: _TorchSampler, count: int) -> None:
        started = time.perf_counter()
        self.onnx.update(onnx_side.samples(count))
        self.torch.update(torch_side.samples(count))
        self.spent_s += time.perf_counter() - started
        self.done += count


def _sample_moments(
    onnx_side: _OnnxSampler,
    torch_side: _TorchSampler,
    plan: VerificationPlan,
    *,
    chunk: int,
    adaptive_budget_s: float | None,
    sampling: _Sampling | None = None,
) -> tuple[Moments, Moments, VerificationPlan]:
    """Draw the plan's n samples on each side (beyond what ``sampling`` holds), chunk by chunk.

    With ``adaptive_budget_s`` (an automatic plan), n is cut after any chunk whose pace
    would overrun the budget (the machine got busier than when the plan was made), never
    below MIN_AUTO_SAMPLES.
    """
    sampling = sampling or _Sampling()
    base_reason = plan.reason
    phase_started = (sampling.done, sampling.spent_s)
    while sampling.done < plan.num_samples:
        sampling.draw(onnx_side, torch_side, min(chunk, plan.num_samples - sampling.done))
        if adaptive_budget_s is None or sampling.done >= plan.num_samples:
            continue
        # The pace of this phase (the samples drawn with these rows).
        phase_done = sampling.done - phase_started[0]
        per_sample_s = (sampling.spent_s - phase_started[1]) / phase_done
        left_s = adaptive_budget_s - sampling.spent_s
        affordable = sampling.done + max(0, int(left_s / per_sample_s))
        n = max(MIN_AUTO_SAMPLES, sampling.done, min(plan.num_samples, affordable))
        if n < plan.num_samples:
            plan = dataclasses.replace(
                plan,
                num_samples=n,
                reason=f"{base_reason}; cut to n={n} after {sampling.done} samples "
                f"({per_sample_s * 1e3:.3g} ms per sample)",
                estimated_s=sampling.spent_s + (n - sampling.done) * per_sample_s,
            )
    return sampling.onnx.result(), sampling.torch.result(), plan


def verify_model(
    onnx_model: bytes,
    mc_model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    num_samples: int | None = None,
    false_failure_probability: float = 1e-4,
    max_rows_per_run: int = 65536,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    device: str | None = None,
    output_names: Sequence[str] | None = None,
    config: ModelConfig | None = None,
) -> VerificationReport:
    """Check that ONNX Runtime samples like PyTorch MC dropout on the example input.

    Args:
        onnx_model: the serialized graph, exactly as it will be published.
        mc_model: the PyTorch model in MC dropout mode (``mc_dropout_copy``). It is moved
            to ``device`` for the sampling and back to the CPU after.
        example_inputs: one tensor per graph input, (B, ...); the first ``MAX_VERIFY_ROWS``
            rows are used (fewer when an automatic plan cuts them).
        num_samples: n, MC samples per side (each a pass over the rows); None: automatic,
            ``DEFAULT_SAMPLES`` cut (rows first) to fit ``time_budget_s``.
        false_failure_probability: total probability that a correct export fails, split
            equally between the mean and variance tests.
        max_rows_per_run: the largest tile (samples * rows) per session run / forward pass.
        time_budget_s: automatic plans: the sampling time aimed at (both sides).
        device: where PyTorch runs ("cpu", "cuda", "cuda:1"); None: CUDA when available.
        output_names: the graph outputs, in order, for the messages; None reads them from
            the graph.
        config: the version's config, for the server's engine that draws the ONNX samples
            (:func:`onnx_sampler`); None reads every output as values.

    Returns:
        The report; ``report.passed`` is False when any check failed. ``report.plan`` says
        how n and the rows were chosen.

    Raises:
        ValueError: ``num_samples`` < 100, ``false_failure_probability`` not in (0, 1) or
            ``time_budget_s`` <= 0.
    """
    if num_samples is not None and num_samples < 100:
        raise ValueError(f"num_samples must be >= 100, got {num_samples}")
    if not 0.0 < false_failure_probability < 1.0:
        raise ValueError(
            f"false_failure_probability must be in (0, 1), got {false_failure_probability}"
        )
    if time_budget_s <= 0:
        raise ValueError(f"time_budget_s must be > 0, got {time_budget_s}")
    started = time.perf_counter()
    torch_device = _pick_device(device)
    all_inputs = [t.detach().cpu()[:MAX_VERIFY_ROWS].numpy() for t in example_inputs]
    run = onnx_sampler(onnx_model, config)
    if output_names is None:
        output_names = [o.name for o in onnx.load_from_string(onnx_model).graph.output]
    onnx_all = _OnnxSampler(run, all_inputs)

    checks = [_repeated_runs_differ(onnx_all, all_inputs), _row_copies_differ(onnx_all, all_inputs)]

    moved = torch_device.type != "cpu"
    if moved:
        mc_model.to(torch_device)
    try:
        torch_all = _TorchSampler(mc_model, all_inputs, torch_device)
        rows = all_inputs[0].shape[0]
        torch_all.samples(1)  # warm-up (CUDA context, kernel selection), not timed
        # The first chunk, of every row and at the real tile size (a small probe would be
        # dominated by per-call overhead), is timed to plan the rows and n.
        sampling = _Sampling()
        first = min(FIRST_CHUNK_SAMPLES, max(1, max_rows_per_run // rows))
        if num_samples is not None:
            first = min(first, num_samples)
        sampling.draw(onnx_all, torch_all, first)
        plan = _plan(sampling.spent_s / first, rows, num_samples, time_budget_s, torch_device)
        if plan.rows != rows:  # start again on fewer rows (one chunk of time lost)
            sampling = _Sampling(spent_s=sampling.spent_s)
        inputs = [x[: plan.rows] for x in all_inputs]
        onnx_moments, torch_moments, plan = _sample_moments(
            _OnnxSampler(run, inputs),
            _TorchSampler(mc_model, inputs, torch_device),
            plan,
            chunk=max(1, max_rows_per_run // plan.rows),
            adaptive_budget_s=time_budget_s if num_samples is None else None,
            sampling=sampling,
        )
    finally:
        if moved:
            mc_model.to("cpu")
    probe = run(inputs, 1)
    describe = _element_namer(
        output_names, [tuple(int(d) for d in p.shape[1:]) for p in probe], plan.rows
    )
    alpha = false_failure_probability / 2
    checks.append(
        _z_check(
            "mean_z_test",
            mean_z_test(onnx_moments, torch_moments, alpha, describe),
            plan.num_samples,
        )
    )
    checks.append(
        _z_check(
            "variance_ratio",
            variance_ratio_test(onnx_moments, torch_moments, alpha, describe),
            plan.num_samples,
        )
    )
    report = VerificationReport(
        num_samples=plan.num_samples,
        false_failure_probability=false_failure_probability,
        rows=plan.rows,
        checks=tuple(checks),
        elapsed_s=time.perf_counter() - started,
        plan=plan,
    )
    log.info("verification %s in %.1f s", "passed" if report.passed else "FAILED", report.elapsed_s)
    return report
