"""The gRPC face of the data plane: the Open Inference Protocol service, health and reflection.

The servicer is thin: it converts the request, calls the data plane and converts the
response. Errors become gRPC status codes through one table, :data:`STATUS_CODES`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge.address import format_address
from edge.errors import (
    EdgeError,
    TensorFormatError,
)
from edge.protocol import DESCRIPTOR_POOL, SERVICE_NAME, converters, pb, pb_grpc
from edge.ratelog import RateLimitedLog
from edge.wire import (
    BATCH_SIZE,
    COMPUTE_US,
    QUEUE_US,
    SPLIT_POINT,
    STACK,
    STREAM_WINDOW_PREFIX,
    InferResponse,
)

from .dataplane import MAX_NAME_CHARS, DataPlane
from .errors import (
    ListenError,
)
from .fairness import peer_host
from .metrics import ServerMetrics
from .scheduler import Scheduler
from .settings import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_BATCH_DELAY_US,
    DEFAULT_MAX_CONNECTION_AGE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INFLIGHT_PER_DEVICE,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_STREAMS_PER_CONNECTION,
)
from .status import STATUS_NAMES, status_name

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "STATUS_CODES",
    "EdgeServer",
    "InferenceServicer",
    "check_listen",
    "status_for",
]

logger = logging.getLogger(__name__)


STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = tuple(
    (cls, grpc.StatusCode[name]) for cls, name in STATUS_NAMES
)
""":data:`server.status.STATUS_NAMES` as gRPC codes: the first match wins."""

T = TypeVar("T")


def status_for(err: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[status_name(err)]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`DataPlane`: it converts each message, hands
    the request to its :class:`~server.scheduler.Scheduler` (``workers``, ``max_batch`` and the
    per-device limit go to it) and converts the answer back."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        workers: int = 0,
        metrics: ServerMetrics | None = None,
        max_inflight_per_device: int = DEFAULT_MAX_INFLIGHT_PER_DEVICE,
        identify: Callable[[grpc.aio.ServicerContext], str] | None = None,
        max_batch: int = 1,
        max_batch_delay_us: int = DEFAULT_MAX_BATCH_DELAY_US,
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.scheduler = Scheduler(
            dataplane,
            workers=workers,
            max_inflight_per_device=max_inflight_per_device,
            max_batch=max_batch,
            max_batch_delay_us=max_batch_delay_us,
        )
        if metrics is not None:
            metrics.watch(
                lambda: self.scheduler.turns.waiting,
                lambda: [(m.name, m.runner) for m in self.dataplane.repository],
                lambda: self.dataplane.inflight,
            )
        self._identify = identify if identify is not None else peer_host
        if metrics is None:
            self._infer = self._run  # type: ignore[method-assign]  # one coroutine less per request
        self._rejected = RateLimitedLog(logger)
        """One line a minute per status: one device's bad requests logged one each."""
        self.stream_window = max(1, max_inflight_per_device)
        """Requests of one stream in flight at once; advertised in the server metadata."""
        # The tasks reading each open stream; a stopping server stops them reading.
        self._readers: set[asyncio.Task[None]] = set()
        self._closing = False

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await _refuse_unparsed(context, request, self._rejected)
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await _refuse_unparsed(context, request, self._rejected)
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await _refuse_unparsed(context, request, self._rejected)
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await _refuse_unparsed(context, request, self._rejected)
        name, version, extensions = self.dataplane.server_metadata()
        window = f"{STREAM_WINDOW_PREFIX}{self.stream_window}"
        return pb.ServerMetadataResponse(name=name, version=version, extensions=[*extensions, window])

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await _guard(context, self._metadata(request), self._rejected)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await _guard(context, self._index(request), self._rejected)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await _guard(context, self._control(request, load=True), self._rejected)

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await _guard(context, self._control(request, load=False), self._rejected)

    async def _index(self, request: Any) -> Any:
        reply = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.dataplane.repository_index(bool(_parsed(request).ready)):
            reply.models.add(name=name, version=version, state=state, reason=reason)
        return reply

    async def _control(self, request: Any, *, load: bool) -> Any:
        request = _parsed(request)
        if load:
            await asyncio.to_thread(
                self.dataplane.load, request.model_name
            )  # loading takes milliseconds to seconds
            return pb.RepositoryModelLoadResponse()
        self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await _guard(context, self._unary_infer(request, context), self._rejected)

    async def _unary_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return converters.infer_response_to_pb(await self._infer(request, self._identify(context), context))

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        """Answers a stream's requests as they complete, each with its request's ``id``.

        Up to :attr:`stream_window` requests of one stream are held, computing or answered but not yet
        sent: a slot comes free once its answer is written (gRPC takes it), so a client that does not
        read its answers stops being read (HTTP/2 flow control then stops its writes) and cannot make
        the server hold more. One bad request gets an error answer, and the stream goes on. Each answer
        is written by the task that computed it, one at a time: no queue, no hop to a writer.
        """
        device = self._identify(context)

        async def reply_to(request: Any) -> Any:
            try:
                response = await self._infer(request, device)  # an Unparsed one is answered too
            except Exception as err:  # one bad request must not end the stream
                return converters.stream_error_to_pb(
                    _log(err, self._rejected).name, _describe(err), _request_id(request)
                )
            return converters.stream_response_to_pb(response)

        serial = self.scheduler.serial
        window = asyncio.Semaphore(self.stream_window)
        writing = asyncio.Lock()  # gRPC takes one message at a time on a call
        inflight: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            reply = await reply_to(request)
            try:
                async with writing:
                    await context.write(reply)
            finally:
                window.release()

        reader = asyncio.current_task()
        assert reader is not None
        self._readers.add(reader)
        try:
            async for request in request_iterator:
                if serial or (not inflight and self._predicts_now(request)):
                    # Everything computes on this loop, one request after another (or this one finds
                    # the server idle, on a short route): it is answered where it was read, and the
                    # next is read once gRPC has taken the answer.
                    await context.write(await reply_to(request))
                else:
                    await window.acquire()
                    task = asyncio.create_task(answer(request))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                if self._closing:
                    break
        except asyncio.CancelledError:
            if not self._closing:
                for task in list(inflight):
                    task.cancel()
                raise
            # Ended by close_streams: what was read is answered, then the stream ends with OK,
            # so the device reconnects or finishes locally.
        finally:
            self._readers.discard(reader)
        if inflight:
            await asyncio.wait(set(inflight))

    def _predicts_now(self, message: Any) -> bool:
        """The scheduler's guess, from the message's model and cut, that it computes at once; never for
        a stack (whose parts let the stream's next message be read) or an unreadable message."""
        params = getattr(message, "parameters", None)
        if params is None or STACK in params:
            return False
        split = params.get(SPLIT_POINT)
        return self.scheduler.predicts_now(
            message.model_name, split.int64_param if split is not None else None
        )

    def shutdown(self) -> None:
        """Let the compute threads finish what they hold, then stop them."""
        self.scheduler.shutdown()

    def close_streams(self) -> None:
        """End every stream once the requests it holds are answered; none is read further."""
        self._closing = True
        for task in list(self._readers):
            task.cancel()

    async def _metadata(self, request: Any) -> Any:
        request = _parsed(request)
        meta = self.dataplane.model_metadata(request.name, request.version)
        return converters.model_metadata_to_pb(meta)

    async def _infer(
        self, message: Any, device: str, context: grpc.aio.ServicerContext | None = None
    ) -> InferResponse:
        """:meth:`_run`, counted in the metrics (without metrics, ``_infer`` is ``_run`` itself)."""
        assert self.metrics is not None
        received = time.perf_counter_ns()
        try:
            response = await self._run(message, device, context)
        except (Exception, asyncio.CancelledError) as err:
            model = getattr(message, "model_name", "")
            served = model if self.dataplane.model_ready(model) else "(unknown)"
            if isinstance(err, asyncio.CancelledError):
                # The caller went away (its deadline, or a cancel) while the request waited or ran;
                # a request still waiting for a compute thread is never computed.
                remaining = context.time_remaining() if context is not None else None
                expired = remaining is not None and remaining <= 0
                self.metrics.answered(served, "", "DEADLINE_EXCEEDED" if expired else "CANCELLED")
            else:
                self.metrics.answered(served, "", status_for(err).name)
            raise
        params = response.parameters
        self.metrics.answered(
            response.model_name,
            str(params.get(SPLIT_POINT, "whole")),
            "OK",
            queue_s=int(params.get(QUEUE_US, 0)) / 1e6,
            compute_s=int(params.get(COMPUTE_US, 0)) / 1e6,
            total_s=(time.perf_counter_ns() - received) / 1e9,
            bytes_in=sum(map(len, message.raw_input_contents)),
            bytes_out=sum(t.nbytes for t in response.outputs),
            batch=int(params.get(BATCH_SIZE, params.get(STACK, 1))),  # a stack's samples ran together
        )
        return response

    async def _run(
        self, message: Any, device: str, context: grpc.aio.ServicerContext | None = None
    ) -> InferResponse:
        """The data plane's answer to one ModelInferRequest, through the scheduler."""
        received = time.perf_counter_ns()
        request = converters.infer_request_from_pb(_parsed(message))
        prepared = self.dataplane.prepare(request, received)
        nbytes = sum(map(len, message.raw_input_contents))
        remaining = context.time_remaining() if context is not None else None
        deadline = None if remaining is None else time.monotonic() + remaining  # on the monotonic clock
        if self.scheduler.computes_now(prepared):
            return self.scheduler.run_serial(prepared, nbytes, deadline)  # no await: nothing waits
        return await self.scheduler.run(prepared, device, nbytes, deadline)


class EdgeServer:
    """An asyncio gRPC server holding the inference service, health and reflection.

    What it serves with is passed in: the ``servicer`` (by default an :class:`InferenceServicer`
    over ``dataplane``, made with ``servicer_options``), the ``credentials`` (None: plaintext)
    and the ``interceptors``.
    """

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_connection_age_s: float = DEFAULT_MAX_CONNECTION_AGE_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        servicer: InferenceServicer | None = None,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        reuse_port: bool = False,
        **servicer_options: Any,
    ) -> None:
        self.dataplane = dataplane
        self.host = host
        self.requested_port = port
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_connection_age_s = max_connection_age_s
        self.max_connections = max_connections
        self.reuse_port = reuse_port
        """Listen with SO_REUSEPORT: one of several processes on one port (``edge-server --processes``)."""
        self.servicer = servicer if servicer is not None else InferenceServicer(dataplane, **servicer_options)
        self.credentials = credentials
        self.interceptors = tuple(interceptors)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return format_address(self.host, self.port)

    async def start(self) -> int:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", int(self.reuse_port)),
            # A connection with no call for this long is closed, so idle ones cannot hold file
            # descriptors for ever; a device reconnects by itself on its next request.
            ("grpc.max_connection_idle_ms", int(self.idle_timeout_s * 1000)),
            # ...and any connection after this long, whatever it carries (its calls get 30 s more).
            ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", 30_000),
            # Connections, and streams on each, are bounded: past the first, a new connection is
            # closed as it opens, so they cannot take every file descriptor.
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ]
        server = grpc.aio.server(options=options, interceptors=self.interceptors)
        add_tolerant_servicer(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server, pool=DESCRIPTOR_POOL)
        port = bind(server, self.host, self.requested_port, self.credentials, probe=not self.reuse_port)
        await server.start()
        self._server, self.port = server, port
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "edge-server listening on %s with %d model(s)", self.address, len(self.dataplane.repository)
        )
        return port

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new work, let in-flight RPCs finish, then stop."""
        if self._server is None:
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.dataplane.begin_shutdown()
        self.servicer.close_streams()
        await self._server.stop(grace)
        self._server = None
        self.servicer.shutdown()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            result = self.health.set(service, status)
            if isinstance(result, Awaitable):
                await result
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            result = self.health.enter_graceful_shutdown()
            if isinstance(result, Awaitable):
                await result


class Unparsed:
    """What a request whose bytes do not parse as its message becomes, so the servicer can answer
    INVALID_ARGUMENT itself (gRPC would answer UNKNOWN, log a traceback, and end a stream)."""

    __slots__ = ("message", "reason", "size")

    def __init__(self, message: str, size: int, reason: str) -> None:
        self.message, self.size, self.reason = message, size, reason

    def describe(self) -> str:
        return f"the request ({self.size:,} bytes) is not a valid {self.message}: {self.reason[:200]}"


def _tolerant(parse: Any, message: str) -> Any:
    def read(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as err:  # DecodeError, and whatever else a parser raises on bad bytes
            return Unparsed(message, len(data), str(err) or type(err).__name__)

    return read


class _Registrar:
    """Takes what the generated ``add_..._to_server`` registers, with tolerant request parsers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again, by name, through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        methods = DESCRIPTOR_POOL.FindServiceByName(service).methods_by_name
        tolerant = {
            name: handler._replace(
                request_deserializer=_tolerant(
                    handler.request_deserializer, methods[name].input_type.full_name
                )
            )
            for name, handler in handlers.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, tolerant),))
        self.server.add_registered_method_handlers(service, tolerant)


def add_tolerant_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` on ``server`` as the generated code does, but with request parsers that
    turn unparseable bytes into :class:`Unparsed` instead of failing the call."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _Registrar(server))


def _request_id(request: Any) -> str:
    """The id a stream's error answer carries, so the device can match it; "" for an unreadable one."""
    value = getattr(request, "id", "")
    return value[:MAX_NAME_CHARS] if isinstance(value, str) else ""


def _parsed(request: Any) -> Any:
    """``request``, or the INVALID_ARGUMENT its bytes earn when they did not parse."""
    if isinstance(request, Unparsed):
        raise TensorFormatError(request.describe())
    return request


async def _refuse_unparsed(context: grpc.aio.ServicerContext, request: Any, log: RateLimitedLog) -> None:
    try:
        _parsed(request)
    except TensorFormatError as err:
        await _abort(context, err, log)


def bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
    *,
    probe: bool = True,
) -> int:
    """Add the listening port; a failure (in use, unknown host, not this machine's) is one ListenError.

    The address is tried with a plain socket first: gRPC says only that it failed, and says it
    on stderr in a line of its own.
    """
    target = check_listen(host, port) if probe else format_address(host, port)
    try:
        bound = (
            server.add_insecure_port(target)
            if credentials is None
            else server.add_secure_port(target, credentials)
        )
    except RuntimeError as err:
        raise ListenError(f"cannot listen on {target}: {err}") from err
    if bound == 0:
        raise ListenError(f"cannot listen on {target}")
    return int(bound)


def check_listen(host: str, port: int) -> str:
    """``host:port`` if this process can listen there now; raises ListenError saying why not."""
    target = format_address(host, port)
    problem = _bind_problem(host, port)
    if problem is not None:
        raise ListenError(f"cannot listen on {target}: {problem}")
    return target


def _bind_problem(host: str, port: int) -> str | None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return f"unknown host {host!r} ({err.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as err:
            return err.strerror or str(err)
    return None


async def _guard(context: grpc.aio.ServicerContext, call: Awaitable[T], log: RateLimitedLog) -> T:
    try:
        return await call
    except Exception as err:
        await _abort(context, err, log)
        raise  # unreachable: abort raises


async def _abort(context: grpc.aio.ServicerContext, err: Exception, log: RateLimitedLog) -> None:
    await context.abort(_log(err, log), _describe(err))


def _log(err: Exception, log: RateLimitedLog) -> grpc.StatusCode:
    """Log a failed request on the servicer's ``log`` (at most a line a minute per status); returns its status."""
    code = status_for(err)
    if code is grpc.StatusCode.INTERNAL:
        log.log(logging.ERROR, "internal", "request failed", exc_info=err)
    else:
        log.log(logging.INFO, code.name, "request rejected (%s): %s", code.name, err)
    return code


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, EdgeError) else f"internal error: {type(err).__name__}: {err}"
