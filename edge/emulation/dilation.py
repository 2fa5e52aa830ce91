"""A slower device by time dilation: every device-side inference takes ``factor`` times as long.

After each inference the runner sleeps for (factor - 1) times the inference's measured
duration, so a head that took 2 ms on this machine returns after 8 ms at factor 4. Only the
model's compute is dilated; the device's gRPC stack and Python overhead run at this machine's
speed. Used because a CPU quota (cgroup ``cpu.cfs_quota_us``) throttles in periods of
milliseconds: a short, bursty inference that starts with an unused quota runs at full speed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

from ..graph import ModelGraph
from ..runner import HeadResult, ModelRunner, Tensors

__all__ = ["DilatedRunner"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DilatedRunner(ModelRunner):
    """A :class:`ModelRunner` whose every run takes ``factor`` times its real duration."""

    def __init__(self, graph: ModelGraph, *, factor: float, **kwargs: object) -> None:
        if factor < 1.0:
            raise ValueError(f"a dilation factor is at least 1, not {factor}")
        super().__init__(graph, **kwargs)  # type: ignore[arg-type]
        self.factor = factor
        # Only the outermost call sleeps: run_head(N) runs the whole model through run().
        self._depth = threading.local()

    @property
    def profile_label(self) -> str:
        """Keeps this emulated device's profile apart from the real one's in the cache."""
        return f"dilated{self.factor:g}x"

    def run(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        return self._dilated(lambda: super(DilatedRunner, self).run(inputs))

    def run_head(self, k: int, inputs: Mapping[str, np.ndarray]) -> HeadResult:
        return self._dilated(lambda: super(DilatedRunner, self).run_head(k, inputs))

    def run_tail(self, k: int, cut_tensors: Mapping[str, np.ndarray]) -> Tensors:
        return self._dilated(lambda: super(DilatedRunner, self).run_tail(k, cut_tensors))

    def _dilated(self, call: Callable[[], T]) -> T:
        if getattr(self._depth, "active", False):
            return call()
        self._depth.active = True
        started = time.perf_counter()
        try:
            return call()
        finally:
            self._depth.active = False
            elapsed = time.perf_counter() - started
            _sleep_until(started + elapsed * self.factor)


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
