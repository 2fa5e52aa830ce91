"""When a received sensor message may be acknowledged to the broker.

A message is acknowledged only after the result answering it has been confirmed by the
broker (its PUBACK). Until then the broker keeps it in the device's persistent session and
delivers it again after a reconnect or a crash, so nothing is lost.

MQTT packet ids belong to the session, not to the connection: after a reconnect with the
session present, the ids the daemon holds still name the same messages, and the broker's
redeliveries of them carry the same ids. When the broker has lost the session, the held ids
mean nothing any more; :meth:`AckLedger.new_session` forgets them, and results for those
messages are still published but never acknowledged.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["AckLedger", "Source"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Source:
    """A received message awaiting acknowledgement: its session and its MQTT packet id."""

    session: int
    mid: int


@dataclass(slots=True)
class _Waiting:
    message_id: str | None
    sources: list[Source] = field(default_factory=list)


class AckLedger:
    """Bookkeeping between arrivals, publishes and PUBACKs; thread-safe.

    The MQTT network thread reports arrivals (:meth:`receive`) and confirmations
    (:meth:`confirmed`); the worker reports what it published (:meth:`published`). Methods
    return the sources to acknowledge now; the caller sends those acks itself, so this
    class never calls into the MQTT client and its lock is never held across I/O.
    """

    def __init__(self, remember: int = 4096) -> None:
        self.remember = remember
        # _lock guards every attribute below.
        self._lock = threading.Lock()
        self._session = 0
        self._held: set[int] = set()
        """Packet ids received in this session and not yet acknowledged."""
        self._waiting: dict[int, _Waiting] = {}
        """Publish mid -> the sources to acknowledge when its PUBACK arrives."""
        self._early: set[int] = set()
        """PUBACKs that arrived before publish() returned the mid to the worker."""
        self._answered: OrderedDict[str, int | None] = OrderedDict()
        """Recently answered message ids -> the publish mid while unconfirmed, then None."""

    @property
    def session(self) -> int:
        with self._lock:
            return self._session

    def new_session(self) -> int:
        """The broker holds no session for us (first connection, or it lost it): held ids are void."""
        with self._lock:
            self._session += 1
            if self._held:
                logger.warning(
                    "broker lost the session: %d message(s) will be answered but not acknowledged",
                    len(self._held),
                )
            self._held.clear()
            return self._session

    def receive(self, mid: int) -> Source | None:
        """A message arrived; None when it is a redelivery of one still held (drop that copy)."""
        with self._lock:
            if mid in self._held:
                return None
            self._held.add(mid)
            return Source(self._session, mid)

    def release(self, source: Source) -> None:
        """Forget a message without acknowledging it (the broker will deliver it again)."""
        with self._lock:
            if source.session == self._session:
                self._held.discard(source.mid)

    def answered(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._answered

    def published(
        self, publish_mid: int, sources: Iterable[Source], message_id: str | None = None
    ) -> list[Source]:
        """paho accepted a QoS 1 publish; ``sources`` are acknowledged at its PUBACK.

        Other publishes (availability, stats) are reported too, with no sources, so that
        every PUBACK is accounted for. Returns sources to acknowledge now, when the PUBACK
        beat publish() back.
        """
        with self._lock:
            if message_id is not None:
                self._answered[message_id] = publish_mid
                self._answered.move_to_end(message_id)
                while len(self._answered) > self.remember:
                    self._answered.popitem(last=False)
            if publish_mid in self._early:
                self._early.discard(publish_mid)
                if message_id is not None:
                    self._answered[message_id] = None
                return self._ackable(sources)
            self._waiting[publish_mid] = _Waiting(message_id, list(sources))
            return []

    def confirmed(self, publish_mid: int) -> list[Source]:
        """The broker confirmed a publish (PUBACK); returns the sources to acknowledge."""
        with self._lock:
            waiting = self._waiting.pop(publish_mid, None)
            if waiting is None:
                self._early.add(publish_mid)
                return []
            if waiting.message_id is not None and self._answered.get(waiting.message_id) == publish_mid:
                self._answered[waiting.message_id] = None
            return self._ackable(waiting.sources)

    def duplicate(self, message_id: str, source: Source) -> list[Source]:
        """``message_id`` was answered already: acknowledge ``source`` with that answer."""
        with self._lock:
            publish_mid = self._answered.get(message_id)
            waiting = self._waiting.get(publish_mid) if publish_mid is not None else None
            if waiting is not None:
                waiting.sources.append(source)
                return []
            return self._ackable([source])

    def pending(self) -> int:
        """Results published whose sources still wait for a PUBACK."""
        with self._lock:
            return sum(1 for w in self._waiting.values() if w.sources)

    def _ackable(self, sources: Iterable[Source]) -> list[Source]:
        ready = []
        for source in sources:
            if source.session == self._session and source.mid in self._held:
                self._held.discard(source.mid)
                ready.append(source)
        return ready
