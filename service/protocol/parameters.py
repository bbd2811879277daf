"""The request parameters of an inference request, for both forms of the Open Inference
Protocol: gRPC's ``InferParameter`` map and the REST form's JSON ``parameters`` object.

Each protocol layer turns its parameters into plain Python values (bool, int, float, str, or
for JSON a list) and :func:`request_options` reads them, once for both:

========================== ========================= ==========================================
name                       value                     meaning
========================== ========================= ==========================================
``mc_samples``             integer >= 0              T (0: the model's default)
``mc_return_samples``      boolean                   also answer ``<out>_samples``
``mc_interval_levels``     "0.9,0.95" (JSON: also a  prediction intervals of values outputs
                           list of numbers)
``mc_target_standard_error`` number                  adaptive sampling (``mc_samples``: the cap)
``mc_seed``                integer in 0..2^64-1      reproducible sampling
``timeout``                integer >= 0 (µs)         Triton's: answer DEADLINE_EXCEEDED after
                                                     this long (0: no timeout)
========================== ========================= ==========================================

Refused with INVALID_ARGUMENT rather than ignored: another ``mc_`` name (a misspelt option
would silently give a different answer), Triton's ``sequence_id`` / ``sequence_start`` /
``sequence_end`` (no sequence batching: every request is independent) and ``priority``
(requests run in arrival order) when set to anything but their defaults (0, false), which
tritonclient never sends. Other names are ignored, as the protocol lets a server do with
parameters it does not define (KServe and Triton clients add their own, e.g. ``headers``);
the REST form's ``binary_data_output`` is read by the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.errors import InvalidInput, quote

__all__ = [
    "MC_INTERVAL_LEVELS",
    "MC_PARAMETERS",
    "MC_RETURN_SAMPLES",
    "MC_SAMPLES",
    "MC_SEED",
    "MC_TARGET_STANDARD_ERROR",
    "TIMEOUT",
    "RequestOptions",
    "earliest",
    "request_options",
]

#: The request parameter that sets T (0 or absent: the model's default).
MC_SAMPLES = "mc_samples"
MC_RETURN_SAMPLES = "mc_return_samples"
MC_INTERVAL_LEVELS = "mc_interval_levels"
MC_TARGET_STANDARD_ERROR = "mc_target_standard_error"
MC_SEED = "mc_seed"
#: Every ``mc_`` parameter; another ``mc_`` name is refused.
MC_PARAMETERS = (MC_SAMPLES, MC_RETURN_SAMPLES, MC_INTERVAL_LEVELS, MC_TARGET_STANDARD_ERROR,
                 MC_SEED)  # fmt: skip
#: Triton's request timeout, in microseconds.
TIMEOUT = "timeout"
#: Triton's parameters for features this server does not have, and why; refused unless they
#: hold their default.
_UNSUPPORTED = {
    "sequence_id": "sequences are not supported: every request is independent",
    "sequence_start": "sequences are not supported: every request is independent",
    "sequence_end": "sequences are not supported: every request is independent",
    "priority": "request priorities are not supported: requests run in arrival order",
}
_MAX_SEED = 2**64


@dataclass(frozen=True)
class RequestOptions:
    """What a request's parameters ask for (see the module's table).

    Attributes:
        num_samples: T; None for the model's default.
        return_samples: answer every sample.
        interval_levels: prediction interval levels (checked by the data plane).
        target_standard_error: adaptive sampling's target; None for a fixed T.
        seed: reproducible sampling's seed; None for the fast path.
        timeout_s: the request's own timeout in seconds; None for none.
    """

    num_samples: int | None = None
    return_samples: bool = False
    interval_levels: tuple[float, ...] = ()
    target_standard_error: float | None = None
    seed: int | None = None
    timeout_s: float | None = None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _shown(value: Any) -> str:
    return quote(value, 40)


def _wrong(name: str, wanted: str, value: Any) -> InvalidInput:
    return InvalidInput(
        f"parameter {name!r} must be {wanted}, got {_kind(value)} ({_shown(value)})"
    )


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an integer", value)
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(name, "a number", value)
    return float(value)


def _levels(value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        try:
            return tuple(float(x) for x in value.split(",")) if value.strip() else ()
        except ValueError:
            raise InvalidInput(
                f"parameter {MC_INTERVAL_LEVELS!r} must be comma-separated numbers, got "
                f"{_shown(value)}"
            ) from None
    if isinstance(value, list | tuple):
        return tuple(_number(MC_INTERVAL_LEVELS, v) for v in value)
    raise _wrong(MC_INTERVAL_LEVELS, 'comma-separated numbers ("0.9,0.95")', value)


def _is_default(value: Any) -> bool:
    return value is False or value in {0, ""}


def request_options(parameters: Mapping[str, Any]) -> RequestOptions:
    """Read an inference request's parameters (plain values; see the module).

    Args:
        parameters: name -> value, as the protocol layer found them.

    Raises:
        InvalidInput: an unknown ``mc_`` name, an unsupported Triton feature, or a value of the
            wrong type or out of range (the values of interval levels and the target are
            checked by the data plane, against the model).
    """
    for name, value in parameters.items():
        if name.startswith("mc_") and name not in MC_PARAMETERS:
            raise InvalidInput(
                f"unknown parameter {_shown(name)} (the mc_ parameters are "
                f"{', '.join(MC_PARAMETERS)})"
            )
        if name in _UNSUPPORTED and not _is_default(value):
            raise InvalidInput(f"parameter {name!r}: {_UNSUPPORTED[name]}")
    num_samples = None
    if MC_SAMPLES in parameters:  # present but null (an unset gRPC parameter) is refused
        num_samples = _integer(MC_SAMPLES, parameters[MC_SAMPLES])
        if num_samples < 0:
            raise InvalidInput(
                f"parameter {MC_SAMPLES!r} must be >= 0 (0: model default), got {num_samples}"
            )
    return_samples = parameters.get(MC_RETURN_SAMPLES, False)
    if not isinstance(return_samples, bool):
        raise _wrong(MC_RETURN_SAMPLES, "a boolean", return_samples)
    levels = _levels(parameters[MC_INTERVAL_LEVELS]) if MC_INTERVAL_LEVELS in parameters else ()
    target = None
    if MC_TARGET_STANDARD_ERROR in parameters:
        target = _number(MC_TARGET_STANDARD_ERROR, parameters[MC_TARGET_STANDARD_ERROR])
    seed = None
    if MC_SEED in parameters:
        seed = _integer(MC_SEED, parameters[MC_SEED])
        if not 0 <= seed < _MAX_SEED:
            raise InvalidInput(f"parameter {MC_SEED!r} must be in 0..2^64-1, got {seed}")
    timeout_s = None
    if TIMEOUT in parameters:
        timeout_us = _integer(TIMEOUT, parameters[TIMEOUT])
        if timeout_us < 0:
            raise InvalidInput(f"parameter {TIMEOUT!r} must be >= 0 microseconds, got {timeout_us}")
        timeout_s = timeout_us / 1e6 if timeout_us else None
    return RequestOptions(
        num_samples=num_samples or None,
        return_samples=return_samples,
        interval_levels=levels,
        target_standard_error=target,
        seed=seed,
        timeout_s=timeout_s,
    )


def earliest(*timeouts_s: float | None) -> float | None:
    """The shortest of several time limits in seconds (None: no limit)."""
    limits: Sequence[float] = [t for t in timeouts_s if t is not None]
    return min(limits) if limits else None
