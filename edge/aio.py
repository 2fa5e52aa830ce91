"""Retiring the private event loops that grpc.aio calls run on.

gRPC's asyncio completion queue is shared by every loop in the process; an event that
finishes a call made on some loop is handed to that loop with ``call_soon_threadsafe``, and
may come after the call's owner has moved on (a cancelled stream, a server's last
request). Handed to a closed loop it fails with "Event loop is closed". So a loop that is
done with is parked, not closed: late events land in its queue and are dropped with it.
The oldest parked loop is closed when more than :data:`MAX_PARKED` are parked (by then it
has long been quiet), and the rest when the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections import deque

__all__ = ["MAX_PARKED", "finish_tasks", "retire"]

MAX_PARKED = 32

# Guards _parked.
_lock = threading.Lock()
_parked: deque[asyncio.AbstractEventLoop] = deque()


async def finish_tasks(timeout_s: float = 1.0) -> None:
    """Wait, at most ``timeout_s``, for the running loop's other tasks (gRPC's per-call status
    tasks among them) to end: they are outstanding work, not something to wait a fixed time for."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)


def retire(loop: asyncio.AbstractEventLoop) -> None:
    """Park ``loop`` (stopped, not running); close the oldest parked one past the limit."""
    with _lock:
        _parked.append(loop)
        old = _parked.popleft() if len(_parked) > MAX_PARKED else None
    if old is not None and not old.is_closed():
        old.close()


@atexit.register
def _close_all() -> None:
    with _lock:
        loops = list(_parked)
        _parked.clear()
    for loop in loops:
        if not loop.is_closed():
            loop.close()
