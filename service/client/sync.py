"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import _convert
from service.client._common import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    RetryPolicy,
    channel_credentials,
    channel_options,
    check_timeout,
    deadline_of,
    remaining_s,
    unknown_health_service,
)
from service.client._convert import Inputs
from service.client.errors import ClientError
from service.client.types import ModelInfo, ModelSummary, Prediction
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc

__all__ = ["Client"]

_Response = TypeVar("_Response")


class Client:
    """A blocking client of the MC dropout service; numpy in, numpy out.

    Use it as a context manager (or call :meth:`close`; calls on a closed client raise
    ``RuntimeError``). One client may serve many threads.

    Args:
        target: ``host:port`` of the server.
        credentials: channel credentials for TLS (``grpc.ssl_channel_credentials(...)``, with
            a private CA or a client certificate); plaintext when None and ``tls`` is False.
        tls: TLS verified against the system's root certificates.
        timeout: the default deadline of every call, in seconds (None: no deadline). A call's
            own ``timeout`` overrides it; the deadline covers its retries.
        max_retries: retries of a call that failed with UNAVAILABLE, and only UNAVAILABLE
            (0 disables them): at most ``max_retries + 1`` attempts.
        retry_backoff_s: the delay before the first retry; it doubles for each next one, up
            to 2 s, and no retry starts past the deadline.
        max_message_bytes: the largest message sent or received.
        interceptors: ``grpc`` client interceptors (metadata, tracing), outermost first.

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
        timeout: float | None = None,
        max_retries: int = 3,
        retry_backoff_s: float = 0.1,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[Any] = (),
    ) -> None:
        self.target = target
        self.timeout = check_timeout(timeout)
        self.retry = RetryPolicy(max_retries, retry_backoff_s, max(2.0, retry_backoff_s))
        options = channel_options(max_message_bytes, self.retry)
        secure = channel_credentials(credentials, tls)
        if secure is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, secure, options=options)
        channel = grpc.intercept_channel(self._channel, *interceptors)
        self._stub = pb_grpc.MCDropoutServiceStub(channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(channel)
        self._metadata: dict[tuple[str, str], ModelInfo] = {}
        self._closed = False

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

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def predict(
        self,
        model: str,
        x: Inputs,
        *,
        num_samples: int | None = None,
        version: str | int | None = None,
        timeout: float | None = None,
        input_name: str | None = None,
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
            num_samples: T; None selects the model's default.
            version: the model version; None selects the newest.
            timeout: the deadline of this call in seconds (overrides the client's).
            input_name: the input ``x`` feeds, for a model with several inputs.

        Returns:
            The statistics of every output; for classifiers also the predicted classes and
            labels, entropies, mutual information and variation ratio.

        Raises:
            ClientError: the server refused or failed the call (the status code tells why:
                NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...).
            ValueError: ``x`` does not fit the model (unknown input, wrong dtype) or a bad
                argument; nothing was sent.
        """
        deadline = deadline_of(self._timeout(timeout))
        samples = _convert.num_samples_field(num_samples)
        wire_version = _convert.version_str(version)
        info = self._cached_metadata(model, wire_version, deadline, timeout)
        inputs = _convert.prepare_inputs(info, x, input_name)
        request = _convert.predict_request(model, wire_version, inputs, samples)
        response: pb.PredictResponse = self._call(
            self._stub.Predict, request, deadline, self._timeout(timeout)
        )
        return _convert.prediction_from_proto(response)

    def list_models(self, *, timeout: float | None = None) -> list[ModelSummary]:
        """Every model of the repository, with its versions (newest first), task, readiness."""
        timeout = self._timeout(timeout)
        response: pb.ListModelsResponse = self._call(
            self._stub.ListModels, pb.ListModelsRequest(), deadline_of(timeout), timeout
        )
        return [_convert.model_summary_from_proto(m) for m in response.models]

    def model_metadata(
        self, model: str, *, version: str | int | None = None, timeout: float | None = None
    ) -> ModelInfo:
        """Describe one model version (the newest by default): inputs, outputs, labels, T."""
        timeout = self._timeout(timeout)
        wire_version = _convert.version_str(version)
        return self._fetch_metadata(model, wire_version, deadline_of(timeout), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The ``grpc.health.v1`` status of the server (``""``), the service or one model.

        Args:
            service: ``""`` for the whole server, ``"mcdropout.v1.MCDropoutService"``, or a
                model name.

        Returns:
            ``"SERVING"``, ``"NOT_SERVING"`` (starting or shutting down) or ``"UNKNOWN"``.

        Raises:
            ClientError: NOT_FOUND for an unknown service or model; UNAVAILABLE when the
                server cannot be reached.
        """
        timeout = self._timeout(timeout)
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._call(self._health.Check, request, deadline_of(timeout), timeout)
        except ClientError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            # The health service answers NOT_FOUND without a message.
            raise ClientError(error.code, unknown_health_service(service)) from error
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else check_timeout(timeout)

    def _cached_metadata(
        self, model: str, version: str, deadline: float | None, timeout: float | None
    ) -> ModelInfo:
        info = self._metadata.get((model, version))
        if info is None:
            info = self._fetch_metadata(model, version, deadline, timeout)
        return info

    def _fetch_metadata(
        self, model: str, version: str, deadline: float | None, timeout: float | None
    ) -> ModelInfo:
        request = pb.GetModelMetadataRequest(model=model, version=version)
        response: pb.ModelMetadata = self._call(
            self._stub.GetModelMetadata, request, deadline, timeout
        )
        info = _convert.model_info_from_proto(response)
        self._metadata[(model, version)] = info
        return info

    def _call(
        self,
        method: Callable[..., _Response],
        request: Any,
        deadline: float | None,
        timeout: float | None,
    ) -> _Response:
        """One RPC with the retry policy, each attempt bounded by the caller's deadline."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        retries = 0
        while True:
            try:
                return method(request, timeout=remaining_s(deadline, timeout))
            except grpc.RpcError as error:
                failure = ClientError.from_rpc_error(error)
                delay = self.retry.delay_s(failure.code, retries, deadline, time.monotonic())
                if delay is None:
                    raise failure from error
            time.sleep(delay)
            retries += 1
