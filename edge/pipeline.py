"""Pipelined cooperative inference: up to W requests in flight, results in the order they came.

While request i's cut is on the wire or on the server, the device runs request i+1's head, so a
burst goes at the pace of its slowest stage (head, transfer or tail) instead of their sum. Each
request keeps its own deadline, and one whose call fails is finished on the device, alone.

Bounded: at most :attr:`Pipeline.window` requests are held, each with its cut tensors, and the
window is capped by what the server says one device may keep in flight.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from .cooperative import CooperativeRunner, InferenceResult, Ticket

__all__ = ["MAX_WINDOW", "Finished", "Pipeline", "pipelined"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_WINDOW = 64
"""The most requests a device keeps in flight, whatever it asks for."""


def effective_window(runner: CooperativeRunner, window: int) -> int:
    """The requests a pipeline of ``window`` really keeps in flight: at most :data:`MAX_WINDOW`, and at
    most what the server lets one device keep (its stream window, when it says)."""
    effective = min(window, MAX_WINDOW)
    server_cap = runner.max_inflight() if window > 1 else None
    if server_cap is not None and server_cap < effective:
        logger.info(
            "the server takes %d requests in flight per device; pipelining %d", server_cap, server_cap
        )
        effective = server_cap
    return effective


@dataclass(frozen=True, slots=True)
class Finished(Generic[T]):
    """One request out of the pipeline, with its ``tag``: its ``result``, or the ``error`` collecting it
    raised (a backend's own failure; a server's is a fallback result). Both None for a tag
    :meth:`Pipeline.hold` took: nothing was computed for it."""

    tag: T
    result: InferenceResult | None = None
    error: Exception | None = None


class Pipeline(Generic[T]):
    """Submits requests to ``runner`` and hands back their outcomes in submission order, each with
    the ``tag`` it came with. Not thread-safe: one thread submits and collects.

    A window of 1 is one request at a time, made on the calling thread (no hand-off); a window of
    W keeps up to W requests in flight while the next heads run.
    """

    def __init__(self, runner: CooperativeRunner, window: int) -> None:
        if window < 1:
            raise ValueError("a pipeline's window is at least 1")
        self.runner = runner
        self.window = effective_window(runner, window)
        self._held: deque[tuple[T, Ticket | None]] = deque()
        self._inflight = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def full(self) -> bool:
        return self._inflight >= self.window

    def put(self, inputs: Mapping[str, np.ndarray], tag: T, *, request_id: str = "") -> list[Finished[T]]:
        """Submit one request (its head runs now). Returns the outcomes collected to make room for it,
        and any others ready at the front, oldest first. A bad input raises here, and nothing is held."""
        out: list[Finished[T]] = []
        while self.full:
            out.append(self.pop())
        ticket = self.runner.submit(inputs, request_id=request_id, wait=self.window == 1)
        self._held.append((tag, ticket))
        self._inflight += 1
        out.extend(self.ready())
        return out

    def hold(self, tag: T) -> list[Finished[T]]:
        """A tag with nothing to compute (a message already refused), answered in its turn; returns
        what is ready at the front, as :meth:`put` does."""
        self._held.append((tag, None))
        return self.ready()

    def ready(self) -> list[Finished[T]]:
        """The outcomes at the front that are in already, without waiting."""
        out: list[Finished[T]] = []
        while self._held and (self._held[0][1] is None or self._held[0][1].ready()):
            out.append(self.pop())
        return out

    def pop(self) -> Finished[T]:
        """The oldest request's outcome, waiting for it if need be."""
        tag, ticket = self._held.popleft()
        if ticket is None:
            return Finished(tag)
        self._inflight -= 1
        try:
            return Finished(tag, self.runner.collect(ticket))
        except Exception as err:  # the caller decides what a failed request becomes
            return Finished(tag, error=err)

    def drain(self) -> list[Finished[T]]:
        """Every outcome still held, oldest first."""
        return [self.pop() for _ in range(len(self._held))]


def pipelined(
    runner: CooperativeRunner, inputs: Iterable[Mapping[str, np.ndarray]], window: int
) -> Iterator[InferenceResult]:
    """The results of ``inputs``, in order, with up to ``window`` in flight; a failure raises."""
    pipeline: Pipeline[None] = Pipeline(runner, window)

    def results(done: list[Finished[None]]) -> Iterator[InferenceResult]:
        for finished in done:
            if finished.error is not None:
                raise finished.error
            assert finished.result is not None
            yield finished.result

    for feeds in inputs:
        yield from results(pipeline.put(feeds, None))
    yield from results(pipeline.drain())
