"""The asyncio client: the shared core's flows run over ``grpc.aio`` calls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2

from mcdropout_client._convert import Inputs
from mcdropout_client._core import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    GET_MODEL_METADATA,
    HEALTH_CHECK,
    LIST_MODELS,
    PREDICT,
    BaseClient,
    Flow,
    Rpc,
    attempt_timeout,
)
from mcdropout_client._gen.mcdropout.v1 import mcdropout_pb2 as pb
from mcdropout_client.errors import ClientError, from_rpc_error
from mcdropout_client.types import HealthStatus, ModelInfo, ModelSummary, Prediction

__all__ = ["AsyncClient"]

T = TypeVar("T")


def _unary(channel: grpc.aio.Channel, method: str, response_type: Any) -> Callable[..., Any]:
    call: Callable[..., Any] = channel.unary_unary(
        method,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    return call


class AsyncClient(BaseClient):
    """An asyncio client of the MC dropout service: :class:`~mcdropout_client.Client`'s API,
    awaitable (``grpc.aio``), with the same arguments, results and errors.

    Create it inside the running event loop, and use it as an async context manager (or
    await :meth:`close`; calls on a closed client raise ``RuntimeError``). Concurrent calls
    (``asyncio.gather``) share its connection.

    Args:
        target: ``host:port`` of the server.
        credentials: channel credentials for TLS; plaintext when None and ``tls`` is False.
        tls: TLS verified against the system's root certificates.
        token: a bearer token, sent as ``authorization: Bearer <token>`` with every call.
        metadata: more ``(key, value)`` metadata sent with every call.
        timeout: the default deadline of every call, in seconds (None: no deadline).
        max_retries: retries of a call that failed with UNAVAILABLE, and only UNAVAILABLE.
        retry_backoff_s: the delay before the first retry (doubling, up to 2 s).
        max_message_bytes: the largest message sent or received.
        interceptors: ``grpc.aio`` client interceptors.

    Example::

        async with AsyncClient("127.0.0.1:8001", timeout=10) as client:
            result = await client.predict("digits", images, num_samples=100)
            print(result.predicted_label, result.mutual_information)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        tls: bool = False,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        max_retries: int = 3,
        retry_backoff_s: float = 0.1,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        super().__init__(
            target,
            credentials,
            tls,
            token,
            metadata,
            timeout,
            max_retries,
            retry_backoff_s,
            max_message_bytes,
        )
        chain = list(interceptors) or None
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(target, options=self._options, interceptors=chain)
        else:
            channel = grpc.aio.secure_channel(
                target, self._credentials, options=self._options, interceptors=chain
            )
        self._channel: grpc.aio.Channel = channel
        self._methods: dict[str, Callable[..., Any]] = {
            PREDICT: _unary(channel, PREDICT, pb.PredictResponse),
            LIST_MODELS: _unary(channel, LIST_MODELS, pb.ListModelsResponse),
            GET_MODEL_METADATA: _unary(channel, GET_MODEL_METADATA, pb.ModelMetadata),
            HEALTH_CHECK: _unary(channel, HEALTH_CHECK, health_pb2.HealthCheckResponse),
        }

    @property
    def channel(self) -> grpc.aio.Channel:
        """The ``grpc.aio`` channel, for stubs of other services on the same connection. The
        bearer token is not added to their calls."""
        return self._channel

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            await self._channel.close()

    async def predict(
        self,
        model: str,
        x: Inputs,
        *,
        num_samples: int | None = None,
        version: str | int | None = None,
        return_samples: bool = False,
        interval_levels: Iterable[float] = (),
        target_standard_error: float | None = None,
        seed: int | None = None,
        input_name: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """Run T stochastic passes over the rows of ``x`` (see
        :meth:`mcdropout_client.Client.predict` for every argument)."""
        return await self._run(
            self._predict_flow(
                model,
                x,
                num_samples,
                version,
                return_samples,
                interval_levels,
                target_standard_error,
                seed,
                input_name,
                timeout,
            )
        )

    async def list_models(self, *, timeout: float | None = None) -> list[ModelSummary]:
        """Every model of the repository, with its versions (newest first), task, readiness."""
        return await self._run(self._list_models_flow(timeout))

    async def model_metadata(
        self, model: str, *, version: str | int | None = None, timeout: float | None = None
    ) -> ModelInfo:
        """Describe one model version (the newest by default)."""
        return await self._run(self._model_metadata_flow(model, version, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The ``grpc.health.v1`` status of the server (``""``), the service or one model."""
        return await self._run(self._health_flow(service, timeout))

    async def _run(self, flow: Flow[T]) -> T:
        """Drive a flow: each RPC it yields is made (with retries), its answer sent back."""
        self._check_open()
        try:
            rpc = next(flow)
            while True:
                try:
                    response = await self._call(rpc)
                except ClientError as error:
                    rpc = flow.throw(error)
                else:
                    rpc = flow.send(response)
        except StopIteration as done:
            return cast(T, done.value)

    async def _call(self, rpc: Rpc) -> Any:
        """One RPC with the retry policy, each attempt bounded by the caller's deadline."""
        method = self._methods[rpc.method]
        retries = 0
        while True:
            try:
                return await method(
                    rpc.request, timeout=attempt_timeout(rpc), metadata=self._metadata
                )
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
                delay = self._retry_delay(failure, retries, rpc)
                if delay is None:
                    raise failure from error
            await asyncio.sleep(delay)
            retries += 1
