"""``edge-server``: serve every ``DIR/*.tflite`` over the Open Inference Protocol."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge import __version__
from edge.argtypes import (
    Parser,
    at_least,
    listen_port,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from edge.backends import BACKENDS
from edge.console import quiet_closed_stdout
from edge.cpu_latency import add_cpu_latency_arg, cpu_latency_hold
from edge.errors import EdgeError
from edge.systemd import notify, watchdog_interval

from .dataplane import DataPlane, largest_message, message_limit
from .grpc_service import EdgeServer, check_listen
from .metrics import ServerMetrics, serve_metrics
from .repository import ModelRepository
from .security import Security
from .settings import ServerSettings, default_workers, load_settings

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _default(name: str) -> Any:
    return ServerSettings.model_fields[name].default


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="edge-server",
        description="Serve whole models and their tails over the KServe v2 Open Inference Protocol (gRPC). "
        "Each MODELS/*.tflite is served under its file stem. A request with the int64 parameter split_point=K "
        "runs the tail of cut K; without it, the whole model. Flags override the --config file.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--config", type=Path, metavar="FILE.toml", help="settings file; its keys are the flags' names with _"
    )
    p.add_argument(
        "--models", type=Path, metavar="DIR", help="directory of .tflite files to serve (required)"
    )
    p.add_argument("--host", help=f"address to listen on (default: {_default('host')})")
    p.add_argument(
        "--port",
        type=listen_port,
        help=f"port to listen on, 0 for any free one (default: {_default('port')})",
    )
    p.add_argument(
        "--backend", choices=sorted(BACKENDS), help=f"inference backend (default: {_default('backend')})"
    )
    p.add_argument(
        "--threads", type=positive_int, help=f"interpreter threads per model (default: {_default('threads')})"
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        help="compute threads (default: one per core this process may use, here "
        f"{default_workers()}); a lone request on a short route computes on the event loop; 0 computes "
        "everything there, one request at a time",
    )
    p.add_argument(
        "--max-inflight",
        type=positive_int,
        help="requests admitted at once, waiting or running, before RESOURCE_EXHAUSTED "
        f"(default: {_default('max_inflight')})",
    )
    p.add_argument(
        "--max-inflight-per-device",
        type=positive_int,
        help="requests one device (its token's id, else its address) may have admitted at once "
        f"(default: {_default('max_inflight_per_device')})",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        help="run up to N requests for the same model and cut as one batch, each with its own outputs "
        f"(default: {_default('max_batch')}: off)",
    )
    p.add_argument(
        "--max-batch-delay-us",
        type=non_negative_int,
        metavar="US",
        help=f"how long a batch waits for more requests (default: {_default('max_batch_delay_us')})",
    )
    p.add_argument(
        "--max-inflight-bytes",
        type=positive_int,
        help="tensor bytes admitted at once, waiting or computing, before RESOURCE_EXHAUSTED "
        f"(default: {_default('max_inflight_bytes')})",
    )
    p.add_argument(
        "--cache-size",
        type=at_least(2),
        help=f"tails kept loaded per model, LRU (default: {_default('cache_size')})",
    )
    p.add_argument(
        "--max-model-bytes",
        type=positive_int,
        help=f"largest model file loaded; a larger one is skipped (default: {_default('max_model_bytes')})",
    )
    p.add_argument(
        "--max-message-bytes",
        type=positive_int,
        help=f"largest gRPC message accepted or sent (default: {_default('max_message_bytes')})",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        help=f"connections open at once; one past it is closed as it opens (default: {_default('max_connections')})",
    )
    p.add_argument(
        "--idle-timeout",
        dest="idle_timeout_s",
        type=positive_float,
        metavar="S",
        help=f"close a connection with no call for S seconds (default: {_default('idle_timeout_s'):g})",
    )
    p.add_argument(
        "--max-connection-age",
        dest="max_connection_age_s",
        type=positive_float,
        metavar="S",
        help="close every connection after S seconds, its calls getting 30 s more: held-open streams cannot "
        f"keep one for ever, and a revoked token ends on open streams (default: {_default('max_connection_age_s'):g})",
    )
    p.add_argument(
        "--grace",
        dest="grace_s",
        type=non_negative_float,
        help=f"seconds in-flight requests get at shutdown (default: {_default('grace_s'):g})",
    )
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA: clients must present a certificate it signed (mTLS), or the handshake fails",
    )
    p.add_argument(
        "--auth-tokens",
        type=Path,
        metavar="FILE",
        help="'DEVICE_ID TOKEN' lines (# comments); every call but health and server metadata then needs "
        "'authorization: Bearer TOKEN'. Certificates and tokens are read again on SIGHUP",
    )
    p.add_argument(
        "--watch",
        dest="watch_s",
        type=non_negative_float,
        metavar="S",
        help="look at the model directory every S seconds; 0: only at start and on SIGHUP "
        f"(default: {_default('watch_s'):g})",
    )
    p.add_argument(
        "--model-control",
        action="store_true",
        help="allow RepositoryModelLoad/Unload (OIP repository extension); RepositoryIndex is always served",
    )
    p.add_argument(
        "--metrics-port",
        type=listen_port,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs the server extra)",
    )
    p.add_argument(
        "--metrics-host",
        metavar="HOST",
        help=f"where the metrics endpoint listens (default: {_default('metrics_host')}: it has no TLS and no token)",
    )
    p.add_argument(
        "--check", action="store_true", help="validate the settings and files, print them, exit 0 or 2"
    )
    add_cpu_latency_arg(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return p


def _flag_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The settings whose flag is named otherwise (``--grace`` sets ``grace_s``): a file may use either name."""
    keys = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            name = action.option_strings[-1].lstrip("-").replace("-", "_")
            if name != action.dest:
                keys[name] = action.dest
    return keys


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerSettings:
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "debug", "check")}
    config = getattr(args, "config", None)
    if config is None and "models" not in flags:
        raise EdgeError('--models DIR is required (or a --config file with models = "DIR")')
    return load_settings(flags, config, aliases=_flag_keys(parser))


async def serve(settings: ServerSettings) -> None:
    with cpu_latency_hold(settings.cpu_latency_us):
        await _serve(settings)


def check(settings: ServerSettings) -> None:
    """What start needs, short of listening: the TLS and token files (kinds, pair, expiry), and a model
    directory with a model it can serve (each file is loaded, as at start)."""
    security_from(settings)
    repository_from(settings, replicas=1).close()


def repository_from(settings: ServerSettings, *, replicas: int) -> ModelRepository:
    """The model directory the settings name, loaded (ConfigError when nothing in it can be served)."""
    return ModelRepository.from_directory(
        settings.models,
        backend=settings.backend,
        threads=settings.threads,
        cache_size=settings.cache_size,
        max_model_bytes=settings.max_model_bytes,
        replicas=replicas,
    )


def security_from(settings: ServerSettings) -> Security:
    return Security(
        cert=settings.tls_cert,
        key=settings.tls_key,
        client_ca=settings.tls_client_ca,
        tokens=settings.auth_tokens,
    )


async def _serve(settings: ServerSettings) -> None:
    check_listen(settings.host, settings.port)  # in milliseconds, before the models take seconds to load
    security = security_from(settings)
    metrics = ServerMetrics() if settings.metrics_port is not None else None
    if metrics is not None:
        security.on_refused = lambda reason: metrics.refused.labels(reason).inc()
    # The metrics endpoint binds before anything else starts: a port in use fails with nothing to undo.
    http = None
    if metrics is not None and settings.metrics_port is not None:
        http = serve_metrics(metrics, settings.metrics_host, settings.metrics_port)
        print(
            f"edge-server: metrics on http://{settings.metrics_host}:{http.server_port}/metrics", flush=True
        )
    try:
        await _serve_models(settings, security, metrics)
    finally:
        if http is not None:
            http.shutdown()


async def _serve_models(settings: ServerSettings, security: Security, metrics: ServerMetrics | None) -> None:
    # An interpreter per compute thread: they run at once.
    repository = repository_from(settings, replicas=max(1, settings.workers))
    # The bound gRPC applies before parsing, sized from the models served at start (within
    # --max-message-bytes); one loaded later that needs more is said in the log.
    limit = message_limit([m.graph for m in repository], settings.max_message_bytes)
    sized = {m.graph.sha256 for m in repository}  # models whose messages were checked against it
    logger.info(
        "edge-server: messages bounded at %s bytes (the largest the served models take, twice)", f"{limit:,}"
    )
    try:
        server = EdgeServer(
            DataPlane(
                repository,
                max_inflight=settings.max_inflight,
                max_inflight_bytes=settings.max_inflight_bytes,
                model_control=settings.model_control,
            ),
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            max_message_bytes=limit,
            idle_timeout_s=settings.idle_timeout_s,
            max_connection_age_s=settings.max_connection_age_s,
            max_connections=settings.max_connections,
            credentials=security.credentials(),
            interceptors=security.interceptors(),
            metrics=metrics,
            max_inflight_per_device=settings.max_inflight_per_device,
            identify=security.identify,
            max_batch=settings.max_batch,
            max_batch_delay_us=settings.max_batch_delay_us,
        )
        await server.start()
        print(f"edge-server: serving {', '.join(m.name for m in repository)} on {server.address}", flush=True)
        notify("READY=1")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        dataplane = server.dataplane

        reloads: set[asyncio.Task[object]] = set()  # kept until done, as asyncio asks

        def reload() -> None:
            security.reload()
            task = loop.create_task(asyncio.to_thread(dataplane.refresh))
            reloads.add(task)
            task.add_done_callback(reloads.discard)
            task.add_done_callback(lambda _: _warn_oversized(dataplane, limit, sized))

        loop.add_signal_handler(signal.SIGHUP, reload)
        watcher = asyncio.create_task(_watch(dataplane, settings.watch_s, stop, limit, sized))
        watchdog = asyncio.create_task(_watchdog(stop))
        await stop.wait()
        notify("STOPPING=1")
        logger.info(
            "edge-server: stopping (health NOT_SERVING; in-flight requests get %gs)", settings.grace_s
        )
        stopping = time.perf_counter()
        watchdog.cancel()
        watcher.cancel()
        await server.stop(settings.grace_s)
        logger.info("edge-server: stopped after %.2fs", time.perf_counter() - stopping)
    finally:
        repository.close()


async def _watch(
    dataplane: DataPlane, every_s: float, stop: asyncio.Event, limit: int, sized: set[str]
) -> None:
    while every_s > 0 and not stop.is_set():
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(dataplane.refresh)
        except Exception:  # the watch must go on; what failed is logged
            logger.exception("looking at the model directory failed")
        _warn_oversized(dataplane, limit, sized)


def _warn_oversized(dataplane: DataPlane, limit: int, sized: set[str]) -> None:
    """Say once of each model loaded since the start whose largest message passes the bound set then;
    each model is sized once (``sized`` holds those that were)."""
    for model in dataplane.repository:
        if model.graph.sha256 in sized:
            continue
        sized.add(model.graph.sha256)
        need = largest_message(model.graph)
        if need > limit:
            logger.warning(
                "%s needs messages of up to %s bytes, past the %s set at start: restart edge-server to serve "
                "its largest cuts (until then they are refused, and devices finish them locally)",
                model.name, f"{need:,}", f"{limit:,}",
            )  # fmt: skip


async def _watchdog(stop: asyncio.Event) -> None:
    interval = watchdog_interval()
    while interval and not stop.is_set():
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = settings_from(args, parser)
        if getattr(args, "check", False):
            check(settings)
            print(settings.model_dump_json(indent=2))
            return 0
        asyncio.run(serve(settings))
    except EdgeError as err:
        if debug:
            raise
        print(f"edge-server: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if debug:
            raise
        print(f"edge-server: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return quiet_closed_stdout()
    except KeyboardInterrupt:
        return 130
    return 0
