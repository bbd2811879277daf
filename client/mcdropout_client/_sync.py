"""The blocking client: the shared core's flows run over ``grpc`` calls."""

from __future__ import annotations

import time
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

__all__ = ["Client"]

T = TypeVar("T")


def _unary(channel: grpc.Channel, method: str, response_type: Any) -> Callable[..., Any]:
    call: Callable[..., Any] = channel.unary_unary(
        method,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    return call


class Client(BaseClient):
    """A blocking client of the MC dropout service; numpy in, numpy out.

    Use it as a context manager (or call :meth:`close`; calls on a closed client raise
    ``RuntimeError``). It is thread-safe: threads may share one client and its connection.

    Args:
        target: ``host:port`` of the server.
        credentials: channel credentials for TLS (``grpc.ssl_channel_credentials(...)``, with
            a private CA or a client certificate); plaintext when None and ``tls`` is False.
        tls: TLS verified against the system's root certificates.
        token: a bearer token, sent as ``authorization: Bearer <token>`` with every call.
            Without TLS it travels in clear text: use it over plaintext only on a trusted
            network (or to a local TLS-terminating proxy).
        metadata: more ``(key, value)`` metadata sent with every call (lowercase keys).
        timeout: the default deadline of every call, in seconds (None: no deadline). A call's
            own ``timeout`` overrides it; the deadline covers its retries and, for
            ``predict``, the metadata look-up.
        max_retries: retries of a call that failed with UNAVAILABLE, and only UNAVAILABLE
            (0 disables them): at most ``max_retries + 1`` attempts.
        retry_backoff_s: the delay before the first retry; it doubles for each next one, up
            to 2 s, and no retry starts past the deadline.
        max_message_bytes: the largest message sent or received.
        interceptors: ``grpc`` client interceptors (tracing, more metadata).

    Raises:
        ValueError: a bad argument (timeout <= 0, a malformed token, ...).

    Example::

        with Client("127.0.0.1:8001", timeout=10) as client:
            result = client.predict("digits", images, num_samples=100)
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
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
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
        if self._credentials is None:
            channel = grpc.insecure_channel(target, options=self._options)
        else:
            channel = grpc.secure_channel(target, self._credentials, options=self._options)
        self._channel: grpc.Channel = (
            grpc.intercept_channel(channel, *interceptors) if interceptors else channel
        )
        self._methods: dict[str, Callable[..., Any]] = {
            PREDICT: _unary(self._channel, PREDICT, pb.PredictResponse),
            LIST_MODELS: _unary(self._channel, LIST_MODELS, pb.ListModelsResponse),
            GET_MODEL_METADATA: _unary(self._channel, GET_MODEL_METADATA, pb.ModelMetadata),
            HEALTH_CHECK: _unary(self._channel, HEALTH_CHECK, health_pb2.HealthCheckResponse),
        }

    @property
    def channel(self) -> grpc.Channel:
        """The gRPC channel (with the interceptors), for stubs of other services on the same
        connection, such as reflection. The bearer token is not added to their calls."""
        return self._channel

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def predict(
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
        """Run T stochastic passes over the rows of ``x``; the mean and uncertainty per row.

        The first call for a model version fetches its metadata (input names, dtypes), which
        the client keeps.

        Args:
            model: the model name.
            x: a (B, ...) array for a single-input model, or input name -> array. Arrays must
                have the model's dtype exactly (no silent casts); nested lists are converted
                to it. One row without its batch dimension is sent as B = 1, and the result
                keeps the batch dimension.
            num_samples: T; None selects the model's default. With ``target_standard_error``
                the cap on T (None: the model's maximum).
            version: the model version; None selects the newest.
            return_samples: also answer every sample, ``samples`` of shape (B, T, ...). The
                server bounds B x T x values (RESOURCE_EXHAUSTED above its limit).
            interval_levels: regression outputs: central prediction intervals at these levels
                in (0, 1), at most 8 (e.g. ``(0.9, 0.95)``); each gives a gaussian and an
                empirical interval (``intervals``, ``interval(level, method)``). Needs T >= 2.
            target_standard_error: adaptive sampling: sample in doubling rounds until every
                row's largest Monte Carlo standard error of the mean (of the probabilities for
                classifiers) is at most this; ``num_samples_per_row`` gives each row's T. Not
                with ``return_samples``, ``interval_levels`` or ``seed``.
            seed: reproducible sampling (0..2^64-1): the same seed, model version and row give
                bit-identical answers, whatever else is in the request or the server's batch.
                Slower than unseeded calls (each row runs alone).
            input_name: the input ``x`` feeds, for a model with several inputs.
            timeout: the deadline of this call in seconds (overrides the client's).

        Returns:
            The statistics of every output; for classifiers also the predicted classes and
            labels, entropies, mutual information and variation ratio; for heteroscedastic
            regression outputs the aleatoric and total variance.

        Raises:
            ClientError: the server refused or failed the call; the subclass tells why
                (:class:`~mcdropout_client.NotFoundError`,
                :class:`~mcdropout_client.InvalidArgumentError`, ...).
            ValueError: ``x`` does not fit the model (unknown input, wrong dtype) or a bad
                argument; nothing was sent.
            TypeError: an argument of the wrong type; nothing was sent.
        """
        return self._run(
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

    def list_models(self, *, timeout: float | None = None) -> list[ModelSummary]:
        """Every model of the repository, with its versions (newest first), task, readiness.

        Raises:
            ClientError: the call failed.
        """
        return self._run(self._list_models_flow(timeout))

    def model_metadata(
        self, model: str, *, version: str | int | None = None, timeout: float | None = None
    ) -> ModelInfo:
        """Describe one model version (the newest by default): inputs, outputs, labels, T,
        execution provider, dropout layers, verification.

        Raises:
            NotFoundError: no such model or version.
            ClientError: the call failed otherwise.
        """
        return self._run(self._model_metadata_flow(model, version, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The ``grpc.health.v1`` status of the server (``""``), the service or one model.

        Args:
            service: ``""`` for the whole server, ``"mcdropout.v1.MCDropoutService"``, or a
                model name.
            timeout: the deadline of this call in seconds (overrides the client's).

        Returns:
            ``"SERVING"``, or ``"NOT_SERVING"`` (starting, shutting down, a model not loaded).

        Raises:
            NotFoundError: an unknown service or model.
            UnavailableError: the server cannot be reached.
        """
        return self._run(self._health_flow(service, timeout))

    def _run(self, flow: Flow[T]) -> T:
        """Drive a flow: each RPC it yields is made (with retries), its answer sent back."""
        self._check_open()
        try:
            rpc = next(flow)
            while True:
                try:
                    response = self._call(rpc)
                except ClientError as error:
                    rpc = flow.throw(error)
                else:
                    rpc = flow.send(response)
        except StopIteration as done:
            return cast(T, done.value)

    def _call(self, rpc: Rpc) -> Any:
        """One RPC with the retry policy, each attempt bounded by the caller's deadline."""
        method = self._methods[rpc.method]
        retries = 0
        while True:
            try:
                return method(rpc.request, timeout=attempt_timeout(rpc), metadata=self._metadata)
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
                delay = self._retry_delay(failure, retries, rpc)
                if delay is None:
                    raise failure from error
            time.sleep(delay)
            retries += 1
