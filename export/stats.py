"""Two-sample tests that ONNX Runtime's MC samples match PyTorch's, per output element.

Pure numpy, float64 throughout. Samples come in as (n, K): n independent MC samples of the K
output elements of one tiled batch (all outputs, all rows, flattened). Each side is reduced to
its moments, streamed chunk by chunk so n can be large.

Both tests use a Bonferroni threshold: with K elements and a false-failure probability
``alpha`` for the test, an element fails when ``|z| > Phi^-1(1 - alpha / (2K))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

__all__ = [
    "DETERMINISTIC_RTOL",
    "ZERO_VARIANCE_RTOL",
    "MomentAccumulator",
    "Moments",
    "ZTestResult",
    "bonferroni_threshold",
    "mean_z_test",
    "variance_ratio_test",
]

FloatArray = npt.NDArray[np.float64]

#: An element is deterministic when its variance is below this times (1 + mean^2): float32
#: rounding noise (e.g. different GEMM kernels for different rows of a tile) stays below it.
ZERO_VARIANCE_RTOL = 1e-12
#: Deterministic elements must agree to this tolerance, relative to (1 + |mean|).
DETERMINISTIC_RTOL = 1e-4


@dataclass(frozen=True)
class Moments:
    """Per-element sample moments of n samples.

    Attributes:
        n: number of samples.
        mean: (K,) sample means.
        m2: (K,) second central moments (ddof=0).
        m4: (K,) fourth central moments.
    """

    n: int
    mean: FloatArray
    m2: FloatArray
    m4: FloatArray

    @classmethod
    def from_samples(cls, samples: npt.ArrayLike) -> Moments:
        """Moments of (n, K) samples (a 1-D array is one element)."""
        accumulator = MomentAccumulator()
        accumulator.update(samples)
        return accumulator.result()

    @property
    def variance(self) -> FloatArray:
        """(K,) unbiased variances (ddof=1)."""
        return self.m2 * (self.n / (self.n - 1))

    @property
    def kurtosis(self) -> FloatArray:
        """(K,) kurtosis m4 / m2^2 (3 for a normal, 1 for a symmetric two-point law).

        Elements with m2 == 0 get 3 (they are never used: deterministic elements are
        compared for equality instead).
        """
        safe = np.where(self.m2 > 0, self.m2, 1.0)
        return np.where(self.m2 > 0, self.m4 / safe**2, 3.0)

    def deterministic(self) -> npt.NDArray[np.bool_]:
        """(K,) True where the variance is ~0 relative to the mean."""
        return self.variance < ZERO_VARIANCE_RTOL * (1.0 + self.mean**2)


class MomentAccumulator:
    """Streams (m, K) chunks of samples into per-element moments.

    Sums are taken around a shift (the first chunk's mean), which keeps the raw-moment
    formulas free of catastrophic cancellation when the mean is large against the spread.
    """

    def __init__(self) -> None:
        self._n = 0
        self._shift: FloatArray | None = None
        self._sums: list[FloatArray] = []

    def update(self, samples: npt.ArrayLike) -> None:
        """Add samples, (m, K) or (m,) for one element.

        Raises:
            ValueError: K differs from earlier chunks.
        """
        chunk = np.asarray(samples, dtype=np.float64)
        if chunk.ndim == 1:
            chunk = chunk[:, None]
        chunk = chunk.reshape(chunk.shape[0], -1)
        if self._shift is None:
            self._shift = chunk.mean(axis=0)
            self._sums = [np.zeros_like(self._shift) for _ in range(4)]
        elif chunk.shape[1] != self._shift.shape[0]:
            raise ValueError(f"expected {self._shift.shape[0]} elements, got {chunk.shape[1]}")
        deviation = chunk - self._shift
        power = np.ones_like(deviation)
        for k in range(4):
            power = power * deviation
            self._sums[k] += power.sum(axis=0)
        self._n += chunk.shape[0]

    def result(self) -> Moments:
        """The moments so far.

        Raises:
            ValueError: fewer than two samples.
        """
        if self._shift is None or self._n < 2:
            raise ValueError(f"need at least 2 samples, got {self._n}")
        n = self._n
        s1, s2, s3, s4 = (s / n for s in self._sums)
        m2 = np.maximum(s2 - s1**2, 0.0)
        m4 = np.maximum(s4 - 4 * s1 * s3 + 6 * s1**2 * s2 - 3 * s1**4, 0.0)
        return Moments(n=n, mean=self._shift + s1, m2=m2, m4=m4)


@dataclass(frozen=True)
class ZTestResult:
    """The outcome of one per-element test.

    Attributes:
        passed: no element failed.
        max_abs_z: the largest |z| over the elements that got a z (0 if none did).
        worst_element: the flat index of that element (-1 if none).
        threshold: the Bonferroni threshold on |z|.
        num_elements: K.
        alpha: the false-failure probability of this test.
        num_deterministic: elements with ~0 variance on both sides.
        problems: one sentence per kind of failure.
        min_ratio: smallest variance ratio (ONNX / PyTorch) over elements with variance.
        max_ratio: largest variance ratio.
    """

    passed: bool
    max_abs_z: float
    worst_element: int
    threshold: float
    num_elements: int
    alpha: float
    num_deterministic: int
    problems: tuple[str, ...] = ()
    min_ratio: float | None = None
    max_ratio: float | None = None


def bonferroni_threshold(alpha: float, num_elements: int) -> float:
    """|z| threshold for a two-sided test on K elements with total false-failure ``alpha``.

    Args:
        alpha: total false-failure probability of the test, in (0, 1).
        num_elements: K >= 1.

    Returns:
        ``Phi^-1(1 - alpha / (2K))``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if num_elements < 1:
        raise ValueError(f"num_elements must be >= 1, got {num_elements}")
    return NormalDist().inv_cdf(1.0 - alpha / (2 * num_elements))


def _check_same_shape(a: Moments, b: Moments) -> None:
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"moments cover {a.mean.shape} and {b.mean.shape} elements")


def _max_abs(z: FloatArray, index: npt.NDArray[np.intp]) -> tuple[float, int]:
    if z.size == 0:
        return 0.0, -1
    i = int(np.argmax(np.abs(z)))
    return float(abs(z[i])), int(index[i])


def mean_z_test(
    onnx_side: Moments,
    torch_side: Moments,
    alpha: float,
    describe: Callable[[int], str] = str,
    margin: float = 0.0,
) -> ZTestResult:
    """Per element ``z = (m_onnx - m_torch) / sqrt(v_onnx / n_onnx + v_torch / n_torch)``.

    Elements deterministic on both sides are compared for near equality instead
    (``DETERMINISTIC_RTOL``). With a ``margin`` (half precision), a difference within
    ``margin * (|m_torch| + sd_torch)`` counts as none: the test then asks whether the means
    differ by more than the stated tolerance, with the same false-failure probability.

    Args:
        onnx_side: ONNX Runtime moments.
        torch_side: PyTorch moments.
        alpha: false-failure probability of this test.
        describe: names an element from its flat index, for the problems.
        margin: the tolerated difference, relative to the element's scale.

    Returns:
        The result.
    """
    _check_same_shape(onnx_side, torch_side)
    num_elements = onnx_side.mean.size
    threshold = bonferroni_threshold(alpha, num_elements)
    both_fixed = onnx_side.deterministic() & torch_side.deterministic()
    problems = []

    fixed = np.flatnonzero(both_fixed)
    difference = np.abs(onnx_side.mean[fixed] - torch_side.mean[fixed])
    tolerance = (DETERMINISTIC_RTOL + margin) * (1.0 + np.abs(torch_side.mean[fixed]))
    unequal = fixed[difference > tolerance]
    if unequal.size:
        i = int(unequal[0])
        problems.append(
            f"{unequal.size} deterministic elements differ, e.g. {describe(i)}: "
            f"{onnx_side.mean[i]:.6g} (ONNX) vs {torch_side.mean[i]:.6g} (PyTorch)"
        )

    tested = np.flatnonzero(~both_fixed)
    standard_error = np.sqrt(
        onnx_side.variance[tested] / onnx_side.n + torch_side.variance[tested] / torch_side.n
    )
    difference = onnx_side.mean[tested] - torch_side.mean[tested]
    if margin:
        scale = np.abs(torch_side.mean[tested]) + np.sqrt(torch_side.variance[tested])
        difference = np.sign(difference) * np.maximum(np.abs(difference) - margin * scale, 0.0)
    z = difference / standard_error
    max_abs_z, worst = _max_abs(z, tested)
    if max_abs_z > threshold:
        count = int(np.sum(np.abs(z) > threshold))
        problems.append(
            f"{count} elements have |z| > {threshold:.2f}, worst {describe(worst)}: "
            f"z={max_abs_z:.2f}, mean {onnx_side.mean[worst]:.6g} (ONNX) vs "
            f"{torch_side.mean[worst]:.6g} (PyTorch)"
        )
    return ZTestResult(
        passed=not problems,
        max_abs_z=max_abs_z,
        worst_element=worst,
        threshold=threshold,
        num_elements=num_elements,
        alpha=alpha,
        num_deterministic=int(fixed.size),
        problems=tuple(problems),
    )


def variance_ratio_test(
    onnx_side: Moments,
    torch_side: Moments,
    alpha: float,
    describe: Callable[[int], str] = str,
    margin: float = 0.0,
) -> ZTestResult:
    """Per element z of the log variance ratio ``log(v_onnx / v_torch)``.

    The standard error of a log sample variance is ``sqrt((k - 1) / n + 2 / (n (n - 1)))``
    with k the kurtosis (the exact finite-sample variance of s^2, by the delta method). The
    ``2 / (n (n - 1))`` term keeps the standard error from vanishing when k = 1 (a symmetric
    two-point law, as dropout right before a linear output can give).

    An element with variance on one side and none on the other fails; elements
    deterministic on both sides are left to ``mean_z_test``. With a ``margin`` (half
    precision), a variance ratio within [1 / (1 + margin), 1 + margin] counts as 1.

    Args:
        onnx_side: ONNX Runtime moments.
        torch_side: PyTorch moments.
        alpha: false-failure probability of this test.
        describe: names an element from its flat index, for the problems.
        margin: the tolerated relative difference of the variances.

    Returns:
        The result, with the range of the variance ratio.
    """
    _check_same_shape(onnx_side, torch_side)
    num_elements = onnx_side.mean.size
    threshold = bonferroni_threshold(alpha, num_elements)
    onnx_fixed = onnx_side.deterministic()
    torch_fixed = torch_side.deterministic()
    problems = []

    for fixed_side, other, fixed, free in (
        ("ONNX Runtime", "PyTorch", onnx_fixed, torch_fixed),
        ("PyTorch", "ONNX Runtime", torch_fixed, onnx_fixed),
    ):
        lopsided = np.flatnonzero(fixed & ~free)
        if lopsided.size:
            i = int(lopsided[0])
            problems.append(
                f"{lopsided.size} elements vary in {other} but not in {fixed_side}, e.g. "
                f"{describe(i)}: variance {onnx_side.variance[i]:.3g} (ONNX) vs "
                f"{torch_side.variance[i]:.3g} (PyTorch)"
            )

    tested = np.flatnonzero(~onnx_fixed & ~torch_fixed)
    n_o, n_t = onnx_side.n, torch_side.n
    ratio = onnx_side.variance[tested] / torch_side.variance[tested]
    variance_of_log = (
        (onnx_side.kurtosis[tested] - 1.0) / n_o
        + 2.0 / (n_o * (n_o - 1))
        + (torch_side.kurtosis[tested] - 1.0) / n_t
        + 2.0 / (n_t * (n_t - 1))
    )
    log_ratio = np.log(ratio)
    if margin:
        allowed = np.log1p(margin)
        log_ratio = np.sign(log_ratio) * np.maximum(np.abs(log_ratio) - allowed, 0.0)
    z = log_ratio / np.sqrt(variance_of_log)
    max_abs_z, worst = _max_abs(z, tested)
    if max_abs_z > threshold:
        count = int(np.sum(np.abs(z) > threshold))
        ratio_worst = onnx_side.variance[worst] / torch_side.variance[worst]
        problems.append(
            f"{count} elements have |z| > {threshold:.2f}, worst {describe(worst)}: "
            f"z={max_abs_z:.2f}, variance ratio {ratio_worst:.4g}"
        )
    return ZTestResult(
        passed=not problems,
        max_abs_z=max_abs_z,
        worst_element=worst,
        threshold=threshold,
        num_elements=num_elements,
        alpha=alpha,
        num_deterministic=int(np.sum(onnx_fixed & torch_fixed)),
        problems=tuple(problems),
        min_ratio=float(ratio.min()) if ratio.size else None,
        max_ratio=float(ratio.max()) if ratio.size else None,
    )
