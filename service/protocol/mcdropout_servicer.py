"""``mcdropout.v1.MCDropoutService``: translates wire messages to and from the data plane.

No numpy maths and no ONNX Runtime here: errors raised by the data plane travel up as
``ServiceError`` and are mapped to status codes by ``service.protocol.status`` (through
``service.protocol.interceptor.StatusInterceptor``).
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray

from service.core.dataplane import (
    DataPlane,
    OutputResult,
    PredictInput,
    PredictResult,
    State,
    VersionState,
)
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.codec import PB_DTYPE_OF, encode_tensor, wire_tensor
from service.repository import Semantics, Task, TensorSpec

__all__ = ["MCDropoutServicer", "encode_result"]

_TASK = {
    Task.CLASSIFICATION: pb.TASK_CLASSIFICATION,
    Task.REGRESSION: pb.TASK_REGRESSION,
    Task.MIXED: pb.TASK_MIXED,
}
_STATE = {
    State.READY: pb.VERSION_STATE_READY,
    State.LOADING: pb.VERSION_STATE_LOADING,
    State.UNAVAILABLE: pb.VERSION_STATE_UNAVAILABLE,
    State.UNLOADING: pb.VERSION_STATE_UNLOADING,
}
_SEMANTICS = {
    Semantics.LOGITS: pb.OUTPUT_SEMANTICS_LOGITS,
    Semantics.PROBABILITIES: pb.OUTPUT_SEMANTICS_PROBABILITIES,
    Semantics.VALUES: pb.OUTPUT_SEMANTICS_VALUES,
    Semantics.VARIANCE: pb.OUTPUT_SEMANTICS_VARIANCE,
    Semantics.LOG_VARIANCE: pb.OUTPUT_SEMANTICS_LOG_VARIANCE,
}


def _f64(array: NDArray[Any]) -> pb.Tensor:
    return encode_tensor(np.asarray(array, dtype=np.float64))


def _encode_output(result: OutputResult) -> pb.OutputStatistics:
    """One output's message: the catalogue's statistics (each in the field of its name), then
    the samples and intervals when the request asked for them."""
    stats = result.stats
    message = pb.OutputStatistics(
        name=result.spec.name, semantics=_SEMANTICS[result.spec.semantics or Semantics.VALUES]
    )
    for statistic in result.statistics:
        value = statistic.read(stats, result.spec.labels)
        field = getattr(message, statistic.field)
        if statistic.dtype.is_bytes:
            field.extend(np.ravel(value).tolist())
        else:
            field.CopyFrom(encode_tensor(np.asarray(value, dtype=statistic.dtype.numpy)))
    if stats.samples is not None:
        message.samples.CopyFrom(_f64(stats.samples))
    message.intervals.extend(
        pb.Interval(level=i.level, method=i.method, lower=_f64(i.lower), upper=_f64(i.upper))
        for i in getattr(stats, "intervals", ())
    )
    return message


def encode_result(result: PredictResult) -> pb.PredictResponse:
    """The wire answer of a Predict call."""
    response = pb.PredictResponse(
        model=result.model,
        version=str(result.version),
        num_samples=result.num_samples,
        outputs=[_encode_output(o) for o in result.outputs],
    )
    if result.num_samples_per_row is not None:
        response.num_samples_per_row.CopyFrom(encode_tensor(result.num_samples_per_row))
    return response


def _version_status(states: tuple[VersionState, ...]) -> list[pb.VersionStatus]:
    return [
        pb.VersionStatus(
            version="" if s.version is None else str(s.version),
            state=_STATE[s.state],
            reason=s.reason,
        )
        for s in states
    ]


def _spec(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=spec.name,
        dtype=PB_DTYPE_OF[spec.dtype.name],
        shape=list(spec.shape),
        semantics=(
            _SEMANTICS[spec.semantics] if spec.semantics else pb.OUTPUT_SEMANTICS_UNSPECIFIED
        ),
        max_shape=list(spec.max_shape or ()),
        labels=list(spec.labels),
    )


class MCDropoutServicer(pb_grpc.MCDropoutServiceServicer):
    """The project's own API, over :class:`DataPlane`."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    async def Predict(  # noqa: N802 (gRPC method name)
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        result = await self._plane.predict(
            PredictInput(
                model=request.model,
                version=request.version or None,
                inputs=[wire_tensor(named.tensor, named.name) for named in request.inputs],
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
        return pb.ListModelsResponse(
            models=[
                pb.ModelSummary(
                    name=model.name,
                    versions=[str(v) for v in model.versions],
                    task=pb.TASK_UNSPECIFIED if model.task is None else _TASK[model.task],
                    ready=model.ready,
                    reason=model.reason,
                    version_status=_version_status(model.states),
                )
                for model in self._plane.list_models()
            ]
        )

    async def GetModelMetadata(  # noqa: N802
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadata:
        metadata = self._plane.metadata(request.model, request.version or None)
        config, provenance = metadata.config, metadata.provenance
        return pb.ModelMetadata(
            name=metadata.name,
            version=str(metadata.version),
            versions=[str(v) for v in metadata.versions],
            task=_TASK[config.task],
            description=config.description,
            inputs=[_spec(s) for s in config.inputs],
            outputs=[_spec(s) for s in config.outputs],
            labels=list(config.labels),
            default_num_samples=config.default_num_samples,
            max_num_samples=config.max_num_samples,
            provider=metadata.provider,
            opset=provenance.opset,
            dropout=[
                pb.DropoutLayer(module=d.module, type=d.type, p=d.p) for d in provenance.dropout
            ],
            verified=provenance.verified,
            weights_sha256=provenance.weights_sha256,
            version_status=_version_status(metadata.states),
            precision=config.precision,
        )
