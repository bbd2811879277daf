"""Request bytes that are not the expected protobuf message.

grpcio decodes a request before any handler or interceptor code runs, and answers a decoding
error with UNKNOWN ("Unexpected <class DecodeError>") plus an ERROR traceback in the log, the
request uncounted. ``service.protocol.interceptor`` registers every handler with
:func:`tolerant` instead: a message that does not decode becomes an :class:`Undecodable`
value, which the handler's bookkeeping answers with INVALID_ARGUMENT, counts in the request
metrics and logs at most once every few seconds (:func:`note`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.errors import InvalidInput
from service.protocol.status import LogEvery

__all__ = ["Undecodable", "note", "tolerant"]

log = logging.getLogger(__name__)
_LOG_EVERY = LogEvery(log, interval_s=10.0)


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not decode.

    Attributes:
        message_type: the full name of the expected message, e.g. "inference.ModelInferRequest".
        size_bytes: the length of what arrived.
    """

    message_type: str
    size_bytes: int

    def error(self) -> InvalidInput:
        """The client's error."""
        return InvalidInput(
            f"the request is not a valid {self.message_type} message ({self.size_bytes} bytes)"
        )


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # a message class's FromString
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "protobuf"


@functools.cache
def tolerant(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning :class:`Undecodable` instead of raising.

    Cached per deserializer: the interceptor asks for it on every call, and there is one per
    method.

    Args:
        deserializer: the handler's request deserializer (a message class's ``FromString``);
            None (raw bytes) is returned as it is.
    """
    if deserializer is None or getattr(deserializer, "tolerant", False):
        return deserializer
    message_type = _message_type(deserializer)

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, or anything else the decoder raises on hostile input
            return Undecodable(message_type, len(raw))

    deserialize.tolerant = True  # type: ignore[attr-defined]
    return deserialize


def note(method: str, undecodable: Undecodable, peer: str) -> None:
    """Log an undecodable request, rate-limited (one line per 10 s at most)."""
    _LOG_EVERY.event(
        f"undecodable request on {method} from {peer}: not a {undecodable.message_type} "
        f"message ({undecodable.size_bytes} bytes)"
    )
