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
equally between checks 3 and 4.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from export.stats import MomentAccumulator, Moments, ZTestResult, mean_z_test, variance_ratio_test
from service.engine.onnx_session import SessionConfig, create_session

__all__ = [
    "COPIES_PER_ROW",
    "MAX_VERIFY_ROWS",
    "REPEATED_RUNS",
    "VerificationCheck",
    "VerificationReport",
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

Array = npt.NDArray[Any]


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

    def to_dict(self) -> dict[str, Any]:
        """The ``verification.checks[]`` entry of metadata.json (unset figures omitted)."""
        entry: dict[str, Any] = {"name": self.name, "passed": self.passed}
        for key in ("max_abs_z", "threshold", "min_ratio", "max_ratio", "num_elements", "alpha"):
            value = getattr(self, key)
            if value is not None:
                entry[key] = round(value, 6) if isinstance(value, float) else value
        entry["detail"] = self.detail
        return entry


@dataclass(frozen=True)
class VerificationReport:
    """Every verification check on one exported graph.

    Attributes:
        num_samples: n, the MC samples drawn on each side.
        false_failure_probability: total probability that a correct export fails.
        rows: rows of the example input that were tiled.
        checks: the checks, in the order they ran.
        elapsed_s: wall time of the verification.
    """

    num_samples: int
    false_failure_probability: float
    rows: int
    checks: tuple[VerificationCheck, ...]
    elapsed_s: float = 0.0

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
        return {
            "passed": self.passed,
            "num_samples": self.num_samples,
            "false_failure_probability": self.false_failure_probability,
            "checks": [check.to_dict() for check in self.checks],
        }

    def summary(self) -> str:
        """One line per check."""
        lines = [
            f"verification: n={self.num_samples} samples per side, {self.rows} rows, "
            f"false-failure probability {self.false_failure_probability:g}, "
            f"{self.elapsed_s:.2f} s"
        ]
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
    def __init__(self, session: ort.InferenceSession, inputs: Sequence[Array]) -> None:
        self._session = session
        self._names = [i.name for i in session.get_inputs()]
        self._inputs = inputs

    def run(self, inputs: Sequence[Array]) -> list[Array]:
        return list(self._session.run(None, dict(zip(self._names, inputs, strict=True))))

    def samples(self, count: int) -> npt.NDArray[np.float64]:
        tiled = [_tile(x, count) for x in self._inputs]
        return _flatten_outputs(self.run(tiled), count)


class _TorchSampler:
    def __init__(self, mc_model: nn.Module, inputs: Sequence[Array]) -> None:
        self._model = mc_model
        self._inputs = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]

    def samples(self, count: int) -> npt.NDArray[np.float64]:
        tiled = [x.repeat(count, *([1] * (x.dim() - 1))) for x in self._inputs]
        with torch.no_grad():
            result = self._model(*tiled)
        outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        return _flatten_outputs([o.detach().cpu().numpy() for o in outputs], count)


def _moments(
    draw: Callable[[int], npt.NDArray[np.float64]], num_samples: int, chunk: int
) -> Moments:
    accumulator = MomentAccumulator()
    done = 0
    while done < num_samples:
        count = min(chunk, num_samples - done)
        accumulator.update(draw(count))
        done += count
    return accumulator.result()


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
    tiled = [_tile(x[:1], COPIES_PER_ROW) for x in inputs]
    for attempt in range(1, _COPY_ATTEMPTS + 1):
        outputs = sampler.run(tiled)
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


def verify_model(
    onnx_model: bytes,
    mc_model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    num_samples: int = 4000,
    false_failure_probability: float = 1e-4,
    max_rows_per_run: int = 65536,
) -> VerificationReport:
    """Check that ONNX Runtime samples like PyTorch MC dropout on the example input.

    Args:
        onnx_model: the serialized graph, exactly as it will be published.
        mc_model: the PyTorch model in MC dropout mode (``mc_dropout_copy``).
        example_inputs: one tensor per graph input, (B, ...); the first ``MAX_VERIFY_ROWS``
            rows are used.
        num_samples: n, MC samples per side (each a pass over the B rows).
        false_failure_probability: total probability that a correct export fails, split
            equally between the mean and variance tests.
        max_rows_per_run: the largest tile (samples * rows) per session run / forward pass.

    Returns:
        The report; ``report.passed`` is False when any check failed.

    Raises:
        ValueError: ``num_samples`` < 100 or ``false_failure_probability`` not in (0, 1).
    """
    if num_samples < 100:
        raise ValueError(f"num_samples must be >= 100, got {num_samples}")
    if not 0.0 < false_failure_probability < 1.0:
        raise ValueError(
            f"false_failure_probability must be in (0, 1), got {false_failure_probability}"
        )
    started = time.perf_counter()
    inputs = [t.detach().cpu()[:MAX_VERIFY_ROWS].numpy() for t in example_inputs]
    rows = inputs[0].shape[0]
    session = create_session(onnx_model, SessionConfig(use_gpu=False))
    onnx_sampler = _OnnxSampler(session, inputs)
    torch_sampler = _TorchSampler(mc_model, inputs)

    checks = [_repeated_runs_differ(onnx_sampler, inputs), _row_copies_differ(onnx_sampler, inputs)]

    chunk = max(1, max_rows_per_run // rows)
    onnx_moments = _moments(onnx_sampler.samples, num_samples, chunk)
    torch_moments = _moments(torch_sampler.samples, num_samples, chunk)
    outputs = session.get_outputs()
    probe = onnx_sampler.run(inputs)
    describe = _element_namer(
        [o.name for o in outputs], [tuple(int(d) for d in p.shape[1:]) for p in probe], rows
    )
    alpha = false_failure_probability / 2
    checks.append(
        _z_check(
            "mean_z_test",
            mean_z_test(onnx_moments, torch_moments, alpha, describe),
            num_samples,
        )
    )
    checks.append(
        _z_check(
            "variance_ratio",
            variance_ratio_test(onnx_moments, torch_moments, alpha, describe),
            num_samples,
        )
    )
    report = VerificationReport(
        num_samples=num_samples,
        false_failure_probability=false_failure_probability,
        rows=rows,
        checks=tuple(checks),
        elapsed_s=time.perf_counter() - started,
    )
    log.info("verification %s in %.1f s", "passed" if report.passed else "FAILED", report.elapsed_s)
    return report
