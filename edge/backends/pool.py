"""Several interpreters of one model, so that threads can run it at once.

An interpreter runs one request at a time (its tensors are shared between set, invoke and get),
and LiteRT releases the GIL inside ``invoke``: two threads on two interpreters of the same half
ran MobileNetV2 at 1.73x one thread's rate on this 2-core machine. A pool hands each run an idle
interpreter, making another (up to ``size``) when all are busy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import ClassVar

import numpy as np

from .base import Backend

__all__ = ["ReplicaPool"]


class ReplicaPool(Backend):
    """Up to ``size`` copies of ``first``, the later ones made by ``make`` when needed."""

    key: ClassVar[str] = "replicas"

    def __init__(self, first: Backend, make: Callable[[], Backend], size: int) -> None:
        self.inputs, self.outputs = first.inputs, first.outputs
        self.size = max(1, size)
        self._make = make
        # Guards _idle and _count; a run never holds it while computing.
        self._ready = threading.Condition()
        self._idle: list[Backend] = [first]
        self._count = 1
        self._closed = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        backend = self._take()
        try:
            return backend.run(feeds)
        finally:
            with self._ready:
                if self._closed:
                    backend.close()
                else:
                    self._idle.append(backend)
                    self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            idle, self._idle = self._idle, []
        for backend in idle:
            backend.close()

    def _take(self) -> Backend:
        with self._ready:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._count < self.size:
                    self._count += 1
                    break
                self._ready.wait()
        try:
            return self._make()  # built outside the lock: it takes milliseconds
        except BaseException:
            with self._ready:
                self._count -= 1
                self._ready.notify()
            raise
