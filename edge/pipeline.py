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
from typing import Generic, TypeVar

import numpy as np

from .cooperative import CooperativeRunner, InferenceResult, Ticket

__all__ = ["MAX_WINDOW", "Pipeline", "pipelined"]

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


class Pipeline(Generic[T]):
    """Submits requests to ``runner`` and hands back their results in submission order, each with
    the ``tag`` it came with. Not thread-safe: one thread submits and collects."""

    def __init__(self, runner: CooperativeRunner, window: int) -> None:
        if window < 1:
            raise ValueError("a pipeline's window is at least 1")
        self.runner = runner
        self.window = effective_window(runner, window)
        self._held: deque[tuple[T, Ticket]] = deque()

    def __len__(self) -> int:
        return len(self._held)

    @property
    def full(self) -> bool:
        return len(self._held) >= self.window

    def put(
        self, inputs: Mapping[str, np.ndarray], tag: T, *, request_id: str = ""
    ) -> list[tuple[T, InferenceResult]]:
        """Submit one request (its head runs now). Returns the results collected to make room for it,
        and any others ready at the front, oldest first. A bad input raises here, and nothing is held."""
        out: list[tuple[T, InferenceResult]] = []
        while self.full:
            out.append(self.pop())
        self._held.append((tag, self.runner.submit(inputs, request_id=request_id)))
        out.extend(self.ready())
        return out

    def ready(self) -> list[tuple[T, InferenceResult]]:
        """The results at the front that are in already, without waiting."""
        out: list[tuple[T, InferenceResult]] = []
        while self._held and self._held[0][1].ready():
            out.append(self.pop())
        return out

    def pop(self) -> tuple[T, InferenceResult]:
        """The oldest request's result, waiting for it if need be."""
        tag, ticket = self._held.popleft()
        return tag, self.runner.collect(ticket)

    def drain(self) -> list[tuple[T, InferenceResult]]:
        """Every result still held, oldest first."""
        return [self.pop() for _ in range(len(self._held))]


def pipelined(
    runner: CooperativeRunner, inputs: Iterable[Mapping[str, np.ndarray]], window: int
) -> Iterator[InferenceResult]:
    """The results of ``inputs``, in order, with up to ``window`` in flight."""
    pipeline: Pipeline[None] = Pipeline(runner, window)
    for feeds in inputs:
        for _, result in pipeline.put(feeds, None):
            yield result
    for _, result in pipeline.drain():
        yield result
