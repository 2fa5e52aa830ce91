"""Compute turns shared fairly between devices: one device's backlog never queues another's request.

:class:`FairTurns` is a semaphore whose waiters queue per device, and a freed turn goes to the
devices in round robin: a device that has sent 50 requests waits its turn like one that sent
one. A stacked request computes a part per turn, a part of n samples charged n turns: its device
then lets the others go first n - 1 times while they wait. :class:`DeviceLimit` bounds what one device may have in flight at once. Both run on the
event loop only (no locks), and hold nothing for a device with nothing in flight. A device is
its token's DEVICE_ID when the server checks tokens, else its address (:func:`peer_host`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .errors import ServerOverloadedError

__all__ = ["DeviceLimit", "FairTurns", "peer_host"]


MAX_OWING = 4096
"""Devices whose owed turns are remembered at once."""


class FairTurns:
    """At most ``capacity`` turns held at once; waiters are served device by device, in turn."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.held = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._owed: dict[str, int] = {}
        """Turns a device owes the others (:meth:`charge`), taken while others waited; dropped once
        it is the only device waiting, or has nothing waiting."""

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @contextlib.asynccontextmanager
    async def turn(self, device: str) -> AsyncIterator[None]:
        await self.acquire(device)
        try:
            yield
        finally:
            self.release()

    def try_acquire(self) -> bool:
        """Take a turn now if one is free and nobody waits (no await: the hot path)."""
        if self.held < self.capacity and not self._waiting:
            self.held += 1
            return True
        return False

    async def acquire(self, device: str, *, first: bool = False) -> None:
        """Wait for a turn; ``first`` goes ahead of the device's other waiting requests (the next part
        of work it already began)."""
        if self.try_acquire():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(device, deque())
        if first:
            queue.appendleft(future)
        else:
            queue.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the turn was handed over as the caller went away: pass it on
            else:
                waiting = self._waiting.get(device)
                if waiting is not None:
                    with contextlib.suppress(ValueError):
                        waiting.remove(future)
                    if not waiting:
                        del self._waiting[device]
            raise

    def others_wait(self, device: str) -> bool:
        """Whether a device other than ``device`` waits for a turn. Safe from a compute thread: a
        length and a key lookup, each atomic."""
        waiting = self._waiting
        return len(waiting) > (device in waiting)

    def charge(self, device: str, turns: int) -> None:
        """``device`` took ``turns`` more turns' worth of compute with the one it holds (a stacked
        request): while others wait, it lets them go first that many times. With nobody else
        waiting it took no one's turn, and owes nothing: a debt never builds up while a device is
        alone, to starve it once another comes."""
        if turns <= 0 or not any(other != device for other in self._waiting):
            return
        if len(self._owed) >= MAX_OWING and device not in self._owed:
            self._owed.clear()  # bounded: forgiving every debt is fair enough
        self._owed[device] = self._owed.get(device, 0) + turns

    def release(self) -> None:
        """Hand the turn to the longest-waiting device's oldest request, or free it. A device that
        owes turns is passed over, once per turn owed, while another device waits."""
        while self._waiting:
            device, queue = next(iter(self._waiting.items()))
            owed = self._owed.get(device, 0)
            if owed and len(self._waiting) > 1:
                if owed > 1:
                    self._owed[device] = owed - 1
                else:
                    del self._owed[device]
                self._waiting.move_to_end(device)
                continue
            if owed:
                del self._owed[device]  # nobody else waits: it owes no one present
            future = queue.popleft()
            if queue:
                self._waiting.move_to_end(device)  # its next request waits for the others' turns
            else:
                del self._waiting[device]
                self._owed.pop(device, None)  # nothing of it waits: it owes nobody
            if not future.done():
                future.set_result(None)  # the turn passes to it: held stays the same
                return
        self.held -= 1


class DeviceLimit:
    """At most ``per_device`` requests in flight for one device; past it, ServerOverloadedError."""

    def __init__(self, per_device: int) -> None:
        self.per_device = per_device
        self._inflight: dict[str, int] = {}

    def acquire(self, device: str) -> None:
        """Count one more request of ``device``; ServerOverloadedError past its limit."""
        count = self._inflight.get(device, 0)
        if count >= self.per_device:
            raise ServerOverloadedError(
                f"this device has {count} requests in flight, the limit per device is {self.per_device}"
            )
        self._inflight[device] = count + 1

    def release(self, device: str) -> None:
        left = self._inflight[device] - 1
        if left:
            self._inflight[device] = left
        else:
            del self._inflight[device]

    @contextlib.contextmanager
    def held(self, device: str) -> Iterator[None]:
        self.acquire(device)
        try:
            yield
        finally:
            self.release(device)

    def __len__(self) -> int:
        return len(self._inflight)


def peer_host(context: Any) -> str:
    """A device without a token is known by its address: ``ipv4:10.0.0.7:51234`` is ``10.0.0.7``."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else rest
    return host[:80] or "unknown"
