"""The gRPC server: services, health, reflection, and the one place where errors become
status codes (:class:`StatusInterceptor`), which also records the request metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import metrics
from service.core import InferenceCore
from service.errors import ServiceError
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.servicer import MCDropoutServicer
from service.settings import Settings

__all__ = ["SERVICE_NAME", "GrpcServer", "StatusInterceptor", "status_of"]

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["MCDropoutService"].full_name
_INSTRUMENTED_PREFIXES = (f"/{SERVICE_NAME}/",)
_GENERIC_INTERNAL = "internal error (see the server log)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message of an exception raised by a handler."""
    if isinstance(exc, ServiceError):
        code = grpc.StatusCode[exc.code]
        return code, exc.message if exc.public else _GENERIC_INTERNAL
    return grpc.StatusCode.INTERNAL, _GENERIC_INTERNAL


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps the error tree to status codes and records latency, errors and in-flight counts.

    Every unary RPC of the project's services goes through here, so a handler only raises
    ``ServiceError`` subclasses and never calls ``context.abort`` itself.
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
            started = time.perf_counter()
            model = self._model_label(request.model) if hasattr(request, "model") else ""
            code = "OK"
            in_flight = metrics.IN_FLIGHT.labels(method=method)
            in_flight.inc()
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                code = (
                    "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                )
                raise
            except Exception as exc:
                status, message = status_of(exc)
                code = status.name
                if not isinstance(exc, ServiceError) or not exc.public:
                    log.error("%s failed", method, exc_info=exc)
                await context.abort(status, message)
                raise  # unreachable: abort raises
            finally:
                in_flight.dec()
                metrics.REQUEST_SECONDS.labels(model=model, method=method, code=code).observe(
                    time.perf_counter() - started
                )
                if code != "OK":
                    metrics.ERRORS.labels(model=model, method=method, code=code).inc()

        return wrapped


class GrpcServer:
    """The grpc.aio server with the project's services, health and reflection."""

    def __init__(self, settings: Settings, core: InferenceCore) -> None:
        self._settings = settings
        self._core = core
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._server = grpc.aio.server(
            interceptors=[StatusInterceptor(core.model_label)], options=options
        )
        pb_grpc.add_MCDropoutServiceServicer_to_server(  # type: ignore[no-untyped-call]
            MCDropoutServicer(core), self._server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                self._server,
            )
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; health reports NOT_SERVING until :meth:`set_serving`.

        Returns:
            The bound port (useful with port 0).
        """
        address = f"{self._settings.host}:{self._settings.grpc_port}"
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        return self.port

    async def set_serving(self) -> None:
        """Health SERVING overall, for the service, and per loaded model (service = model name)."""
        for service in ("", SERVICE_NAME, *self._core.registry.names()):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting RPCs, let in-flight ones finish within ``grace_s``, then close."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
