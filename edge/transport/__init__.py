"""Device-side transport: the gRPC client that sends cut tensors to an edge server."""

from .client import RemoteResult, TailClient, TLSOptions

__all__ = ["RemoteResult", "TLSOptions", "TailClient"]
