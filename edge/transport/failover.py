"""Several edge servers behind one client: a pool, with a policy for which server gets a request.

A :class:`~edge.transport.base.TailTransport` over several: the same calls, and the same failure,
:class:`~edge.errors.RemoteError`, raised when no server answered, so the caller finishes the work
locally. Policies (:data:`POLICIES`):

- ``failover``: the first healthy server, in the order given;
- ``round-robin``: the healthy servers in turn;
- ``least-loaded``: the healthy server with the least work ahead of this request: the requests
  this device has in flight there, times the time one takes there, plus the queue time the
  server last reported (``queue_us``). Until a server has answered once, the time one takes
  there is how long its oldest request has waited so far: an idle server is tried at once, and
  a slow one is not sent a burst before its first answer.

A server that fails leaves the pool: it is tried only after every healthy one (so a request
still gets every chance before the device runs it itself), and a background probe (OIP
``ServerReady``, every ``retry_after_s``) brings it back once it answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Literal, get_args

import numpy as np

from ..errors import ConfigError, RemoteError
from ..wire import ModelMetadata, ParameterValue
from .base import RemoteResult, TailTransport

__all__ = ["POLICIES", "FailoverClient", "Policy"]

logger = logging.getLogger(__name__)

Policy = Literal["failover", "round-robin", "least-loaded"]
POLICIES: tuple[Policy, ...] = get_args(Policy)

_SMOOTHING = 0.2
"""Weight of the newest sample in each server's moving averages (call time, queue time)."""


class FailoverClient:
    """A pool of servers under ``policy``; see the module's docstring.

    ``retry_after_s``: how often a failed server is probed; 0 re-admits it at the next request.
    """

    def __init__(
        self,
        clients: Sequence[TailTransport],
        *,
        policy: Policy = "failover",
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not clients:
            raise ConfigError("a pool of edge servers needs at least one")
        if policy not in POLICIES:
            raise ConfigError(f"unknown pool policy {policy!r}; choose one of: {', '.join(POLICIES)}")
        self.clients = list(clients)
        self.policy = policy
        self.retry_after_s = retry_after_s
        self.timeout_s = self.clients[0].timeout_s
        self._clock = clock
        n = len(self.clients)
        # Guards everything below; never held during a call.
        self._lock = threading.Lock()
        self._failed_at: dict[int, float] = {}
        self._inflight = [0] * n
        self._service_ms: list[float | None] = [None] * n
        self._waiting_since: list[float | None] = [None] * n  # oldest request in flight, while unknown
        self._queue_ms = [0.0] * n
        self._turn = 0
        self.answered = [0] * n
        """Requests each server answered."""
        self._retries = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-failover")
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None

    def codec_sent(self) -> str:
        """What every server that answers is sent, or raw when they differ (the planner then plans
        with raw bytes)."""
        sent: set[str] = set()
        for client in self.clients:
            try:
                sent.add(client.codec_sent())
            except RemoteError:
                continue  # a server down now is asked when it is back
        return sent.pop() if len(sent) == 1 else "raw"

    @property
    def cut_encoder(self) -> object | None:
        """The calibrated codec every server is sent with, when they share one: the planner plans with
        its bytes, as :meth:`codec_sent` says what goes."""
        encoders = [getattr(client, "cut_encoder", None) for client in self.clients]
        return encoders[0] if all(e is not None and e == encoders[0] for e in encoders) else None

    @property
    def address(self) -> str:
        return ",".join(c.address for c in self.clients)

    def next_address(self) -> str:
        """The server the next request goes to first."""
        return self.clients[self.order(advance=False)[0]].address

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
        """The first answer, trying the servers in the policy's order; RemoteError (the last server's
        status) when none answered."""
        errors: list[str] = []
        last: RemoteError | None = None
        for index in self.order():
            client = self.clients[index]
            self._started(index)
            try:
                result = client.infer(
                    model,
                    inputs,
                    parameters=parameters,
                    timeout_s=timeout_s,
                    request_id=request_id,
                    coded=coded,
                )
            except RemoteError as err:
                self._failed(index, err)
                errors.append(f"{client.address}: {err}")
                last = err
                continue
            self._answered(index, result)
            return result
        assert last is not None
        raise RemoteError("; ".join(errors), status=last.status) from last

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
        """:meth:`infer` without waiting: the same order of servers, tried one after another until
        one answers; the future holds its RemoteResult, or a RemoteError when none answered."""
        outer: Future[RemoteResult] = Future()
        order = self.order()
        errors: list[str] = []

        def attempt(position: int, last: RemoteError | None) -> None:
            if position >= len(order):
                assert last is not None
                outer.set_exception(RemoteError("; ".join(errors), status=last.status))
                return
            index = order[position]
            client = self.clients[index]

            def failed(err: RemoteError) -> None:
                self._failed(index, err)
                errors.append(f"{client.address}: {err}")
                if position + 1 < len(order):
                    # Off the answering client's loop: the next client may need to ask its server first.
                    self._retries.submit(attempt, position + 1, err)
                else:
                    attempt(position + 1, err)

            def done(future: Future[RemoteResult]) -> None:
                err = future.exception()
                if err is None:
                    self._answered(index, future.result())
                    outer.set_result(future.result())
                elif isinstance(err, RemoteError):
                    failed(err)
                else:
                    self._finished(index)
                    outer.set_exception(err)

            self._started(index)
            try:
                inner = client.submit(
                    model,
                    inputs,
                    parameters=parameters,
                    timeout_s=timeout_s,
                    request_id=request_id,
                    coded=coded,
                )
            except RemoteError as err:
                failed(err)
                return
            inner.add_done_callback(done)

        attempt(0, None)
        return outer

    def max_inflight(self) -> int | None:
        """The first answering server's stream window (the servers of a pool are alike)."""
        for index in self.order(advance=False):
            try:
                return self.clients[index].max_inflight()
            except RemoteError:
                continue
        return None

    def ready(self, timeout_s: float | None = None) -> bool:
        return any(c.ready(timeout_s) for c in self.clients)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until one server is ready, or raise RemoteError."""
        deadline = time.monotonic() + timeout_s
        while True:
            for client in self.clients:
                if client.ready(min(1.0, max(deadline - time.monotonic(), 0.01))):
                    return
            if time.monotonic() >= deadline:
                raise RemoteError(f"UNAVAILABLE: no edge server of {self.address} ready within {timeout_s}s")
            time.sleep(0.1)

    def model_metadata(self, model: str, timeout_s: float | None = None) -> ModelMetadata:
        last: RemoteError | None = None
        for index in self.order(advance=False):
            try:
                return self.clients[index].model_metadata(model, timeout_s)
            except RemoteError as err:
                last = err
        assert last is not None
        raise last

    def close(self) -> None:
        self._closed.set()
        if self._prober is not None:
            self._prober.join(timeout=5.0)
        self._retries.shutdown(wait=True)
        for client in self.clients:
            client.close()

    def __enter__(self) -> FailoverClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def order(self, *, advance: bool = True) -> list[int]:
        """Indices of the servers in the order the next request tries them: the healthy ones in the
        policy's order, then those that failed, oldest failure first. ``advance`` False leaves
        round robin's turn where it is (a look, not a request)."""
        with self._lock:
            if self.retry_after_s <= 0:  # nothing probes: a failed server comes back at once
                self._failed_at.clear()
            failed = dict(self._failed_at)
            healthy = [i for i in range(len(self.clients)) if i not in failed]
            if self.policy == "round-robin" and healthy:
                start = self._turn % len(healthy)
                healthy = healthy[start:] + healthy[:start]
                if advance:
                    self._turn += 1
            elif self.policy == "least-loaded":
                healthy.sort(key=lambda i: (self._load(i), self._inflight[i]))
        return healthy + sorted(failed, key=failed.__getitem__)

    # -- bookkeeping (under the lock) --------------------------------------------------

    def _load(self, index: int) -> float:
        """The work ahead of a request sent to server ``index``, in milliseconds. Before its first
        answer a server's time a request is what its oldest request has waited (0 when idle)."""
        service = self._service_ms[index]
        if service is None:
            since = self._waiting_since[index]
            service = 0.0 if since is None else (self._clock() - since) * 1e3
        return (self._inflight[index] + 1) * service + self._queue_ms[index]

    def _started(self, index: int) -> None:
        with self._lock:
            if self._inflight[index] == 0 and self._service_ms[index] is None:
                self._waiting_since[index] = self._clock()
            self._inflight[index] += 1

    def _ended(self, index: int) -> None:
        self._inflight[index] -= 1
        if self._inflight[index] == 0:
            self._waiting_since[index] = None

    def _finished(self, index: int) -> None:
        with self._lock:
            self._ended(index)

    def _answered(self, index: int, result: RemoteResult) -> None:
        with self._lock:
            self._ended(index)
            self.answered[index] += 1
            self._failed_at.pop(index, None)
            service = max(result.call_ms - result.queue_ms, 0.0)
            previous = self._service_ms[index]
            self._service_ms[index] = (
                service if previous is None else previous + _SMOOTHING * (service - previous)
            )
            self._queue_ms[index] += _SMOOTHING * (result.queue_ms - self._queue_ms[index])

    def _failed(self, index: int, err: RemoteError) -> None:
        logger.info("edge server %s failed (%s); trying the next", self.clients[index].address, err.status)
        with self._lock:
            self._ended(index)
            if err.status == "RESOURCE_EXHAUSTED":
                return  # busy, not down: it stays in turn
            self._failed_at[index] = self._clock()
            start = self._prober is None and self.retry_after_s > 0 and not self._closed.is_set()
            if start:
                self._prober = threading.Thread(target=self._probe, name="edge-pool-probe", daemon=True)
        if start:
            assert self._prober is not None
            self._prober.start()

    def _probe(self) -> None:
        """Every ``retry_after_s``, ask each failed server whether it is ready; re-admit those that are."""
        while not self._closed.wait(self.retry_after_s):
            with self._lock:
                failed = list(self._failed_at)
            for index in failed:
                client = self.clients[index]
                if self._closed.is_set():
                    return
                if client.ready(min(self.retry_after_s, 2.0)):
                    logger.info("edge server %s is ready again; back in the pool", client.address)
                    with self._lock:
                        self._failed_at.pop(index, None)
