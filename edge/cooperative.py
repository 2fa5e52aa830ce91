"""Cooperative inference on the device: run the head, send the cut, get the model's outputs.

If the server or the link fails, the device runs the tail itself: it holds the whole
model, so the request never fails and the outputs are the same bytes either way.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import numpy as np

from . import wire
from .errors import RemoteError, TensorFormatError
from .ratelog import RateLimitedLog
from .runner import HALF_ERRORS, ModelRunner
from .transport.base import DOWN, RETRYABLE, RemoteResult, TailTransport, ping
from .transport.circuit import Circuit
from .wire import ParameterValue

__all__ = [
    "CooperativeRunner",
    "EarlyStop",
    "FixedSplit",
    "InferenceResult",
    "SplitPolicy",
    "StageTimings",
    "Ticket",
]

logger = logging.getLogger(__name__)
_REFUSALS = RateLimitedLog(logger)


@dataclass(slots=True)
class StageTimings:
    """Milliseconds spent in each stage of one request."""

    head_ms: float = 0.0
    transfer_ms: float = 0.0
    """Network and both gRPC stacks: the call time the server did not spend queueing or computing."""
    queue_ms: float = 0.0
    tail_ms: float = 0.0
    """The server's own compute time (or the local tail's, after a fallback)."""
    e2e_ms: float = 0.0
    call_ms: float = 0.0
    """The whole RPC as the device saw it (0 when nothing was sent)."""

    def as_dict(self) -> dict[str, float]:
        return {
            "head_ms": self.head_ms,
            "transfer_ms": self.transfer_ms,
            "queue_ms": self.queue_ms,
            "tail_ms": self.tail_ms,
            "e2e_ms": self.e2e_ms,
        }


@dataclass(slots=True)
class InferenceResult:
    """The model's outputs for one request, and how they were computed."""

    outputs: dict[str, np.ndarray]
    split_point: int
    fallback: bool
    timings: StageTimings
    bytes_sent: int = 0
    fallback_reason: str | None = None
    remote: RemoteResult | None = field(default=None, repr=False)
    exited: bool = False
    """The head's early exit answered: ``outputs`` holds what the head computed, nothing was sent."""
    lossy: bool = False
    """The cut went through a lossy codec: the outputs may differ from the whole model's."""
    fallback_status: str | None = None
    """The gRPC status the server failed the request with, when it did."""
    broken_cut: bool = False
    """The device could not run its half of this cut (its backend refused it), so it ran the whole
    model instead: a fallback the server is not to blame for."""

    @property
    def offloaded(self) -> bool:
        return self.remote is not None


@dataclass(frozen=True, slots=True)
class EarlyStop:
    """An early exit the head computes from cut ``cut`` on; ``check`` (given the head's model
    outputs) says whether its answer stands."""

    cut: int
    check: Callable[[Mapping[str, np.ndarray]], bool]


@dataclass(slots=True)
class Ticket:
    """A submitted request: its result (``done``), or the call on its way and what the device
    needs to finish it, or to run the tail itself if the call fails."""

    done: InferenceResult | None = None
    call: Future[RemoteResult] | None = None
    """The call on its way (submitted without waiting)."""
    remote: RemoteResult | None = None
    error: RemoteError | None = None
    """The call's answer or failure, when it was made waiting."""
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    cut: Mapping[str, np.ndarray] = field(default_factory=dict)
    head_outputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    k: int = 0
    started: float = 0.0
    head_ms: float = 0.0

    def ready(self) -> bool:
        """Collecting it would not wait."""
        if self.call is not None:
            return self.call.done()
        return self.done is not None or self.remote is not None or self.error is not None


class SplitPolicy(Protocol):
    """Chooses the cut for the next request, and learns from each result."""

    def choose(self) -> int: ...

    def coded(self, k: int) -> bool:
        """Whether a request at cut ``k`` goes through the client's codec (else its tensors go raw)."""
        ...

    def observe(self, result: InferenceResult) -> None: ...

    def bind(self, circuit: Circuit) -> None:
        """The circuit of the transport the runner sends on; a policy may follow it."""
        ...


class FixedSplit:
    """Always the same cut; ``coded`` False sends it raw, whatever the client's codec."""

    def __init__(self, k: int, *, coded: bool = True) -> None:
        self.k = k
        self._coded = coded

    def choose(self) -> int:
        return self.k

    def coded(self, k: int) -> bool:
        return self._coded

    def observe(self, result: InferenceResult) -> None:
        return None

    def bind(self, circuit: Circuit) -> None:
        return None


class CooperativeRunner:
    """Runs requests head-on-device, tail-on-server, with a local fallback.

    ``client`` None means local only. ``model_name`` is the name the server serves the model
    under (by default, the model file's stem). After a failure the link or the server is to
    blame for, the ``circuit`` (by default one that pings ``client``) sends requests to the
    device alone until a background probe finds the server back, at most every ``retry_after_s``.
    """

    def __init__(
        self,
        runner: ModelRunner,
        client: TailTransport | None,
        *,
        model_name: str,
        policy: SplitPolicy | int,
        timeout_s: float | None = None,
        circuit: Circuit | None = None,
        retry_after_s: float = 5.0,
    ) -> None:
        self.runner = runner
        self.graph = runner.graph
        self.client = client
        self.model_name = model_name
        self.policy: SplitPolicy = FixedSplit(policy) if isinstance(policy, int) else policy
        self.timeout_s = timeout_s
        self._sha256 = self.graph.sha256
        if isinstance(policy, int):
            self.graph.cut(policy)  # an out-of-range cut fails here, not on the first request
        if circuit is None and client is not None:
            probe_timeout = timeout_s if timeout_s is not None else client.timeout_s
            circuit = Circuit(
                functools.partial(
                    ping, client, model_name, model_sha256=self._sha256, timeout_s=probe_timeout
                ),
                retry_after_s=retry_after_s,
                name=f"edge server {client.address}",
            )
        self.circuit = circuit
        if circuit is not None:
            self.policy.bind(circuit)

    def infer(
        self, inputs: Mapping[str, np.ndarray], *, request_id: str = "", stop: EarlyStop | None = None
    ) -> InferenceResult:
        """One request. With ``stop``, the head's early exit is checked once the head has run (at a cut
        of ``stop.cut`` or later; run here, the model is cut there): when it stands, the result holds
        the head's outputs and nothing is sent. Otherwise the outputs are the whole model's."""
        return self.collect(self.submit(inputs, request_id=request_id, stop=stop, wait=True))

    def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        request_id: str = "",
        stop: EarlyStop | None = None,
        wait: bool = False,
    ) -> Ticket:
        """:meth:`infer`, up to sending the cut: the head runs now, and the call to the server goes
        on without waiting. :meth:`collect` the ticket for the result; meanwhile the next request's
        head can run. A request the device answers alone is answered here already. ``wait`` makes
        the call on the calling thread and waits for it (one request at a time: no thread hand-off)."""
        sent, parameters = self._prologue(inputs, stop)
        if sent.done is not None:
            return sent
        assert self.client is not None
        if not wait:
            sent.call = self.client.submit(
                self.model_name,
                sent.cut,
                parameters=parameters,
                timeout_s=self.timeout_s,
                request_id=request_id,
                coded=self.policy.coded(sent.k),
            )
            return sent
        try:
            sent.remote = self.client.infer(
                self.model_name,
                sent.cut,
                parameters=parameters,
                timeout_s=self.timeout_s,
                request_id=request_id,
                coded=self.policy.coded(sent.k),
            )
        except RemoteError as err:
            sent.error = err
        return sent

    def _prologue(
        self, inputs: Mapping[str, np.ndarray], stop: EarlyStop | None
    ) -> tuple[Ticket, dict[str, ParameterValue]]:
        """What :meth:`infer` and :meth:`submit` share: check the inputs, choose the cut, and run the
        head (or the whole model, when the request is the device's alone). The ticket is done when
        nothing is to be sent; else it holds the cut, and the parameters go with it."""
        self.check_inputs(inputs)
        k = self.policy.choose()
        done = self._alone(inputs, k, stop)
        if done is None:
            sent, done = self._head(inputs, k, stop if stop is not None and k >= stop.cut else None)
        else:
            sent = Ticket()
        if done is not None:
            if not done.exited:
                self.policy.observe(done)
            sent.done = done
            return sent, {}
        return sent, {wire.MODEL_SHA256: self._sha256, wire.SPLIT_POINT: k}

    def _alone(
        self, inputs: Mapping[str, np.ndarray], k: int, stop: EarlyStop | None
    ) -> InferenceResult | None:
        """The result computed on the device alone, when cut ``k`` sends nothing or the server is
        known to be down; None when the request should go to the server."""
        n = self.graph.num_operators
        if self.client is None or k >= n:
            return self._local(inputs, n, stop=stop)
        if self.circuit is not None and not self.circuit.available():
            return self._local(inputs, n, fallback_reason=self.circuit.reason, stop=stop)
        return None

    def collect(self, ticket: Ticket) -> InferenceResult:
        """The result of a submitted request: the server's answer, or the tail run here when the
        call failed. Waits for the call (its own deadline bounds the wait)."""
        if ticket.done is not None:
            return ticket.done
        if ticket.call is not None:
            error = ticket.call.exception()
            if error is not None and not isinstance(error, RemoteError):
                raise error
            remote = ticket.call.result() if error is None else None
        else:
            error, remote = ticket.error, ticket.remote
        if remote is not None:
            return self._finish(ticket, self._joined(ticket, remote))
        assert error is not None
        return self._finish(ticket, self._fallback(ticket, error))

    def _finish(self, ticket: Ticket, result: InferenceResult) -> InferenceResult:
        ticket.done = result
        self.policy.observe(result)
        return result

    def max_inflight(self) -> int | None:
        """The requests the server lets this device keep in flight, if it says (None otherwise, or
        when it cannot be asked now)."""
        if self.client is None:
            return None
        try:
            return self.client.max_inflight()
        except RemoteError:
            return None

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Every model input present, with the model's dtype and shape."""
        for spec in self.graph.inputs:
            array = inputs.get(spec.name)
            if array is None:
                raise TensorFormatError(f"missing input {spec.name!r}")
            if array.dtype != spec.dtype or tuple(array.shape) != spec.shape:
                raise TensorFormatError(
                    f"input {spec.name!r} must be {spec.dtype.name}{list(spec.shape)}, "
                    f"got {array.dtype.name}{list(array.shape)}"
                )
        if len(inputs) != len(self.graph.inputs):  # every model input is there, so some are extra
            extra = set(inputs) - {t.name for t in self.graph.inputs}
            raise TensorFormatError(f"unexpected input(s): {', '.join(sorted(extra))}")

    def close(self) -> None:
        """Close the transport and the runner."""
        try:
            if self.circuit is not None:
                self.circuit.close()
            if self.client is not None:
                self.client.close()
        finally:
            self.runner.close()

    def __enter__(self) -> CooperativeRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _local(
        self,
        inputs: Mapping[str, np.ndarray],
        n: int,
        *,
        fallback_reason: str | None = None,
        stop: EarlyStop | None = None,
    ) -> InferenceResult:
        """The whole model here; a fallback when the server should have run the tail but is down.
        With ``stop``, the head up to its cut first, and the rest only if the exit does not stand."""
        started = time.perf_counter()
        if stop is not None and 0 < stop.cut < n:
            head = self.runner.run_head(stop.cut, inputs)
            if stop.check(head.outputs):
                ms = (time.perf_counter() - started) * 1000.0
                return InferenceResult(
                    head.outputs, n, fallback_reason is not None, StageTimings(head_ms=ms, e2e_ms=ms),
                    fallback_reason=fallback_reason, exited=True,
                )  # fmt: skip
            outputs = {**head.outputs, **self.runner.run_tail(stop.cut, head.cut)}
        else:
            outputs = self.runner.run(inputs)
        ms = (time.perf_counter() - started) * 1000.0
        return InferenceResult(
            outputs=self._ordered(outputs),
            split_point=n,
            fallback=fallback_reason is not None,
            timings=StageTimings(head_ms=ms, e2e_ms=ms),
            fallback_reason=fallback_reason,
        )

    def _head(
        self, inputs: Mapping[str, np.ndarray], k: int, stop: EarlyStop | None
    ) -> tuple[Ticket, InferenceResult | None]:
        """Run the head of cut ``k``: what is to be sent (and kept to finish with), and the result
        when ``stop``'s exit stands (nothing is then sent)."""
        started = time.perf_counter()
        try:
            head = self.runner.run_head(k, inputs)
        except HALF_ERRORS as err:
            reason = f"the head of cut {k} cannot run on {self.runner.backend}: {err}"
            logger.warning("%s; running the whole model here", reason)
            local = self._local(inputs, self.graph.num_operators, fallback_reason=reason, stop=stop)
            local.broken_cut = True
            return Ticket(inputs=inputs, k=k), local
        head_ms = (time.perf_counter() - started) * 1000.0
        sent = Ticket(
            cut=head.cut, head_outputs=head.outputs, inputs=inputs, k=k, started=started, head_ms=head_ms
        )
        if stop is not None and stop.check(head.outputs):
            timings = StageTimings(head_ms=head_ms, e2e_ms=head_ms)
            return sent, InferenceResult(head.outputs, k, False, timings, exited=True)
        return sent, None

    def _joined(self, sent: Ticket, remote: RemoteResult) -> InferenceResult:
        """The head's outputs and the server's, as one result (a fallback if the server left some out)."""
        outputs = {**sent.head_outputs, **remote.outputs}
        missing = [t.name for t in self.graph.outputs if t.name not in outputs]
        if missing:
            reason = f"server returned no {', '.join(missing)}"
            return self._fallback(sent, RemoteError(reason, status="INTERNAL"))
        e2e_ms = (time.perf_counter() - sent.started) * 1000.0
        timings = StageTimings(
            head_ms=sent.head_ms,
            transfer_ms=remote.transfer_ms,
            queue_ms=remote.queue_ms,
            tail_ms=remote.compute_ms,
            e2e_ms=e2e_ms,
            call_ms=remote.call_ms,
        )
        return InferenceResult(
            outputs=self._ordered(outputs),
            split_point=sent.k,
            fallback=False,
            timings=timings,
            bytes_sent=remote.bytes_sent,
            remote=remote,
            lossy=remote.lossy,
        )

    def _fallback(self, sent: Ticket, err: RemoteError) -> InferenceResult:
        """The tail run here, after the server failed ``sent``."""
        k, started, head_ms = sent.k, sent.started, sent.head_ms
        if err.status in DOWN:
            logger.warning("edge server unavailable, finishing cut %d locally: %s", k, err)
            if self.circuit is not None:
                self.circuit.trip(str(err))
        elif err.status in RETRYABLE:
            logger.info("edge server busy, finishing cut %d locally: %s", k, err)
        else:
            # The same refusal comes back for every request (a model that differs from the server's).
            _REFUSALS.log(
                logging.ERROR,
                f"{err.status}",
                "edge server refused the request, finishing cut %d locally: %s",
                k,
                err,
            )
        tail_started = time.perf_counter()
        try:
            outputs = {**sent.head_outputs, **self.runner.run_tail(k, sent.cut)}
        except HALF_ERRORS as tail_err:
            # The device holds the whole model: when its tail of this cut cannot run, the model can.
            logger.warning("the tail of cut %d cannot run here (%s); running the whole model", k, tail_err)
            outputs = self.runner.run(sent.inputs)
        done = time.perf_counter()
        timings = StageTimings(
            head_ms=head_ms,
            tail_ms=(done - tail_started) * 1000.0,
            e2e_ms=(done - started) * 1000.0,
            transfer_ms=(tail_started - started) * 1000.0 - head_ms,
        )
        return InferenceResult(
            outputs=self._ordered(outputs),
            split_point=k,
            fallback=True,
            timings=timings,
            fallback_reason=str(err),
            fallback_status=err.status,
        )

    def _ordered(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t.name: outputs[t.name] for t in self.graph.outputs}
