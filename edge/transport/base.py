"""What every way of reaching edge servers offers the device: :class:`TailTransport`.

The stream/unary :class:`~edge.transport.client.TailClient` and the
:class:`~edge.transport.failover.FailoverClient` pool implement it; the cooperative runner,
the link prober and the planner are typed against it. Requests with a special meaning
(a tail profile, a ping) are built here once, on top of :meth:`TailTransport.infer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .. import wire
from ..errors import RemoteError
from ..wire import ModelMetadata, ParameterValue

__all__ = ["DOWN", "RETRYABLE", "RemoteResult", "TailTransport", "ping", "tail_profile"]

# Statuses after which the device should finish the work itself: the link or the server is the problem.
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"})
# Of those, the ones that say the server or the link is down: the device stops sending until a probe
# finds it back. RESOURCE_EXHAUSTED is a refusal of one request by a server that is up (its
# per-device or admission limit): that request finishes here, and the next one is sent as usual.
DOWN = RETRYABLE - {"RESOURCE_EXHAUSTED"}


@dataclass(slots=True)
class RemoteResult:
    """What the server returned, and how long the call took as seen from the device."""

    outputs: dict[str, np.ndarray]
    parameters: Mapping[str, ParameterValue]
    call_ms: float
    """Wall time of the RPC on the device: transfer both ways, queueing and compute."""
    bytes_sent: int
    lossy: bool = False
    """The tensors went through a lossy codec (fp16, int4): the outputs may differ from the model's."""
    server: str = ""
    """The address of the server that answered."""
    coded: bool = False
    """The tensors were offered to the client's codec (each went compressed where that made it
    smaller); False: they went raw."""

    @property
    def compute_ms(self) -> float:
        return _number(self.parameters.get(wire.COMPUTE_US)) / 1000.0

    @property
    def queue_ms(self) -> float:
        return _number(self.parameters.get(wire.QUEUE_US)) / 1000.0

    @property
    def transfer_ms(self) -> float:
        """Call time not spent computing or queueing on the server: the network and both stacks."""
        return max(self.call_ms - self.compute_ms - self.queue_ms, 0.0)

    @property
    def stacked(self) -> int:
        """The requests that travelled in one message with this one (itself included; 1: alone).
        Its call time carried all of their bytes, each way."""
        value = self.parameters.get(wire.STACK)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STACKED:
            return 1
        return value


MAX_STACKED = 64
"""The most requests a stacked answer may say it carried (edge-server takes at most 64)."""


def _number(value: object) -> float:
    # A peer may send anything under these names: only a number counts.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value)


class TailTransport(Protocol):
    """Sends requests to one edge server or several. Every failure is a :class:`RemoteError`."""

    @property
    def address(self) -> str:
        """The server (or servers, comma-separated) requests go to."""
        ...

    @property
    def timeout_s(self) -> float:
        """The default deadline of one request."""
        ...

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
        coded: bool = True,
    ) -> RemoteResult:
        """``inputs`` to ``model`` on the server; ``coded`` False sends them raw, whatever the codec."""
        ...

    def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
        coded: bool = True,
    ) -> Future[RemoteResult]:
        """:meth:`infer` without waiting; the future holds the RemoteResult or the RemoteError."""
        ...

    def max_inflight(self) -> int | None:
        """How many requests the server lets one device keep in flight, if it says."""
        ...

    def codec_sent(self) -> str:
        """What the tensors go as (:func:`edge.wire.sent_as`): the configured codec where the server
        decodes it, else raw. Raises RemoteError when the server cannot be asked."""
        ...

    def ready(self, timeout_s: float | None = None) -> bool: ...

    def wait_ready(self, timeout_s: float = 10.0) -> None: ...

    def model_metadata(self, model: str, timeout_s: float | None = None) -> ModelMetadata: ...

    def close(self) -> None: ...


def tail_profile(
    transport: TailTransport, model: str, *, model_sha256: str | None = None, timeout_s: float | None = None
) -> np.ndarray:
    """The server's median tail latency (ms) of ``model`` at every cut 0..N; +inf where a tail failed.

    A request with the bool parameter ``profile`` and no inputs; the first one per model makes
    the server measure, so give it a generous timeout.
    """
    parameters: dict[str, ParameterValue] = {wire.PROFILE: True}
    if model_sha256 is not None:
        parameters[wire.MODEL_SHA256] = model_sha256
    result = transport.infer(model, {}, parameters=parameters, timeout_s=timeout_s)
    profile = result.outputs.get(wire.PROFILE_OUTPUT)
    if profile is None or profile.ndim != 1 or profile.dtype.kind != "f":
        raise RemoteError(
            f"INTERNAL: edge server {transport.address} sent no tail profile", status="INTERNAL"
        )
    return profile.astype(np.float64)


def ping(
    transport: TailTransport, model: str, *, model_sha256: str, timeout_s: float | None = None
) -> RemoteResult:
    """A request that runs nothing: what one tail request's fixed part costs, paid the same way."""
    return transport.infer(
        model, {}, parameters={wire.PING: True, wire.MODEL_SHA256: model_sha256}, timeout_s=timeout_s
    )
