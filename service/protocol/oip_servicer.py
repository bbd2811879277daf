"""``inference.GRPCInferenceService``: the Open Inference Protocol (KServe v2) over the data
plane.

A second protocol layer next to ``service.protocol.mcdropout_servicer``, as thin as the first:
it translates Open Inference Protocol messages to :class:`PredictInput` and the
:class:`PredictResult` back (``service.protocol.oip_codec``), and calls the same
:class:`DataPlane`, so batching, limits, admission and the statistics are shared, not
duplicated. Metadata and Triton's extensions (ModelConfig, ModelStatistics, RepositoryIndex,
RepositoryModelLoad / Unload) are the documents of ``service.protocol.oip_json``, which the
REST form sends as JSON. Unary errors travel up as ``ServiceError`` to
``service.protocol.interceptor.StatusInterceptor``, which maps them with
``service.protocol.status``; ModelStreamInfer answers each message on its own, through the same
``service.protocol.status.observe``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf import json_format

from service.core.dataplane import DataPlane, PredictInput
from service.gen.inference import grpc_service_pb2 as oip
from service.gen.inference import grpc_service_pb2_grpc as oip_grpc
from service.protocol import oip_json
from service.protocol.decoding import Undecodable, note
from service.protocol.oip_codec import (
    MC_SAMPLES,
    encode_outputs,
    mc_options_of,
    requested_output_names,
    wire_inputs,
)
from service.protocol.oip_json import EXTENSIONS, PLATFORM, SERVER_NAME
from service.protocol.parameters import earliest
from service.protocol.status import Gate, observe

__all__ = ["EXTENSIONS", "OIP_SERVICE_NAME", "PLATFORM", "SERVER_NAME", "OpenInferenceServicer"]

OIP_SERVICE_NAME: str = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: Requests of one ModelStreamInfer stream running at once. Answers still leave in request order;
#: running a few together lets the batcher merge them like concurrent unary calls.
STREAM_WINDOW = 8

_STREAM_METHOD = "ModelStreamInfer"


class OpenInferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol, over :class:`DataPlane`.

    Args:
        plane: the data plane.
        gate: the server's gate, which ModelStreamInfer messages pass like unary calls (once
            the server stops, a stream's new messages are answered UNAVAILABLE). None: a gate
            that never closes.
    """

    def __init__(self, plane: DataPlane, gate: Gate | None = None) -> None:
        self._plane = plane
        self._gate = gate or Gate()

    async def ServerLive(  # noqa: N802 (gRPC method name)
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._plane.ready)

    async def ModelReady(  # noqa: N802
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        # Like Triton: an unknown model or version is "not ready", not an error (tritonclient's
        # is_model_ready returns the bool). A malformed version is still INVALID_ARGUMENT.
        return oip.ModelReadyResponse(
            ready=self._plane.model_ready(request.name, request.version or None)
        )

    async def ServerMetadata(  # noqa: N802
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return json_format.ParseDict(oip_json.server_metadata(), oip.ServerMetadataResponse())

    async def ModelMetadata(  # noqa: N802
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        metadata = self._plane.metadata(request.name, request.version or None)
        return json_format.ParseDict(oip_json.model_metadata(metadata), oip.ModelMetadataResponse())

    async def ModelConfig(  # noqa: N802
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        metadata = self._plane.metadata(request.name, request.version or None)
        return json_format.ParseDict(
            {"config": oip_json.model_config(metadata)}, oip.ModelConfigResponse()
        )

    async def ModelStatistics(  # noqa: N802
        self, request: oip.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelStatisticsResponse:
        entries = self._plane.statistics(request.name, request.version or None)
        return json_format.ParseDict(
            oip_json.model_statistics(entries), oip.ModelStatisticsResponse()
        )

    async def RepositoryIndex(  # noqa: N802
        self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        models = oip_json.repository_index(self._plane.index(), request.ready)
        return json_format.ParseDict({"models": models}, oip.RepositoryIndexResponse())

    async def RepositoryModelLoad(  # noqa: N802
        self, request: oip.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryModelLoadResponse:
        oip_json.check_load_parameters(request.parameters)
        await self._plane.load(request.model_name)
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802
        self, request: oip.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryModelUnloadResponse:
        oip_json.check_unload_parameters(_repository_parameters(request.parameters))
        await self._plane.unload(request.model_name, wait=True)
        return oip.RepositoryModelUnloadResponse()

    async def ModelInfer(  # noqa: N802
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(  # noqa: N802
        self,
        request_iterator: AsyncIterator[oip.ModelInferRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Answer every request of the stream, in order; a failed request (one that did not even
        decode included) gets its error in ``error_message`` and the stream goes on.

        Up to :data:`STREAM_WINDOW` requests run at once: a reader task starts them as they
        arrive and this generator yields their answers in arrival order.
        """
        window = asyncio.Semaphore(STREAM_WINDOW)
        started: asyncio.Queue[asyncio.Task[oip.ModelStreamInferResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    started.put_nowait(asyncio.create_task(self._stream_one(request, context)))
            finally:
                started.put_nowait(None)  # end of stream (or the reader failed)

        reader = asyncio.create_task(read())
        try:
            while (task := await started.get()) is not None:
                try:
                    answer = await task
                finally:
                    window.release()
                yield answer
            await reader  # raises if reading the stream failed
        finally:
            # The client went away or the stream failed: drop the requests still running.
            reader.cancel()
            while not started.empty():
                pending = started.get_nowait()
                if pending is not None:
                    pending.cancel()

    async def _stream_one(
        self, request: oip.ModelInferRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> oip.ModelStreamInferResponse:
        """One message of a stream, with the bookkeeping of a unary call."""
        if isinstance(request, Undecodable):  # answered in the stream, which goes on
            note(f"/{OIP_SERVICE_NAME}/{_STREAM_METHOD}", request, context.peer())
            error = request.error()

            async def refuse() -> oip.ModelInferResponse:
                raise error

            outcome = await observe(
                _STREAM_METHOD, "", context.time_remaining, refuse, gate=self._gate
            )
            request = oip.ModelInferRequest()
        else:
            message = request
            outcome = await observe(
                _STREAM_METHOD,
                self._plane.model_label(request.model_name),
                context.time_remaining,
                lambda: self._infer(message, context),
                gate=self._gate,
                version_of=lambda response: response.model_version,
            )
        if outcome.response is None:
            return oip.ModelStreamInferResponse(
                error_message=f"{outcome.status.name}: {outcome.message}",
                infer_response=oip.ModelInferResponse(
                    model_name=request.model_name,
                    model_version=request.model_version,
                    id=request.id,
                ),
            )
        return oip.ModelStreamInferResponse(infer_response=outcome.response)

    async def _infer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        options = mc_options_of(request.parameters)
        result = await self._plane.predict(
            PredictInput(
                model=request.model_name,
                version=request.model_version or None,
                inputs=wire_inputs(request),
                num_samples=options.num_samples,
                return_samples=options.return_samples,
                interval_levels=options.interval_levels,
                target_standard_error=options.target_standard_error,
                seed=options.seed,
                outputs=requested_output_names(request.outputs),
            ),
            timeout_s=earliest(context.time_remaining(), options.timeout_s),
        )
        response = oip.ModelInferResponse(
            model_name=result.model, model_version=str(result.version), id=request.id
        )
        response.parameters[MC_SAMPLES].int64_param = result.num_samples
        for tensor in encode_outputs(result):
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(tensor.raw)
        return response


def _repository_parameters(
    parameters: Mapping[str, oip.ModelRepositoryParameter],
) -> dict[str, Any]:
    """The plain values of a repository request's parameters (unset ones left out)."""
    values: dict[str, Any] = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[name] = getattr(parameter, choice)
    return values
