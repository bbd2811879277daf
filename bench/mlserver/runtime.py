"""MLServer custom runtime: MC dropout on an exported ONNX graph, T tiled into one session run.

Runs inside MLServer's own virtual environment (requirements.txt beside this file), never in
the project's: it imports mlserver, onnxruntime and numpy only. ``model-settings.json`` points
``implementation`` at ``runtime.MCDropoutRuntime`` and ``parameters.uri`` at the same
``model.onnx`` the mcdropout server loads; ``parameters.extra`` holds:

* ``num_samples``: T, the stochastic passes per row (fixed per model: with adaptive batching
  on, requests merged into one batch must agree on it).
* ``intra_op_threads``: ONNX Runtime threads per run; 0 lets ONNX Runtime pick (one per core).

With adaptive batching on (``max_batch_size`` > 1 and ``max_batch_time`` > 0), MLServer
concatenates the queued requests along the batch axis, calls ``predict`` once and splits the
answer back per request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, Parameters
from mlserver.utils import get_model_uri

__all__ = ["MCDropoutRuntime"]


class MCDropoutRuntime(MLModel):
    """Answers, per row, the mean and unbiased variance over T samples of the softmax outputs.

    Outputs: "mean" and "variance", FP64, each (B, C).
    """

    async def load(self) -> bool:
        """Open an ONNX Runtime session that keeps dropout, and check that it samples."""
        extra: dict[str, Any] = dict(self.settings.parameters.extra or {})
        self._num_samples = int(extra.get("num_samples", 50))
        if self._num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {self._num_samples}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 0))
        # Without this, ONNX Runtime deletes every Dropout node as an inference-time no-op and
        # all T samples come out identical: the comparison would measure a deterministic model.
        self._session = ort.InferenceSession(
            await get_model_uri(self.settings),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["EliminateDropout"],
        )
        (graph_input,) = self._session.get_inputs()
        self._input_name = graph_input.name
        self._output_name = self._session.get_outputs()[0].name
        self._check_sampling(graph_input.shape)
        return True

    def _check_sampling(self, shape: list[Any]) -> None:
        """Fail loudly when two copies of one row give the same output (dropout removed)."""
        row = np.random.default_rng(0).uniform(0.0, 1.0, [1, *shape[1:]]).astype(np.float32)
        (out,) = self._session.run([self._output_name], {self._input_name: np.repeat(row, 8, 0)})
        if np.allclose(out, out[:1]):
            raise RuntimeError("copies of one row agree: the graph has no active dropout")

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """(B, ...) rows -> tile T times, sample-major [T*B, ...] -> one run -> statistics."""
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        rows = x.shape[0]
        tiled = np.tile(x, (self._num_samples,) + (1,) * (x.ndim - 1))  # (T*B, ...)
        (logits,) = self._session.run([self._output_name], {self._input_name: tiled})
        samples = logits.reshape(self._num_samples, rows, -1).astype(np.float64)  # (T, B, C)
        samples -= samples.max(axis=-1, keepdims=True)
        probabilities = np.exp(samples)
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            parameters=Parameters(num_samples=self._num_samples),
            outputs=[
                NumpyCodec.encode_output("mean", probabilities.mean(axis=0)),
                NumpyCodec.encode_output("variance", probabilities.var(axis=0, ddof=1)),
            ],
        )
