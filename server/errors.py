"""Errors only the server raises. The gRPC layer maps every error class to a status code."""

from __future__ import annotations

from edge.errors import EdgeError

__all__ = [
    "ControlDisabledError",
    "ListenError",
    "ServerError",
    "ServerOverloadedError",
    "ServerStoppingError",
]


class ServerError(EdgeError):
    """Base class of the server's own errors."""


class ServerOverloadedError(ServerError):
    """Too many requests are in flight; the client should back off or run locally."""


class ServerStoppingError(ServerError):
    """The server is draining and accepts no new work."""


class ListenError(ServerError):
    """The server cannot listen on the address it was given (in use, unknown, not this machine's)."""


class ControlDisabledError(ServerError):
    """A request to load or unload a model on a server started without ``--model-control``."""


class DeadlineExpiredError(ServerError):
    """The caller's deadline passed while the request waited: it is dropped before compute."""
