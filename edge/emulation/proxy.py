"""A TCP proxy that delays every byte by a fixed time in each direction: RTT/2 each way.

Each connection has two directions, and each direction a reader and a writer joined by a
FIFO queue of (release time, chunk). The reader stamps chunks as they arrive and keeps
reading; the writer sends each chunk when its time comes. So bytes keep their order, a
large transfer is delayed once rather than once per chunk, and the delay never throttles
throughput (bandwidth is the shaper's business, not the proxy's).

The writer never blocks the event loop (a blocked loop stops the reader, and chunks read
late are released late). asyncio's default epoll loop rounds timers up to whole
milliseconds, so the command-line proxy runs on a ``select()`` loop, whose timers are finer:
chunks leave about 0.2 ms after their release time.

Run as ``python -m edge.emulation.proxy --listen HOST:PORT --upstream HOST:PORT --delay-ms D``;
it prints ``listening on HOST:PORT`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import selectors
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["DelayProxy", "DirectionStats", "main"]

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024


@dataclass(slots=True)
class DirectionStats:
    """What one direction of the proxy has carried, over all connections."""

    chunks: int = 0
    bytes: int = 0
    late_s: list[float] = field(default_factory=list)
    """How late each chunk left, past its release time (the last 1000)."""


class DelayProxy:
    """Forwards ``listen`` to ``upstream`` with ``delay_s`` added in each direction."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], delay_s: float) -> None:
        self.listen = listen
        self.upstream = upstream
        self.delay_s = max(0.0, delay_s)
        self.up = DirectionStats()
        self.down = DirectionStats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        logger.info(
            "delay proxy %s:%d -> %s:%d, %.2f ms each way", *self.listen, *self.upstream, self.delay_s * 1e3
        )
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except OSError as err:
            logger.warning("upstream %s:%d refused: %s", *self.upstream, err)
            client_w.close()
            return
        try:
            await asyncio.gather(
                self._direction(client_r, upstream_w, self.up),
                self._direction(upstream_r, client_w, self.down),
            )
        except (ConnectionError, OSError) as err:
            logger.debug("connection ended: %s", err)
        except asyncio.CancelledError:
            pass  # close(): the handler ends quietly, as the stream machinery expects of it
        finally:
            for w in (client_w, upstream_w):
                w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _direction(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: DirectionStats
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while True:
                data = await reader.read(_CHUNK)
                queue.put_nowait((time.perf_counter() + self.delay_s, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                await _sleep_until(due)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                stats.chunks += 1
                stats.bytes += len(data)
                stats.late_s.append(time.perf_counter() - due)
                del stats.late_s[:-1000]
                await writer.drain()

        reading = asyncio.ensure_future(read())
        try:
            await write()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await reading


async def _sleep_until(due: float) -> None:
    remaining = due - time.perf_counter()
    if remaining > 0:
        await asyncio.sleep(remaining)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> None:
    proxy = DelayProxy(args.listen, args.upstream, args.delay_ms / 1000.0)
    port = await proxy.start()
    print(f"listening on {args.listen[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.emulation.proxy", description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT", help="where to accept")
    p.add_argument("--upstream", type=_address, required=True, metavar="HOST:PORT", help="where to forward")
    p.add_argument("--delay-ms", type=float, required=True, help="delay added in each direction (RTT/2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(_serve(args))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
