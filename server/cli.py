"""``edge-server``: serve every ``DIR/*.tflite`` over the Open Inference Protocol."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic.fields import FieldInfo

from edge import __version__
from edge.address import format_address
from edge.argtypes import Parser, at_least, listen_port, non_negative_float, positive_float
from edge.console import quiet_closed_stdout
from edge.cpu_latency import cpu_latency_hold
from edge.errors import EdgeError
from edge.systemd import notify, watchdog_interval

from .dataplane import DataPlane, largest_message, message_limit
from .errors import ListenError
from .grpc_service import EdgeServer, check_listen
from .metrics import REFRESH_S, ServerMetrics, serve_metrics, serve_multiprocess
from .repository import ModelRepository
from .security import Security
from .settings import ServerSettings, load_settings

__all__ = ["main"]

logger = logging.getLogger(__name__)


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
    add_settings_flags(p)
    p.add_argument(
        "--check", action="store_true", help="validate the settings and files, print them, exit 0 or 2"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return p


_METAVARS = {"models": "DIR", "metrics_port": "PORT", "metrics_host": "HOST", "host": "HOST", "port": "PORT"}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ServerSettings` field, with its description, bounds and default: the
    settings are said once. A field in seconds (``grace_s``) is the flag ``--grace S``."""
    for name, field in ServerSettings.model_fields.items():
        flag = name[: -len("_s")] if name.endswith("_s") else name
        kind, optional = _kind(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "help": _help(name, field, optional)}
        if kind is bool:
            kwargs["action"] = "store_true"
        elif get_origin(kind) is Literal:
            kwargs["choices"] = get_args(kind)
        else:
            kwargs["type"] = _parser_of(name, kind, field.metadata)
            metavar = _METAVARS.get(name) or ("S" if name.endswith("_s") else None)
            metavar = metavar or ("US" if name.endswith("_us") else "FILE" if kind is Path else None)
            metavar = metavar or ("N" if kind is int else None)
            if metavar:
                kwargs["metavar"] = metavar
        parser.add_argument("--" + flag.replace("_", "-"), **kwargs)


def _kind(annotation: Any) -> tuple[Any, bool]:
    """The field's type, and whether None is allowed (``int | None`` is int, optional)."""
    args = get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def _parser_of(name: str, kind: Any, metadata: list[Any]) -> Callable[[str], Any]:
    """The argparse type: the field's own lower bound, so a bad value is one usage line (pydantic then
    checks the upper bounds)."""
    if name.endswith("port"):
        return listen_port
    if kind is int:
        low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge) and isinstance(m.ge, int)), 0)
        return at_least(low)
    if kind is float:
        above = any(isinstance(m, annotated_types.Gt) for m in metadata)
        return positive_float if above else non_negative_float
    return Path if kind is Path else str


def _help(name: str, field: FieldInfo, optional: bool) -> str:
    text = (field.description or "").rstrip(".")
    if field.is_required():
        return f"{text} (required, here or in --config)"
    if field.default_factory is not None:
        return f"{text} (default here: {field.default_factory()})"  # type: ignore[call-arg]
    if field.default is None or field.default is False:
        return text if optional or field.default is False else f"{text} (default: unset)"
    default = field.default
    shown = (
        f"{default:g}"
        if isinstance(default, float)
        else f"{default:,}"
        if isinstance(default, int)
        else default
    )
    return f"{text} (default: {shown})"


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


async def serve(
    settings: ServerSettings,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
    metrics_endpoint: bool = True,
) -> None:
    """Serve until SIGTERM or SIGINT. ``metrics_endpoint`` False: one of ``--processes``, whose
    metrics the supervisor serves (this process writes them to its multiprocess directory)."""
    with cpu_latency_hold(settings.cpu_latency_us):
        if not reuse_port:  # in milliseconds, before the models take seconds to load
            check_listen(settings.host, settings.port)
        security = security_from(settings)
        metrics = (
            ServerMetrics(multiprocess=not metrics_endpoint) if settings.metrics_port is not None else None
        )
        if metrics is not None:
            security.on_refused = lambda reason: metrics.refused.labels(reason).inc()
        # The metrics endpoint binds before anything else starts: a port in use fails with nothing to undo.
        http = None
        if metrics is not None and settings.metrics_port is not None and metrics_endpoint:
            http = serve_metrics(metrics, settings.metrics_host, settings.metrics_port)
            print(
                f"edge-server: metrics on http://{settings.metrics_host}:{http.server_port}/metrics",
                flush=True,
            )
        refresher = (
            asyncio.create_task(_refresh(metrics)) if metrics is not None and metrics.multiprocess else None
        )
        try:
            await _serve_models(settings, security, metrics, reuse_port=reuse_port, on_ready=on_ready)
        finally:
            if http is not None:
                http.shutdown()
            if refresher is not None:
                refresher.cancel()


async def _refresh(metrics: ServerMetrics) -> None:
    """One of ``--processes``: write what a scrape reads live, every REFRESH_S."""
    while True:
        metrics.refresh()
        await asyncio.sleep(REFRESH_S)


async def _serve_models(
    settings: ServerSettings,
    security: Security,
    metrics: ServerMetrics | None,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
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
                max_stack=settings.max_stack,
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
            reuse_port=reuse_port,
        )
        await server.start()
        print(f"edge-server: serving {', '.join(m.name for m in repository)} on {server.address}", flush=True)
        notify("READY=1")
        if on_ready is not None:
            on_ready()
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
        if settings.processes > 1:
            return supervise(settings)
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


# -- several processes on one port ---------------------------------------------------------------

_READY_TIMEOUT_S = 600.0
"""How long a process may take to load the models and listen."""


def supervise(settings: ServerSettings) -> int:
    """``--processes N``: N server processes listening on one port with SO_REUSEPORT, the kernel
    spreading connections over them. This process starts them, says READY once every one listens,
    passes SIGHUP and SIGTERM (or SIGINT) on to each, and waits for them; if one dies, it stops the
    others and exits 1, so that systemd starts the whole set again.

    With ``--metrics-port`` the processes write their metrics to a directory of this process's own
    (prometheus-client's multiprocess mode), and this process serves their sums; the directory goes
    when it stops."""
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(_reserved_port(settings.host, settings.port))  # before the models load
        if settings.metrics_port is not None:
            stack.enter_context(_multiprocess_metrics(settings.metrics_host, settings.metrics_port))
        return _supervise(settings, port)


@contextlib.contextmanager
def _multiprocess_metrics(host: str, port: int) -> Iterator[None]:
    """The metrics endpoint of ``--processes``: the sums of what they write to a new directory, named
    to them (spawned after this) in ``PROMETHEUS_MULTIPROC_DIR``."""
    directory = tempfile.mkdtemp(prefix="edge-metrics-")
    try:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        http = serve_multiprocess(directory, host, port)
        print(f"edge-server: metrics on http://{host}:{http.server_port}/metrics", flush=True)
        try:
            yield
        finally:
            http.shutdown()
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(directory, ignore_errors=True)


def _supervise(settings: ServerSettings, port: int) -> int:
    """:func:`supervise` once the port (and the metrics endpoint) are held: start, watch, stop."""
    check(settings)  # the files and models, once, before N processes load them
    child = settings.model_copy(update={"port": port, "processes": 1})
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(settings.processes)]
    procs = [
        context.Process(target=_child, args=(child.model_dump(mode="json"), sender), name=f"edge-server-{i}")
        for i, (_, sender) in enumerate(pipes)
    ]
    waiting = [receiver for receiver, _ in pipes]
    stopping = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            stopping.set()
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM if signum != signal.SIGHUP else signal.SIGHUP)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while waiting and not stopping.is_set():
            if any(not p.is_alive() for p in procs):
                raise EdgeError("a server process stopped while starting; see its log above")
            if time.monotonic() > deadline:
                raise EdgeError(f"the server processes did not all listen within {_READY_TIMEOUT_S:g} s")
            for receiver in multiprocessing.connection.wait(waiting, timeout=0.2):
                assert isinstance(receiver, multiprocessing.connection.Connection)
                receiver.recv()
                waiting.remove(receiver)
        print(
            f"edge-server: {len(procs)} processes listening on {format_address(settings.host, port)}",
            flush=True,
        )
        notify("READY=1")
        interval = watchdog_interval()
        while not stopping.is_set():
            if any(not p.is_alive() for p in procs):
                logger.error("edge-server: a server process stopped; stopping the others")
                return 1
            if interval:
                notify("WATCHDOG=1")
            stopping.wait(min(interval or 1.0, 1.0))
        notify("STOPPING=1")
        return 0
    finally:
        stopping.set()
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.join(settings.grace_s + 30.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


@contextlib.contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """``port``, or a free one when it is 0, held by a socket bound with SO_REUSEPORT (not listening, so
    no connection goes to it) while the server processes bind it too; ListenError when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            held.bind((host, port))
        except OSError as err:
            raise ListenError(
                f"cannot listen on {format_address(host, port)}: {err.strerror or err}"
            ) from err
        yield int(held.getsockname()[1])


_PARENT_CHECK_S = 1.0
"""How often a server process of ``--processes`` looks whether its supervisor is still there."""


def _stop_with(supervisor: int) -> None:
    """SIGTERM this process (a drain, as the supervisor's own would be) once ``supervisor`` is gone: a
    supervisor killed outright (SIGKILL, a crash) cannot stop its processes, which would go on
    serving the port with nobody to stop or restart them."""
    while os.getppid() == supervisor:
        time.sleep(_PARENT_CHECK_S)
    logger.warning("edge-server: the supervisor (pid %d) is gone; stopping", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


def _child(settings: dict[str, Any], ready: multiprocessing.connection.Connection) -> None:
    """One of ``--processes``: serve on the shared port; systemd hears from the supervisor only."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor says when to stop (SIGTERM)
    threading.Thread(target=_stop_with, args=(os.getppid(),), name="edge-orphan-watch", daemon=True).start()
    try:
        asyncio.run(
            serve(
                ServerSettings(**settings),
                reuse_port=True,
                on_ready=lambda: ready.send(os.getpid()),
                metrics_endpoint=False,
            )
        )
    except EdgeError as err:
        print(f"edge-server: error: {err}", file=sys.stderr)
        sys.exit(2)
