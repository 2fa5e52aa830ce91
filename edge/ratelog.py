"""Log lines that repeat, bounded: the first of a kind at once, then at most one a minute, counting the
rest. A flood of refused calls wrote 122 bytes of log each (725 MB an hour from one client), and a
device whose model differed from the server's logged an error per request (2,547 in 2 s)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]

MAX_KINDS = 256
"""Kinds of line remembered at once; past that, the oldest is forgotten (and may log again)."""


class RateLimitedLog:
    """``log(level, kind, message, *args)``: the first line of each ``kind`` now, then one per
    ``interval_s`` with how many were held back. Thread-safe."""

    def __init__(
        self, logger: logging.Logger, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        # Guards _kinds: kind -> (when it last logged, lines held back since).
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[float, int]] = {}

    def log(
        self, level: int, kind: str, message: str, *args: object, exc_info: BaseException | None = None
    ) -> bool:
        """Log it, or count it; True when it was written."""
        now = self._clock()
        with self._lock:
            last, held = self._kinds.get(kind, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._kinds[kind] = (last, held + 1)
                return False
            self._kinds.pop(kind, None)
            self._kinds[kind] = (now, 0)
            while len(self._kinds) > MAX_KINDS:
                self._kinds.pop(next(iter(self._kinds)))
        if held:
            message = f"{message} ({held:,} more like it in the last {self.interval_s:g} s, not logged)"
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True
