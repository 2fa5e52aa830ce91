"""Which gRPC status each error is answered with, by name: one table, for every transport.

The gRPC servicer turns the names into ``grpc.StatusCode``; the MLServer runtime into the HTTP
statuses MLServer maps back to those codes. This module imports neither.
"""

from __future__ import annotations

from edge.errors import (
    BackendError,
    BackendRunError,
    ConfigError,
    CutError,
    EdgeError,
    ModelFormatError,
    ModelMismatchError,
    ModelNotFoundError,
    TensorFormatError,
    UnknownCodecTableError,
    UnsupportedModelError,
)

from .errors import (
    ControlDisabledError,
    DeadlineExpiredError,
    ServerOverloadedError,
    ServerStoppingError,
)

__all__ = ["STATUS_NAMES", "status_name"]

# Most specific class first: the first match wins.
STATUS_NAMES: tuple[tuple[type[BaseException], str], ...] = (
    (ModelNotFoundError, "NOT_FOUND"),
    (ModelMismatchError, "FAILED_PRECONDITION"),
    (UnknownCodecTableError, "FAILED_PRECONDITION"),
    (TensorFormatError, "INVALID_ARGUMENT"),
    (CutError, "INVALID_ARGUMENT"),
    (BackendRunError, "INVALID_ARGUMENT"),  # a kernel refused the caller's values
    (ServerOverloadedError, "RESOURCE_EXHAUSTED"),
    (ServerStoppingError, "UNAVAILABLE"),
    (DeadlineExpiredError, "DEADLINE_EXCEEDED"),
    (ControlDisabledError, "FAILED_PRECONDITION"),
    (ModelFormatError, "INTERNAL"),
    (UnsupportedModelError, "INTERNAL"),
    (ConfigError, "INTERNAL"),
    (BackendError, "INTERNAL"),
    (EdgeError, "INVALID_ARGUMENT"),
)


def status_name(err: BaseException) -> str:
    """The gRPC status name ``err`` is answered with; INTERNAL for what no entry names."""
    for cls, name in STATUS_NAMES:
        if isinstance(err, cls):
            return name
    return "INTERNAL"
