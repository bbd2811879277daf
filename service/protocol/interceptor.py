"""The one interceptor every call of the gRPC server goes through.

In order, for each call:

1. ``grpc.health.v1`` passes (probes need no token and still answer while the server stops),
   only with the tolerant decoding below.
2. Once the server stops (:class:`~service.protocol.status.Gate` closed), new calls are
   answered UNAVAILABLE, the code clients retry.
3. With a token file, a call without an accepted bearer token is answered UNAUTHENTICATED
   (both APIs, reflection, anything else served).
4. Requests are decoded tolerantly (``service.protocol.decoding``): bytes that are not the
   message give INVALID_ARGUMENT, not grpcio's UNKNOWN.
5. Unary calls of the two APIs run through ``service.protocol.status.observe``: the error
   tree becomes status codes, and latency, errors and in-flight counts are recorded. Streams
   (ModelStreamInfer) answer each message through the same ``observe``; a refused stream is
   recorded once.

So a handler only raises ``ServiceError`` subclasses and never calls ``context.abort`` itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.errors import ServiceError, Unauthenticated, Unavailable
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.protocol.auth import BearerTokens
from service.protocol.decoding import Undecodable, note, tolerant
from service.protocol.oip_servicer import OIP_SERVICE_NAME
from service.protocol.status import SHUTTING_DOWN, Gate, LogEvery, observe, status_of

__all__ = ["API_PREFIXES", "HEALTH_PREFIX", "SERVICE_NAME", "StatusInterceptor"]

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["MCDropoutService"].full_name
#: The two APIs: their calls are recorded in the request metrics.
API_PREFIXES = (f"/{SERVICE_NAME}/", f"/{OIP_SERVICE_NAME}/")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
#: The request field naming the model, for the metrics label: mcdropout.v1 requests say
#: ``model``, the Open Inference Protocol says ``model_name`` (ModelInfer) or ``name``
#: (ModelReady, ModelMetadata).
_MODEL_FIELDS = ("model", "model_name", "name")
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_MAKE = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


#: The response fields naming the version that answered: ``model_version`` (ModelInfer),
#: ``version`` (mcdropout.v1's Predict and GetModelMetadata).
_VERSION_FIELDS = ("model_version", "version")


def answered_version(response: Any) -> str:
    """The version a response says answered, or "" (the latency's ``version`` label)."""
    fields = getattr(response, "DESCRIPTOR", None)
    if fields is None:
        return ""
    by_name = fields.fields_by_name
    for field in _VERSION_FIELDS:
        if field in by_name and by_name[field].type == by_name[field].TYPE_STRING:
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


def _kind(handler: grpc.RpcMethodHandler) -> str:
    return next(k for k in _KINDS if getattr(handler, k) is not None)


def _rebuild(handler: grpc.RpcMethodHandler, kind: str, behavior: Behavior) -> Any:
    """A handler of the same kind and serializer with ``behavior``, decoding tolerantly."""
    return _MAKE[kind](
        behavior,
        request_deserializer=tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _gone(context: grpc.aio.ServicerContext) -> bool:
    """Whether nobody waits for this call's answer any more: its deadline passed (grpc has
    answered DEADLINE_EXCEEDED itself) or it was cancelled."""
    remaining = context.time_remaining()
    return bool(context.cancelled()) or (remaining is not None and remaining <= 0)


async def _answer(context: grpc.aio.ServicerContext, status: grpc.StatusCode, message: str) -> None:
    """``context.abort`` with ``status``, unless the call is gone.

    A handler that answers a call whose deadline has just passed makes grpcio fail the send
    and log it as an ERROR with a traceback ("ExecuteBatchError raised in core"), one per such
    call under overload. Such a call ends as cancelled instead: the client has its
    DEADLINE_EXCEEDED already, and ``observe`` has recorded the request.

    Raises:
        grpc.aio.AbortError: the status was sent (grpc's way of ending the handler).
        asyncio.CancelledError: the call was gone.
    """
    if _gone(context):
        raise asyncio.CancelledError
    try:
        await context.abort(status, message)
    except grpc.aio.AbortError:
        raise
    except Exception:
        if _gone(context):  # it went while the status was being sent
            raise asyncio.CancelledError from None
        raise


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    await _answer(context, *status_of(error))


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str
) -> AsyncIterator[Any]:
    """The stream's messages; one that did not decode ends the call with INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, Undecodable):
            note(method, request, context.peer())
            await _abort(context, request.error())
        yield request


def _decoding_checked(kind: str, behavior: Behavior, method: str) -> Behavior:
    """``behavior`` behind an INVALID_ARGUMENT answer to undecodable messages (services whose
    handlers are not the project's: health, reflection)."""
    if kind == "unary_unary":

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                note(method, request, context.peer())
                await _abort(context, request.error())
            return await behavior(request, context)

        return unary

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if kind.startswith("stream_"):
            request = _checked(request, context, method)
        elif isinstance(request, Undecodable):
            note(method, request, context.peer())
            await _abort(context, request.error())
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:  # a coroutine that writes through context.write (or returns one response)
            response = await result
            if response is not None:
                yield response

    return streaming


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admission (stopping, tokens), tolerant decoding, status mapping and request metrics.

    Args:
        model_label: the bounded metrics label of a requested model name.
        instrumented: method path prefixes whose calls are recorded in the request metrics
            (the two APIs); other services (reflection) only get the checks and the decoding.
        gate: the server's gate (refuses new calls once it stops; counts running requests).
            None: a gate that never closes.
        tokens: the accepted bearer tokens; None: no authentication.
    """

    def __init__(
        self,
        model_label: Callable[[str], str],
        instrumented: tuple[str, ...] = API_PREFIXES,
        gate: Gate | None = None,
        tokens: BearerTokens | None = None,
    ) -> None:
        self._model_label = model_label
        self._instrumented = instrumented
        self._gate = gate or Gate()
        self._tokens = tokens
        self._refused_log = LogEvery(log, interval_s=10.0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # UNIMPLEMENTED
        path: str = details.method
        method = path.rsplit("/", 1)[-1]
        kind = _kind(handler)
        behavior: Behavior = getattr(handler, kind)
        if path.startswith(HEALTH_PREFIX):
            return _rebuild(handler, kind, _decoding_checked(kind, behavior, path))
        refusal = self._refusal(details)
        if not path.startswith(self._instrumented):
            if refusal is not None:
                return _rebuild(handler, kind, self._refuse(refusal, path, None))
            return _rebuild(handler, kind, _decoding_checked(kind, behavior, path))
        if kind != "unary_unary":
            if refusal is not None:
                return _rebuild(handler, kind, self._refuse(refusal, path, method))
            return _rebuild(handler, kind, behavior)  # each message: the servicer's observe
        return _rebuild(handler, kind, self._observed(behavior, path, method, refusal))

    def _refusal(self, details: grpc.HandlerCallDetails) -> ServiceError | None:
        """Why a call must not run: the server stops, or the call is not authenticated."""
        if self._gate.closed:
            return Unavailable(SHUTTING_DOWN)
        if self._tokens is not None:
            reason = self._tokens.check(details.invocation_metadata)
            if reason is not None:
                return Unauthenticated(reason)
        return None

    def _note_refusal(self, error: ServiceError, path: str, peer: str) -> None:
        if isinstance(error, Unauthenticated):
            self._refused_log.event(f"unauthenticated call to {path} from {peer}: {error}")

    def _refuse(self, error: ServiceError, path: str, method: str | None) -> Behavior:
        """A behavior answering ``error`` (recorded under ``method`` unless None)."""

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            self._note_refusal(error, path, context.peer())
            if method is not None:

                async def fail() -> None:
                    raise error

                await observe(method, "", context.time_remaining, fail)
            await _abort(context, error)

        return refuse

    def _observed(
        self, behavior: Behavior, path: str, method: str, refusal: ServiceError | None
    ) -> Behavior:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            model = ""
            error: ServiceError | None = refusal
            if error is not None:
                self._note_refusal(error, path, context.peer())
            elif isinstance(request, Undecodable):
                note(path, request, context.peer())
                error = request.error()
            else:
                requested = _requested_model(request)
                model = "" if requested is None else self._model_label(requested)

            async def call() -> Any:
                if error is not None:
                    raise error
                return await behavior(request, context)

            outcome = await observe(
                method, model, context.time_remaining, call, gate=self._gate,
                version_of=answered_version,
            )  # fmt: skip
            if outcome.status is not grpc.StatusCode.OK:
                await _answer(context, outcome.status, outcome.message)
            if _gone(context):  # an answer too late: grpc would fail to send it (see _answer)
                raise asyncio.CancelledError
            return outcome.response

        return observed
