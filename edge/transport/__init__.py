"""Device-side transport: how cut tensors reach edge servers, one (:class:`TailClient`) or several
(:class:`FailoverClient`), both a :class:`TailTransport`."""

from .base import RETRYABLE, RemoteResult, TailTransport, ping, tail_profile
from .client import TailClient
from .failover import FailoverClient

__all__ = [
    "RETRYABLE",
    "FailoverClient",
    "RemoteResult",
    "TailClient",
    "TailTransport",
    "ping",
    "tail_profile",
]
