"""Exceptions raised by the device runtime and the model tools.

Every error the project raises on purpose derives from :class:`EdgeError`, so a caller
(the CLI, the daemon, the server's gRPC layer) can tell a user's mistake from a bug.
This module imports no grpc: the server maps these classes to status codes itself.
"""

from __future__ import annotations

__all__ = [
    "ECHO_CHARS",
    "BackendError",
    "BackendRunError",
    "BackendUnavailableError",
    "ConfigError",
    "CutError",
    "EdgeError",
    "ModelFormatError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "RemoteError",
    "TensorFormatError",
    "UnknownCodecTableError",
    "UnsupportedModelError",
    "echo",
]

ECHO_CHARS = 64
"""The most of a caller's value an error message repeats."""


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error may name what it refuses, but a caller
    cannot make it (or the log) as large as they like."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[: limit - 1]}… ({size:,} characters)"


class EdgeError(Exception):
    """Base class of every error this project raises on purpose."""


class ModelFormatError(EdgeError):
    """A file is not a readable TFLite flatbuffer (not a flatbuffer, truncated, corrupt)."""


class UnsupportedModelError(EdgeError):
    """A valid model uses something the partitioner cannot split (control flow, several subgraphs)."""


class CutError(EdgeError):
    """A cut index is out of range, or a tensor name does not name a cut."""


class ModelMismatchError(EdgeError):
    """Two sides disagree on which model, or which boundary, they are running."""


class ModelNotFoundError(EdgeError):
    """A model name is not served."""


class TensorFormatError(EdgeError):
    """A tensor's datatype, shape or bytes are malformed, or do not match what is expected."""


class UnknownCodecTableError(TensorFormatError):
    """A calibrated frame names a codec table this server does not hold (it restarted, or dropped it):
    the device sends the table again."""


class BackendError(EdgeError):
    """The inference backend failed to load or run a model."""


class BackendRunError(BackendError):
    """A loaded model failed on the values it was given (a kernel refused them: a shape tensor
    with a negative dimension, an index out of range). The inputs are at fault, not the model."""


class BackendUnavailableError(BackendError):
    """The library behind a backend is not installed, or the backend key is unknown."""


class ConfigError(EdgeError):
    """A configuration file or value is invalid."""


class RemoteError(EdgeError):
    """A call to the edge server failed; ``status`` is the gRPC status name, such as ``UNAVAILABLE``."""

    def __init__(self, message: str, *, status: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.status = status
