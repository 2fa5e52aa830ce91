"""Several edge servers behind one client: try them in order of preference, skip the ones that just failed.

A :class:`~edge.transport.base.TailTransport` over several: the same calls, and the same failure,
:class:`~edge.errors.RemoteError`, raised when no server answered, so the caller finishes the work locally.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np

from ..codec import ModelMetadata, ParameterValue
from ..errors import ConfigError, RemoteError
from .base import RemoteResult, TailTransport

__all__ = ["FailoverClient"]

logger = logging.getLogger(__name__)


class FailoverClient:
    """Sends each request to the first healthy server, in order; a server that fails is tried last for a while.

    ``retry_after_s``: how long a failed server stays behind the others. When every server
    has failed recently, all are still tried, in order, before giving up.
    """

    def __init__(
        self,
        clients: Sequence[TailTransport],
        *,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not clients:
            raise ConfigError("a failover client needs at least one edge server")
        self.clients = list(clients)
        self.retry_after_s = retry_after_s
        self.timeout_s = self.clients[0].timeout_s
        self._clock = clock
        # Guards _failed_at only; never held during a call.
        self._lock = threading.Lock()
        self._failed_at: dict[int, float] = {}
        self._retries = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-failover")

    @property
    def codec(self) -> str:
        """The codec every server in the pool is asked for, or raw when they differ (the planner then
        plans with raw bytes)."""
        codecs = {getattr(c, "codec", "raw") for c in self.clients}
        return codecs.pop() if len(codecs) == 1 else "raw"

    @property
    def address(self) -> str:
        return ",".join(c.address for c in self.clients)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> RemoteResult:
        """The first server's answer; RemoteError (the last server's status) when none answered."""
        errors: list[str] = []
        last: RemoteError | None = None
        for index in self.order():
            client = self.clients[index]
            try:
                result = client.infer(
                    model, inputs, parameters=parameters, timeout_s=timeout_s, request_id=request_id
                )
            except RemoteError as err:
                self._mark(index, failed=True)
                logger.info("edge server %s failed (%s); trying the next", client.address, err.status)
                errors.append(f"{client.address}: {err}")
                last = err
                continue
            self._mark(index, failed=False)
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
                self._mark(index, failed=True)
                logger.info("edge server %s failed (%s); trying the next", client.address, err.status)
                errors.append(f"{client.address}: {err}")
                if position + 1 < len(order):
                    # Off the answering client's loop: the next client may need to ask its server first.
                    self._retries.submit(attempt, position + 1, err)
                else:
                    attempt(position + 1, err)

            def done(future: Future[RemoteResult]) -> None:
                err = future.exception()
                if err is None:
                    self._mark(index, failed=False)
                    outer.set_result(future.result())
                elif isinstance(err, RemoteError):
                    failed(err)
                else:
                    outer.set_exception(err)

            try:
                inner = client.submit(
                    model, inputs, parameters=parameters, timeout_s=timeout_s, request_id=request_id
                )
            except RemoteError as err:
                failed(err)
                return
            inner.add_done_callback(done)

        attempt(0, None)
        return outer

    def max_inflight(self) -> int | None:
        """The first answering server's stream window (the servers of a pool are alike)."""
        for index in self.order():
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
        for index in self.order():
            try:
                return self.clients[index].model_metadata(model, timeout_s)
            except RemoteError as err:
                last = err
        assert last is not None
        raise last

    def close(self) -> None:
        self._retries.shutdown(wait=True)
        for client in self.clients:
            client.close()

    def __enter__(self) -> FailoverClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def order(self) -> list[int]:
        """Indices of the servers in the order the next request tries them: healthy ones in preference
        order, then the recently failed ones, oldest failure first."""
        now = self._clock()
        with self._lock:
            failed = {i: t for i, t in self._failed_at.items() if now - t < self.retry_after_s}
        healthy = [i for i in range(len(self.clients)) if i not in failed]
        return healthy + sorted(failed, key=failed.__getitem__)

    def _mark(self, index: int, *, failed: bool) -> None:
        with self._lock:
            if failed:
                self._failed_at[index] = self._clock()
            else:
                self._failed_at.pop(index, None)
