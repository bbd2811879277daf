from __future__ import annotations

import grpc
import pytest

from service import errors
from service.protocol.grpc_server import status_of


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
        (errors.VersionNotFound("m", "3", ["1"]), grpc.StatusCode.NOT_FOUND),
        (errors.ResourceExhausted("big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ModelNotReady("m", "1"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled("gone"), grpc.StatusCode.CANCELLED),
    ],
)
def test_each_error_maps_to_its_status_with_its_message(
    exc: errors.ServiceError, code: grpc.StatusCode
) -> None:
    assert status_of(exc) == (code, exc.message)


@pytest.mark.parametrize(
    "exc", [errors.InternalError("db password is hunter2"), KeyError("hunter2"), RuntimeError("x")]
)
def test_internal_errors_never_leak_details(exc: Exception) -> None:
    code, message = status_of(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert "hunter2" not in message
    assert message.startswith("internal error")


def test_every_error_class_maps_to_a_real_error_status() -> None:
    checked = []
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.ServiceError):
            assert cls.code in grpc.StatusCode.__members__, (
                f"{name}.code {cls.code!r}: no such status"
            )
            assert cls.code != "OK", f"{name} would answer a failure with OK"
            exc = cls.__new__(cls)  # the subclasses' constructors differ; the base's is enough
            errors.ServiceError.__init__(exc, "message")
            assert status_of(exc)[0] == grpc.StatusCode[cls.code], name
            checked.append(name)
    # The scan found the tree (the base and its leaves).
    assert "ServiceError" in checked, checked
    assert "InvalidInput" in checked, checked
