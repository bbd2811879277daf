"""The gRPC server: both protocols on one port, health, reflection (v1 and v1alpha), and the one
place where errors of unary RPCs become status codes (:class:`StatusInterceptor`, through
``service.protocol.status.observe``, which also records the request metrics).

Services: ``mcdropout.v1.MCDropoutService`` (the project's own API) and
``inference.GRPCInferenceService`` (the Open Inference Protocol), both thin layers over one
:class:`DataPlane`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.core.dataplane import DataPlane
from service.gen.inference import grpc_service_pb2_grpc as oip_grpc
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.mcdropout_servicer import MCDropoutServicer
from service.protocol.oip_servicer import OIP_SERVICE_NAME, OpenInferenceServicer
from service.protocol.reflection import enable_reflection
from service.protocol.status import observe, status_of
from service.settings import Settings

__all__ = ["OIP_SERVICE_NAME", "SERVICE_NAME", "GrpcServer", "StatusInterceptor", "status_of"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["MCDropoutService"].full_name
_INSTRUMENTED_PREFIXES = (f"/{SERVICE_NAME}/", f"/{OIP_SERVICE_NAME}/")
#: The request field naming the model, for the metrics label: mcdropout.v1 requests say
#: ``model``, the Open Inference Protocol says ``model_name`` (ModelInfer) or ``name``
#: (ModelReady, ModelMetadata).
_MODEL_FIELDS = ("model", "model_name", "name")


#: The response fields naming the version that answered: ``model_version`` (ModelInfer),
#: ``version`` (mcdropout.v1's Predict and GetModelMetadata).
_VERSION_FIELDS = ("model_version", "version")


def answered_version(response: Any) -> str:
    """The version a response says answered, or "" (the latency's ``version`` label)."""
    fields = response.DESCRIPTOR.fields_by_name
    for field in _VERSION_FIELDS:
        if field in fields and fields[field].type == fields[field].TYPE_STRING:
            value: str = getattr(response, field)
            return value
    return ""


def _requested_model(request: Any) -> str | None:
    fields = request.DESCRIPTOR.fields_by_name
    for field in _MODEL_FIELDS:
        if field in fields:
            value: str = getattr(request, field)
            return value
    return None


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps the error tree to status codes and records latency, errors and in-flight counts.

    Every unary RPC of both services goes through here, so a handler only raises
    ``ServiceError`` subclasses and never calls ``context.abort`` itself. Streams pass through
    untouched: ModelStreamInfer answers each message through the same
    ``service.protocol.status.observe``.
    """

    def __init__(self, model_label: Callable[[str], str]) -> None:
        self._model_label = model_label

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method_path: str = details.method
        if (
            handler is None
            or handler.unary_unary is None
            or not method_path.startswith(_INSTRUMENTED_PREFIXES)
        ):
            return handler
        wrapped = self._wrap(handler.unary_unary, method_path.rsplit("/", 1)[-1])
        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, behavior: Behavior, method: str) -> Behavior:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            requested = _requested_model(request)
            model = "" if requested is None else self._model_label(requested)
            outcome = await observe(
                method,
                model,
                context.time_remaining,
                lambda: behavior(request, context),
                version_of=answered_version,
            )
            if outcome.status is not grpc.StatusCode.OK:
                await context.abort(outcome.status, outcome.message)
            return outcome.response

        return wrapped


class GrpcServer:
    """The grpc.aio server with the project's services, health and reflection."""

    def __init__(self, settings: Settings, plane: DataPlane) -> None:
        self._settings = settings
        self._plane = plane
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._server = grpc.aio.server(
            interceptors=[StatusInterceptor(plane.model_label)], options=options
        )
        pb_grpc.add_MCDropoutServiceServicer_to_server(  # type: ignore[no-untyped-call]
            MCDropoutServicer(plane), self._server
        )
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            OpenInferenceServicer(plane), self._server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            # v1alpha and v1 (service.protocol.reflection)
            enable_reflection(
                (
                    SERVICE_NAME,
                    OIP_SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                ),
                self._server,
            )
        self.port = 0
        self._health_models: set[str] = set()

    async def start(self) -> int:
        """Bind and start serving; health reports NOT_SERVING until :meth:`update_health`
        finds the data plane ready.

        Returns:
            The bound port (useful with port 0).
        """
        address = f"{self._settings.host}:{self._settings.grpc_port}"
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        return self.port

    async def update_health(self) -> None:
        """Health from the data plane (it calls this after every model change): overall and
        both services SERVING when the plane is ready, else NOT_SERVING; per model (service =
        model name) SERVING while it serves, NOT_SERVING when it failed to load, was unloaded
        or its folder was removed. A name never seen stays NOT_FOUND. Ignored once shutting
        down (the health servicer keeps NOT_SERVING)."""
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        overall = serving if self._plane.ready else not_serving
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            await self.health.set(service, overall)
        models = self._plane.model_health()
        for name in sorted(self._health_models - models.keys()):
            await self.health.set(name, not_serving)
        for name, ready in models.items():
            await self.health.set(name, serving if ready else not_serving)
        self._health_models |= models.keys()

    async def stop(
        self, grace_s: float, drain_s: float = 0.0, end_drain: asyncio.Event | None = None
    ) -> None:
        """Health NOT_SERVING; keep serving for ``drain_s`` or until ``end_drain`` is set
        (health-checking clients and load balancers leave meanwhile); then stop accepting RPCs,
        let in-flight ones finish within ``grace_s``, and close.

        Without the drain, calls that reach grpcio's server in the instant ``stop`` begins are
        answered CANCELLED, or (rarely) not at all until their deadline (grpcio 1.85.1).
        """
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            end = end_drain or asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(end.wait(), drain_s)
        await self._server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
