"""The core that the sync and asyncio clients share (as httpx's ``BaseClient``).

Everything but I/O lives here: settings and their checks, channel options and credentials,
call metadata (the bearer token), the retry policy and deadlines, request building, response
decoding and the metadata cache. A public call is written once, as a *flow*: a generator that
yields the RPCs it needs (:class:`Rpc`) and receives their answers::

    info = yield Rpc(GET_MODEL_METADATA, request, deadline)   # the answer, or a raised error

:class:`mcdropout_client.Client` runs a flow with blocking calls and ``time.sleep`` between
retries, :class:`mcdropout_client.AsyncClient` with awaited ``grpc.aio`` calls and
``asyncio.sleep``; that transport, and one attempt loop each, is all they add.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any, Final, TypeAlias, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from mcdropout_client import _convert
from mcdropout_client._convert import Inputs, PredictOptions
from mcdropout_client._gen.mcdropout.v1 import mcdropout_pb2 as pb
from mcdropout_client.errors import ClientError, DeadlineExceededError, NotFoundError
from mcdropout_client.types import HealthStatus, ModelInfo, ModelSummary, Prediction

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "SERVICE_NAME",
    "BaseClient",
    "Flow",
    "RetryPolicy",
    "Rpc",
]

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAME = "mcdropout.v1.MCDropoutService"

#: The RPCs a flow may ask for (full gRPC method names).
PREDICT: Final = f"/{SERVICE_NAME}/Predict"
LIST_MODELS: Final = f"/{SERVICE_NAME}/ListModels"
GET_MODEL_METADATA: Final = f"/{SERVICE_NAME}/GetModelMetadata"
HEALTH_CHECK: Final = "/grpc.health.v1.Health/Check"

# RFC 6750 b64token: what may follow "Bearer " in an authorization header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# gRPC metadata keys: lowercase ASCII letters, digits, '-', '_' and '.'.
_METADATA_KEY = re.compile(r"[0-9a-z\-_.]+")

T = TypeVar("T")


@dataclass(frozen=True)
class Rpc:
    """One RPC that a flow needs: the method, its request, the caller's deadline.

    Attributes:
        method: the full method name (``/mcdropout.v1.MCDropoutService/Predict``).
        request: the request message.
        deadline: the caller's deadline on the ``time.monotonic()`` clock, or None. Every
            attempt (retries included) gets the time left before it.
        timeout: the caller's timeout in seconds, for messages.
    """

    method: str
    request: Any
    deadline: float | None
    timeout: float | None


#: A public call: yields the RPCs it needs, receives their answers, returns the result.
Flow: TypeAlias = Generator[Rpc, Any, T]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of an RPC that failed with UNAVAILABLE, and only UNAVAILABLE.

    Other codes are never retried: INVALID_ARGUMENT or NOT_FOUND will not change, and
    DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED may mean the work already ran. The delay before
    retry ``i`` (0-based) is ``min(backoff_s * 2**i, max_backoff_s)``, and no retry starts
    when its delay would end past the caller's deadline.

    Attributes:
        max_retries: retries after the first attempt (0 disables retries), so at most
            ``max_retries + 1`` attempts.
        backoff_s: the delay before the first retry, in seconds.
        max_backoff_s: the largest delay, in seconds.
    """

    max_retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not self.backoff_s >= 0:
            raise ValueError(f"retry_backoff_s must be >= 0, got {self.backoff_s!r}")
        if not self.max_backoff_s >= self.backoff_s:
            raise ValueError(
                f"max_backoff_s must be >= retry_backoff_s ({self.backoff_s}), "
                f"got {self.max_backoff_s!r}"
            )

    def delay_s(
        self, code: grpc.StatusCode, retries_done: int, deadline: float | None, now: float
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up.

        Args:
            code: the status code of the failed attempt.
            retries_done: retries already made (0 after the first attempt).
            deadline: the caller's deadline on the ``time.monotonic()`` clock, or None.
            now: ``time.monotonic()``.
        """
        if code != grpc.StatusCode.UNAVAILABLE or retries_done >= self.max_retries:
            return None
        delay = min(self.backoff_s * 2.0**retries_done, self.max_backoff_s)
        if deadline is not None and now + delay >= deadline:
            return None
        return delay


def check_timeout(timeout: float | None) -> float | None:
    """A timeout in seconds must be positive (None: no deadline).

    Raises:
        ValueError: zero, negative or not a number.
    """
    if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    return timeout


def deadline_of(timeout: float | None) -> float | None:
    """The deadline on the ``time.monotonic()`` clock of a call that starts now."""
    return None if timeout is None else monotonic() + timeout


def attempt_timeout(rpc: Rpc) -> float | None:
    """The gRPC timeout of the next attempt of ``rpc``: the time left before its deadline.

    Raises:
        DeadlineExceededError: no time is left (a retry or an earlier RPC of the same call,
            such as the metadata look-up of ``predict``, used it all).
    """
    if rpc.deadline is None:
        return None
    left = rpc.deadline - monotonic()
    if left <= 0:
        raise DeadlineExceededError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {rpc.timeout} s exceeded"
        )
    return left


def channel_options(max_message_bytes: int, retry: RetryPolicy) -> list[tuple[str, Any]]:
    """gRPC channel options: message limits, and reconnect backoff matched to the retries.

    gRPC backs off reconnecting to a server it failed to reach (1 s, growing to 120 s), and
    RPCs fail at once meanwhile; without matching it, every retry of a restarting server
    would fail immediately.

    Raises:
        ValueError: ``max_message_bytes`` is not a positive integer.
    """
    if (
        isinstance(max_message_bytes, bool)
        or not isinstance(max_message_bytes, int)
        or max_message_bytes < 1
    ):
        raise ValueError(f"max_message_bytes must be an integer >= 1, got {max_message_bytes!r}")
    initial_ms = max(1, round(retry.backoff_s * 1000))
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", max(initial_ms, round(retry.max_backoff_s * 1000))),
    ]


def channel_credentials(
    credentials: grpc.ChannelCredentials | None, tls: bool
) -> grpc.ChannelCredentials | None:
    """The credentials of a secure channel, or None for plaintext.

    ``credentials`` wins; ``tls=True`` alone verifies the server against the system's root
    certificates (``grpc.ssl_channel_credentials()``).
    """
    if credentials is not None:
        return credentials
    if tls:
        return grpc.ssl_channel_credentials()
    return None


def call_metadata(
    token: str | None, metadata: Iterable[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    """The metadata sent with every call: ``authorization: Bearer <token>``, then ``metadata``.

    Raises:
        ValueError: a token with characters a bearer token cannot have (RFC 6750), an
            invalid metadata key, or an ``authorization`` entry next to a token.
    """
    entries: list[tuple[str, str]] = []
    if token is not None:
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise ValueError(
                "token must be a non-empty bearer token (letters, digits, -._~+/ and trailing "
                "=), without the 'Bearer ' prefix"
            )
        entries.append(("authorization", f"Bearer {token}"))
    for key, value in metadata:
        if not isinstance(key, str) or not _METADATA_KEY.fullmatch(key):
            raise ValueError(f"metadata key {key!r}: lowercase letters, digits, '-', '_', '.'")
        if key == "authorization" and token is not None:
            raise ValueError("give the bearer token either as token= or in metadata, not both")
        if key.endswith("-bin") or not isinstance(value, str):
            raise ValueError(f"metadata {key!r}: only text values (no -bin keys)")
        entries.append((key, value))
    return tuple(entries)


def _unknown_health_service(service: str) -> str:
    return (
        f"no health status for {service!r}: use a model name, {SERVICE_NAME!r}, or '' for the "
        "whole server"
    )


class BaseClient:
    """Settings, checks, request building, decoding and the flows of every public call.

    Not used directly: :class:`mcdropout_client.Client` and
    :class:`mcdropout_client.AsyncClient` add the transport. Arguments are documented there.
    """

    def __init__(  # noqa: PLR0917 (the documented keyword arguments of both clients)
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        tls: bool,
        token: str | None,
        metadata: Sequence[tuple[str, str]],
        timeout: float | None,
        max_retries: int,
        retry_backoff_s: float,
        max_message_bytes: int,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise ValueError(f"target must be 'host:port', got {target!r}")
        self.target = target
        self.timeout = check_timeout(timeout)
        self.retry = RetryPolicy(max_retries, retry_backoff_s, max(2.0, retry_backoff_s))
        self._options = channel_options(max_message_bytes, self.retry)
        self._credentials = channel_credentials(credentials, tls)
        self._metadata = call_metadata(token, metadata) or None
        self._model_info: dict[tuple[str, str], ModelInfo] = {}
        self._closed = False

    def __repr__(self) -> str:
        # Never the token.
        return f"{type(self).__name__}({self.target!r})"

    @property
    def is_secure(self) -> bool:
        """True when the channel uses TLS."""
        return self._credentials is not None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else check_timeout(timeout)

    def _retry_delay(self, error: ClientError, retries_done: int, rpc: Rpc) -> float | None:
        return self.retry.delay_s(error.code, retries_done, rpc.deadline, monotonic())

    # --- flows: one per public call -------------------------------------------------------

    def _predict_flow(  # noqa: PLR0917 (mirrors predict's keyword arguments)
        self,
        model: str,
        x: Inputs,
        num_samples: int | None,
        version: str | int | None,
        return_samples: bool,
        interval_levels: Iterable[float],
        target_standard_error: float | None,
        seed: int | None,
        input_name: str | None,
        timeout: float | None,
    ) -> Flow[Prediction]:
        timeout = self._timeout(timeout)
        deadline = deadline_of(timeout)
        options = PredictOptions.of(
            num_samples, return_samples, interval_levels, target_standard_error, seed
        )
        wire_version = _convert.version_str(version)
        info = self._model_info.get((model, wire_version))
        if info is None:
            info = yield from self._metadata_flow(model, wire_version, deadline, timeout)
        inputs = _convert.prepare_inputs(info, x, input_name)
        request = _convert.predict_request(model, wire_version, inputs, options)
        response: pb.PredictResponse = yield Rpc(PREDICT, request, deadline, timeout)
        return _convert.prediction_from_proto(response, seed=options.seed)

    def _model_metadata_flow(
        self, model: str, version: str | int | None, timeout: float | None
    ) -> Flow[ModelInfo]:
        timeout = self._timeout(timeout)
        wire_version = _convert.version_str(version)
        return (yield from self._metadata_flow(model, wire_version, deadline_of(timeout), timeout))

    def _metadata_flow(
        self, model: str, version: str, deadline: float | None, timeout: float | None
    ) -> Flow[ModelInfo]:
        request = pb.GetModelMetadataRequest(model=model, version=version)
        response: pb.ModelMetadata = yield Rpc(GET_MODEL_METADATA, request, deadline, timeout)
        info = _convert.model_info_from_proto(response)
        # Kept per (model, requested version): "" follows the newest version as the server
        # had it at the first call.
        self._model_info[(model, version)] = info
        return info

    def _list_models_flow(self, timeout: float | None) -> Flow[list[ModelSummary]]:
        timeout = self._timeout(timeout)
        response: pb.ListModelsResponse = yield Rpc(
            LIST_MODELS, pb.ListModelsRequest(), deadline_of(timeout), timeout
        )
        return [_convert.model_summary_from_proto(m) for m in response.models]

    def _health_flow(self, service: str, timeout: float | None) -> Flow[HealthStatus]:
        if not isinstance(service, str):
            raise TypeError(f"service must be a str, got {service!r}")
        timeout = self._timeout(timeout)
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = yield Rpc(HEALTH_CHECK, request, deadline_of(timeout), timeout)
        except NotFoundError as error:
            # The health service answers NOT_FOUND without a message.
            raise NotFoundError(error.code, _unknown_health_service(service)) from error
        status: HealthStatus = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return status

    def forget_metadata(self) -> None:
        """Drop the kept model metadata, so that the next ``predict`` of each model fetches it
        again (after the server loaded a new version with other inputs, say)."""
        self._model_info.clear()
