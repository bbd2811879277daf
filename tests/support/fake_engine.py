"""One fake engine for the unit tests of the core and its batcher, and a data plane on it.

The engine answers every row with its own first input value as the mean (so a caller can check
that it got exactly its rows back) and records every run: the rows, T and the cancel token it
was given. Runs can be held at a ``threading.Event`` gate, never with sleeps, so tests do not
depend on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.core.dataplane import DataPlane
from service.engine.runtime import CancelToken, OutputStats
from service.errors import Cancelled
from service.maths.uncertainty import RegressionStats
from tests.support.plane import make_plane, source

__all__ = ["CONFIG", "SAFETY_TIMEOUT_S", "FakeEngine", "make_core"]

#: Model "m": x (B, 3) float32 -> y (B, 1) regression, T in 1..100 (10 by default).
CONFIG: dict[str, Any] = {
    "task": "regression",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1], "semantics": "values"}],
    "num_samples": {"default": 10, "max": 100},
}
#: Bound on every wait of a test on the engine; never reached when the code under test works.
SAFETY_TIMEOUT_S = 5.0


class FakeEngine:
    """Answers mean = x[:, 0] per row (variance 0); records the rows, T and token of every run.

    Args:
        gate: every run waits here until it is set.
        fail: raise a RuntimeError (with a secret in its message) instead of answering.
        drop_a_row: answer one row fewer than it got (a broken engine).
    """

    provider = "FakeExecutionProvider"

    def __init__(
        self, gate: threading.Event | None = None, fail: bool = False, drop_a_row: bool = False
    ) -> None:
        self.gate = gate
        self.fail = fail
        self.drop_a_row = drop_a_row
        self.started = threading.Semaphore(0)  # released once per run
        self.runs: list[tuple[NDArray[Any], int]] = []
        self.tokens: list[CancelToken | None] = []

    def run(
        self,
        inputs: Mapping[str, NDArray[Any]],
        num_samples: int,
        cancel: CancelToken | None = None,
        *,
        keep_samples: bool = False,
        interval_levels: tuple[float, ...] = (),
        seed: int | None = None,
    ) -> list[OutputStats]:
        x = inputs["x"]
        self.runs.append((x.copy(), num_samples))
        self.tokens.append(cancel)
        self.started.release()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if cancel is not None and cancel.cancelled:
            raise Cancelled("request cancelled")
        if self.fail:
            raise RuntimeError("secret internal detail")
        mean = x[: len(x) - self.drop_a_row, :1].astype(np.float64)
        # What the engine does with a row whose outputs overflow: its mean comes back NaN.
        mean[x[: len(mean), 1] > 1e30] = np.nan
        zeros = np.zeros_like(mean)
        return [RegressionStats(num_samples=num_samples, mean=mean, variance=zeros, std=zeros)]

    def is_stochastic(self, copies: int = 256) -> bool:
        return True

    def output_elements(self, inputs: Mapping[str, NDArray[Any]]) -> list[int]:
        return [1]

    def run_rows(self) -> list[list[float]]:
        """The first input value of every row, per run."""
        return [x[:, 0].tolist() for x, _ in self.runs]

    async def wait_started(self) -> None:
        """Wait (off the event loop) until a run has started."""
        started = await asyncio.get_running_loop().run_in_executor(
            None, self.started.acquire, True, SAFETY_TIMEOUT_S
        )
        assert started, "the engine never started a run"


def make_core(
    engine: FakeEngine, batching: dict[str, Any] | None = None, **settings: Any
) -> DataPlane:
    """Versions 1 and 2 of model "m" (CONFIG, with ``batching`` as its dynamic_batching
    section), both on ``engine``; ``settings`` are Settings fields."""
    raw = CONFIG if batching is None else dict(CONFIG, dynamic_batching=batching)
    return make_plane([(source(raw, version=v), engine) for v in (1, 2)], **settings)
