"""What the sync and asyncio clients share: channel options, credentials, deadlines, retries."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import grpc

from service.client.errors import ClientError

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAME = "mcdropout.v1.MCDropoutService"


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
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
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
    """A timeout in seconds must be positive (None: no deadline)."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    return timeout


def deadline_of(timeout: float | None) -> float | None:
    """The deadline on the ``time.monotonic()`` clock of a call that starts now."""
    return None if timeout is None else time.monotonic() + timeout


def remaining_s(deadline: float | None, timeout: float | None) -> float | None:
    """The gRPC timeout for the next attempt: the time left before the caller's deadline.

    Raises:
        ClientError: DEADLINE_EXCEEDED when no time is left (a retry or a second RPC of one
            call, such as the metadata look-up of ``predict``, used it all).
    """
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout} s exceeded")
    return left


def channel_options(max_message_bytes: int, retry: RetryPolicy) -> list[tuple[str, Any]]:
    """gRPC channel options: message limits, and reconnect backoff matched to the retries.

    gRPC backs off reconnecting to a server it failed to reach (1 s, growing to 120 s), and
    RPCs fail at once meanwhile; without matching it, every retry of a restarting server
    would fail immediately.
    """
    if not isinstance(max_message_bytes, int) or max_message_bytes < 1:
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


def unknown_health_service(service: str) -> str:
    return (
        f"no health status for {service!r}: use a model name, {SERVICE_NAME!r}, or '' for the "
        "whole server"
    )
