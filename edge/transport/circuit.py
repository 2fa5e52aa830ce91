"""Whether to offload now: one circuit per transport, shared by the runner and the ``auto`` policy.

A failure the link or the server is to blame for (a missed deadline, UNAVAILABLE) trips the
circuit. While it is open, requests run on the device at once instead of each waiting out its
deadline, and a background thread probes the server every ``retry_after_s``; the first probe
that succeeds closes the circuit. No request ever waits for a probe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import EdgeError

__all__ = ["Circuit"]

logger = logging.getLogger(__name__)


class Circuit:
    """Open (run locally, probe in the background) or closed (offload).

    ``probe`` raises an :class:`~edge.errors.EdgeError` while the server is not back.
    """

    def __init__(
        self,
        probe: Callable[[], object],
        *,
        retry_after_s: float = 5.0,
        name: str = "edge server",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self.retry_after_s = retry_after_s
        self.name = name
        self._clock = clock
        # Guards _opened_at, _reason and _thread; never held while probing.
        self._lock = threading.Lock()
        self._opened_at: float | None = None
        self._reason = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def available(self) -> bool:
        """True while closed: send requests to the server."""
        with self._lock:
            return self._opened_at is None

    @property
    def reason(self) -> str:
        """Why it is open, and for how long; empty when closed."""
        with self._lock:
            if self._opened_at is None:
                return ""
            return f"{self.name} down for {self._clock() - self._opened_at:.1f}s ({self._reason})"

    def trip(self, reason: str) -> None:
        """Open the circuit (if it is not) and probe in the background until the server is back."""
        with self._lock:
            if self._opened_at is None:
                self._opened_at = self._clock()
                self._reason = reason[:300]
                logger.warning(
                    "%s failed (%s): running locally, probing it every %gs",
                    self.name,
                    reason[:300],
                    self.retry_after_s,
                )
            if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._probing, name="edge-circuit", daemon=True)
            self._thread.start()

    def probe_now(self) -> bool:
        """One probe in the calling thread; closes the circuit if it succeeds."""
        try:
            self._probe()
        except EdgeError as err:
            logger.debug("%s still down: %s", self.name, err)
            return False
        with self._lock:
            was_open = self._opened_at is not None
            self._opened_at = None
        if was_open:
            logger.info("%s is back", self.name)
        return True

    def close(self) -> None:
        """Stop probing."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.retry_after_s + 5.0)

    def _probing(self) -> None:
        while not self._stop.wait(self.retry_after_s):
            if self.available() or self.probe_now():
                return
