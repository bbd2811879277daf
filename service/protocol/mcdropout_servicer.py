"""``mcdropout.v1.MCDropoutService``: translates wire messages to and from the core.

No numpy maths and no ONNX Runtime here: errors raised by the core travel up as
``ServiceError`` and are mapped to status codes by ``service.protocol.grpc_server``.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray

from service.core.dataplane import InferenceCore, OutputResult, PredictInput, PredictResult
from service.errors import InvalidInput
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.maths.uncertainty import ClassificationStats, RegressionStats
from service.protocol.codec import PB_DTYPE_OF, decode_tensor, encode_tensor
from service.repository import Semantics, Task, TensorSpec

__all__ = ["MCDropoutServicer", "encode_result"]

_TASK = {Task.CLASSIFICATION: pb.TASK_CLASSIFICATION, Task.REGRESSION: pb.TASK_REGRESSION}
_SEMANTICS = {
    Semantics.LOGITS: pb.OUTPUT_SEMANTICS_LOGITS,
    Semantics.PROBABILITIES: pb.OUTPUT_SEMANTICS_PROBABILITIES,
    Semantics.VALUES: pb.OUTPUT_SEMANTICS_VALUES,
    Semantics.VARIANCE: pb.OUTPUT_SEMANTICS_VARIANCE,
    Semantics.LOG_VARIANCE: pb.OUTPUT_SEMANTICS_LOG_VARIANCE,
}


def _f64(array: NDArray[Any]) -> pb.Tensor:
    return encode_tensor(np.asarray(array, dtype=np.float64))


def _encode_output(result: OutputResult, labels: tuple[str, ...]) -> pb.OutputStatistics:
    stats = result.stats
    semantics = result.spec.semantics or Semantics.VALUES
    message = pb.OutputStatistics(
        name=result.spec.name,
        semantics=_SEMANTICS[semantics],
        mean=_f64(stats.mean),
        variance=_f64(stats.variance),
        std=_f64(stats.std),
    )
    if stats.samples is not None:
        message.samples.CopyFrom(_f64(stats.samples))
    if isinstance(stats, RegressionStats):
        message.intervals.extend(
            pb.Interval(level=i.level, method=i.method, lower=_f64(i.lower), upper=_f64(i.upper))
            for i in stats.intervals
        )
    if isinstance(stats, RegressionStats) and stats.aleatoric_variance is not None:
        message.aleatoric_variance.CopyFrom(_f64(stats.aleatoric_variance))
        if stats.total_variance is not None:
            message.total_variance.CopyFrom(_f64(stats.total_variance))
    if isinstance(stats, ClassificationStats):
        message.predicted_class.CopyFrom(encode_tensor(stats.predicted_class.astype(np.int64)))
        if labels:
            message.predicted_label.extend(labels[int(c)] for c in stats.predicted_class)
        message.predictive_entropy.CopyFrom(_f64(stats.predictive_entropy))
        message.expected_entropy.CopyFrom(_f64(stats.expected_entropy))
        message.mutual_information.CopyFrom(_f64(stats.mutual_information))
        message.variation_ratio.CopyFrom(_f64(stats.variation_ratio))
    return message


def encode_result(result: PredictResult) -> pb.PredictResponse:
    """The wire answer of a Predict call."""
    response = pb.PredictResponse(
        model=result.model,
        version=str(result.version),
        num_samples=result.num_samples,
        outputs=[_encode_output(o, result.labels) for o in result.outputs],
    )
    if result.num_samples_per_row is not None:
        response.num_samples_per_row.CopyFrom(encode_tensor(result.num_samples_per_row))
    return response


def _spec(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=spec.name,
        dtype=PB_DTYPE_OF[spec.dtype.name],
        shape=list(spec.shape),
        semantics=(
            _SEMANTICS[spec.semantics] if spec.semantics else pb.OUTPUT_SEMANTICS_UNSPECIFIED
        ),
    )


class MCDropoutServicer(pb_grpc.MCDropoutServiceServicer):
    """The project's own API, backed by :class:`InferenceCore`."""

    def __init__(self, core: InferenceCore) -> None:
        self._core = core

    async def Predict(  # noqa: N802 (gRPC method name)
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        inputs: dict[str, NDArray[Any]] = {}
        for named in request.inputs:
            if named.name in inputs:
                raise InvalidInput(f"input {named.name!r} is given twice")
            inputs[named.name] = decode_tensor(named.tensor, named.name)
        result = await self._core.predict(
            PredictInput(
                model=request.model,
                version=request.version or None,
                inputs=inputs,
                num_samples=request.num_samples or None,
                return_samples=request.return_samples,
                interval_levels=tuple(request.interval_levels),
                target_standard_error=request.target_standard_error or None,
                seed=request.seed if request.HasField("seed") else None,
            ),
            timeout_s=context.time_remaining(),
        )
        return encode_result(result)

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        registry = self._core.registry
        models = []
        for name in registry.names():
            newest = registry.get(name)
            models.append(
                pb.ModelSummary(
                    name=name,
                    versions=[str(v) for v in registry.versions(name)],
                    task=_TASK[newest.config.task],
                    ready=self._core.ready,
                )
            )
        return pb.ListModelsResponse(models=models)

    async def GetModelMetadata(  # noqa: N802
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadata:
        loaded = self._core.registry.get(request.model, request.version or None)
        config, provenance = loaded.config, loaded.source.provenance
        return pb.ModelMetadata(
            name=config.name,
            version=str(loaded.version),
            versions=[str(v) for v in self._core.registry.versions(config.name)],
            task=_TASK[config.task],
            description=config.description,
            inputs=[_spec(s) for s in config.inputs],
            outputs=[_spec(s) for s in config.outputs],
            labels=list(config.labels),
            default_num_samples=config.default_num_samples,
            max_num_samples=config.max_num_samples,
            provider=loaded.engine.provider,
            opset=provenance.opset,
            dropout=[
                pb.DropoutLayer(module=d.module, type=d.type, p=d.p) for d in provenance.dropout
            ],
            verified=provenance.verified,
            weights_sha256=provenance.weights_sha256,
        )
