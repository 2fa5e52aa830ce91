"""``edge-server``: serve every ``DIR/*.tflite`` over the Open Inference Protocol."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from edge.backends import BACKENDS, DEFAULT_BACKEND
from edge.cpu_latency import add_cpu_latency_arg, cpu_latency_hold
from edge.errors import EdgeError
from edge.systemd import notify, watchdog_interval

from .dataplane import DataPlane
from .grpc_service import DEFAULT_MAX_MESSAGE_BYTES, EdgeServer
from .repository import ModelRepository

__all__ = ["main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-server",
        description="Serve whole models and their tails over the KServe v2 Open Inference Protocol (gRPC). "
        "Each MODELS/*.tflite is served under its file stem. A request with the int64 parameter split_point=K "
        "runs the tail of cut K; without it, the whole model.",
    )
    p.add_argument("--models", required=True, metavar="DIR", help="directory of .tflite files to serve")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument(
        "--port", type=int, default=8001, help="port to listen on, 0 for any (default: %(default)s)"
    )
    p.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND, help="inference backend")
    p.add_argument(
        "--threads", type=int, default=1, help="interpreter threads per model (default: %(default)s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="compute threads; 0 computes on the event loop, the lowest latency per request (default: %(default)s)",
    )
    p.add_argument(
        "--max-inflight", type=int, default=64, help="requests admitted at once before RESOURCE_EXHAUSTED"
    )
    p.add_argument("--cache-size", type=int, default=16, help="tails kept loaded per model (LRU)")
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC message accepted or sent (default: %(default)s)",
    )
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight requests get at shutdown")
    add_cpu_latency_arg(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return p


async def serve(args: argparse.Namespace) -> None:
    with cpu_latency_hold(args.cpu_latency_us):
        await _serve(args)


async def _serve(args: argparse.Namespace) -> None:
    repository = ModelRepository.from_directory(
        args.models, backend=args.backend, threads=args.threads, cache_size=args.cache_size
    )
    server = EdgeServer(
        DataPlane(repository, max_inflight=args.max_inflight),
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_message_bytes=args.max_message_bytes,
    )
    await server.start()
    print(f"edge-server: serving {', '.join(m.name for m in repository)} on {server.address}", flush=True)
    notify("READY=1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(_watchdog(stop))
    await stop.wait()
    notify("STOPPING=1")
    watchdog.cancel()
    await server.stop(args.grace)
    repository.close()


async def _watchdog(stop: asyncio.Event) -> None:
    interval = watchdog_interval()
    while interval and not stop.is_set():
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(args))
    except EdgeError as err:
        if args.debug:
            raise
        print(f"edge-server: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"edge-server: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
