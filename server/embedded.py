"""Run an edge server on a background thread, for ``edge demo``, benchmarks and tests."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from edge.aio import finish_tasks, retire
from edge.backends import DEFAULT_BACKEND

from .dataplane import DataPlane
from .grpc_service import EdgeServer
from .repository import ModelRepository
from .settings import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_STACK

__all__ = ["BackgroundServer"]

logger = logging.getLogger(__name__)


class BackgroundServer:
    """An :class:`EdgeServer` on its own event loop and thread; a context manager.

    >>> with BackgroundServer.from_files([path]) as server:
    ...     client = TailClient(server.address)
    """

    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.repository = server.dataplane.repository
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edge-server", daemon=True)

    @classmethod
    def from_files(
        cls,
        paths: list[Path],
        *,
        backend: str = DEFAULT_BACKEND,
        threads: int = 1,
        port: int = 0,
        workers: int = 0,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_stack: int = DEFAULT_MAX_STACK,
        **server_options: Any,
    ) -> BackgroundServer:
        """A server of ``paths`` on loopback; ``server_options`` go to :class:`EdgeServer`."""
        repository = ModelRepository.from_files(
            paths, backend=backend, threads=threads, replicas=max(1, workers)
        )
        dataplane = DataPlane(repository, max_inflight=max_inflight, max_stack=max_stack)
        return cls(EdgeServer(dataplane, port=port, workers=workers, **server_options))

    @property
    def address(self) -> str:
        return self.server.address

    def start(self, timeout: float = 10.0) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout)
        return self.address

    def stop(self, grace: float = 1.0, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(grace), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            retire(self._loop)  # not closed: gRPC may still hand it a finished call's last events
            self.repository.close()

    async def _stop(self, grace: float) -> None:
        await self.server.stop(grace)
        await finish_tasks()

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
