"""A gRPC client for the Open Inference Protocol: one edge server, one request path.

Every request goes through a :class:`~edge.transport.session.Session`, which holds the dialect
(a stream with unary fallback, ids, deadlines, errors). :meth:`TailClient.infer` runs the calling
thread's own session on that thread's private event loop, so one request at a time pays no thread
hand-off; :meth:`TailClient.submit` hands the request to a session on a thread of its own and
returns a future at once, so the device can run the next head meanwhile (pipelining). What the
server's metadata says of it (:class:`~edge.transport.session.ServerTraits`) is read once and
shared by both.

Errors come back as :class:`~edge.errors.RemoteError` carrying the gRPC status name, so the
caller can decide to finish locally without importing grpc.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from .. import wire
from ..aio import retire
from ..credentials import TLSOptions, bearer_metadata
from ..errors import ConfigError, EdgeError, RemoteError
from ..protocol import converters, pb
from ..wire import InferRequest, ModelMetadata, ParameterValue, calibrated, decode, encode, encodings, packed
from .base import RemoteResult
from .connect import DEFAULT_CONNECT_TIMEOUT_S, channel_options
from .session import Request, ServerTraits, Session, closed

__all__ = ["TailClient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class _Lane:
    """A session and the event loop it runs on: a calling thread's own, driven by that thread one
    request at a time (``thread`` None); or the pipe's, run by a thread of its own.

    grpc.aio binds a channel to the loop it was made on, and a loop runs in one thread at a time;
    a lane per thread lets threads call at once, and no lock is held across a call.
    """

    loop: asyncio.AbstractEventLoop
    session: Session
    thread: threading.Thread | None = None
    waiting: Any = None
    """The future the calling thread runs the loop for (its own lane only)."""

    def stop_for(self, future: Any) -> None:
        """Stop the loop, if it runs for ``future``: the request's ``wake``, called as it is settled."""
        if self.waiting is future:
            self.waiting = None
            if self.loop.is_running():
                self.loop.stop()

    def run_for(self, request: Request) -> Any:
        """Take ``request`` and run the loop until it is settled: at once onto an open stream, else
        through a turn of the loop. The loop stops in the turn that settles it."""
        future = request.future
        self.waiting = future
        if not self.session.start_on_open_stream(request):
            self.loop.call_soon(self.session.start, request)
        while not future.done():
            self.loop.run_forever()
        self.waiting = None
        return future.result()

    def close(self) -> None:
        if self.thread is None:
            self.loop.run_until_complete(self.session.close())
            retire(self.loop)
            return
        try:
            asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(5.0)
        except (concurrent.futures.TimeoutError, RuntimeError) as err:
            logger.debug("the pipe to %s did not close cleanly: %s", self.session.address, err)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)
        if not self.thread.is_alive():
            retire(self.loop)


class TailClient:
    """Talks to one edge server; a :class:`~edge.transport.base.TailTransport`.

    Safe to share between threads: each calling thread gets a lane of its own (a loop, a channel
    and a session), so calls from several threads run at once. ``streaming`` False sends every
    request as a unary ModelInfer call. ``token`` is sent as ``authorization: Bearer TOKEN``
    metadata on every call.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 2.0,
        tls: TLSOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        streaming: bool = True,
        token: str | None = None,
        codec: str | encodings.CutEncoder = "raw",
        balance: bool = False,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.address = address
        if not connect_timeout_s > 0:
            raise ConfigError(f"the connect timeout must be positive, not {connect_timeout_s}")
        self.connect_timeout_s = connect_timeout_s
        """The connection's own deadline (TCP, TLS, HTTP/2), apart from each request's ``timeout_s``."""
        self.balance = balance
        """``address`` names several servers (a DNS name with several records, ``ipv4:A:P,B:P``):
        gRPC's round_robin spreads the calls over them. Unary calls, then: a stream would stay on one."""
        self.cut_encoder = None if isinstance(codec, str) else codec
        """Encodes cut tensors with a calibrated codec (a CODEC.json), where the server decodes it."""
        if not isinstance(codec, str):
            codec = calibrated.NAME
        elif codec != "raw" and codec not in encodings.available():
            raise ConfigError(
                f"codec {codec!r} is not available here (pip install zstandard lz4); "
                f"choose one of: raw, {', '.join(encodings.available()) or '(none installed)'}"
            )
        self.codec = codec
        """Lossless codec for the tensors sent, once the server says it decodes it (else raw)."""
        self._tables: set[bytes] = set()
        """Calibrated codec tables the server has been sent (with a request it answered)."""
        self.traits = ServerTraits(streaming=streaming and not balance)
        """What the server is; its metadata is read into it once, on the first request."""
        self._metadata_read = False
        self._metadata = bearer_metadata(token) if token else None
        self.timeout_s = timeout_s
        self._options: list[tuple[str, int | str]] = [
            *channel_options(connect_timeout_s),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if balance:
            self._options.append(("grpc.lb_policy_name", "round_robin"))
        self._credentials = None
        if tls is not None:
            if tls.server_name:
                self._options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._credentials = tls.credentials()
        self._local = threading.local()
        # Guards _lanes, _pipe and _closed only: taken to add or close lanes, never during a call.
        self._lock = threading.Lock()
        self._lanes: list[_Lane] = []
        self._pipe: _Lane | None = None
        self._closed = False
        self._lane()  # the constructing thread's lane, made now: a bad address fails here

    @property
    def streaming(self) -> bool:
        """Requests go on a stream (False once the server turned out not to stream in our dialect)."""
        return self.traits.streaming

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
        coded: bool = True,
    ) -> RemoteResult:
        """Send ``inputs`` to ``model``; raises RemoteError with the gRPC status name on failure.

        With a ``codec`` the server decodes, the tensors go compressed (each only if that makes it
        smaller), and the server may compress large outputs too; ``coded`` False sends them raw."""
        message, finish = self._request(model, inputs, parameters, request_id, coded)
        try:
            return self._send(message, finish, timeout_s, request_id)
        except RemoteError as err:
            if not self._forgot_tables(err):
                raise
        # The server no longer holds a codec table (it restarted, or dropped it): once more, with them.
        message, finish = self._request(model, inputs, parameters, request_id, coded)
        return self._send(message, finish, timeout_s, request_id)

    def _forgot_tables(self, err: BaseException | None) -> bool:
        """``err`` says the server does not hold a calibrated codec table: the next requests carry them."""
        if not (isinstance(err, RemoteError) and err.status == "FAILED_PRECONDITION" and self._tables):
            return False
        if calibrated.UNKNOWN_TABLE not in str(err):
            return False
        self._tables.clear()
        return True

    def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
        coded: bool = True,
    ) -> concurrent.futures.Future[RemoteResult]:
        """:meth:`infer` without waiting: the request goes to the client's pipe (a session on a thread
        of its own, several requests in flight), and the future holds its RemoteResult or RemoteError."""
        future: concurrent.futures.Future[RemoteResult] = concurrent.futures.Future()
        try:
            message, finish = self._request(model, inputs, parameters, request_id, coded)
            pipe = self._open_pipe()
        except RemoteError as err:  # the server's metadata could not be had: this request's failure
            future.set_exception(err)
            return future
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        request = Request(message, future, finish, timeout, request_id)
        if self.cut_encoder is not None:
            future.add_done_callback(lambda done: self._forgot_tables(done.exception()))
        try:
            pipe.loop.call_soon_threadsafe(pipe.session.start, request)
        except RuntimeError:  # the loop was closed under us
            future.set_exception(closed(self.address))
        return future

    def max_inflight(self) -> int | None:
        """The requests the server lets one stream hold (its metadata's stream window); None when it
        names none. Raises RemoteError when the server cannot be asked."""
        return self._traits().stream_window

    def codec_sent(self) -> str:
        return encodings.sent_as(self.codec, self._traits().codecs)

    def _send(
        self,
        message: Any,
        finish: Callable[[Any, float], RemoteResult],
        timeout_s: float | None,
        request_id: str,
    ) -> RemoteResult:
        """One request on the calling thread's session, its loop run until the answer (or the deadline)."""
        lane = self._lane()
        if _running_loop() is not None:
            raise RuntimeError("TailClient is synchronous: call it from a thread, not from a coroutine")
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        future: asyncio.Future[RemoteResult] = lane.loop.create_future()
        return lane.run_for(Request(message, future, finish, timeout, request_id, wake=lane.stop_for))

    def _request(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, ParameterValue] | None,
        request_id: str,
        coded: bool = True,
    ) -> tuple[Any, Callable[[Any, float], RemoteResult]]:
        """The ModelInferRequest for ``inputs`` (raw unless ``coded``), and what turns its answer into
        a RemoteResult."""
        tensors = tuple([encode(name, array) for name, array in inputs.items()])
        params = dict(parameters or {})
        traits = self._traits()
        codec = encodings.sent_as(self.codec, traits.codecs) if coded else "raw"
        lossy = False
        inlined: set[bytes] | tuple[()] = ()
        if codec != "raw":
            if self.cut_encoder is not None:
                cut, sha = params.get(wire.SPLIT_POINT), params.get(wire.MODEL_SHA256)
                encoded = [self.cut_encoder.compress(t, cut, sha, self._tables) for t in tensors]
                tensors = tuple(t for t, _ in encoded)
                inlined = {table for _, table in encoded if table is not None}
            else:
                tensors = tuple(encodings.compress(tensor, codec) for tensor in tensors)
            if not encodings.ENCODINGS[codec].lossy:
                params[wire.ACCEPT_ENCODING] = codec
            else:
                lossy = any(t.parameters.get(wire.ENCODING) == codec for t in tensors)
        bytes_sent = sum(t.nbytes for t in tensors)
        if traits.packed:
            tensors = tuple(packed.pack(t) for t in tensors)
        cut = params.get(wire.SPLIT_POINT)
        if traits.cut_models and isinstance(cut, int) and f"{model}@{cut}" in traits.cut_models:
            model = f"{model}@{cut}"  # the tail of this cut has a name of its own there (batched)
        request = InferRequest(model_name=model, inputs=tensors, parameters=params, id=request_id)

        def finish(reply: Any, call_ms: float) -> RemoteResult:
            try:
                response = converters.infer_response_from_pb(reply)
                outputs = {
                    t.name: decode(packed.unpack(t) if packed.is_packed(t) else t) for t in response.outputs
                }
            except EdgeError as err:
                raise RemoteError(
                    f"INTERNAL: edge server {self.address} sent an answer that cannot be read: {err}",
                    status="INTERNAL",
                ) from err
            if inlined:
                self._tables.update(inlined)  # the server holds these now: later frames name them
            return RemoteResult(
                outputs=outputs,
                parameters=response.parameters,
                call_ms=call_ms,
                bytes_sent=bytes_sent,
                lossy=lossy,
                server=self.address,
                coded=codec != "raw",
            )

        return converters.infer_request_to_pb(request), finish

    def _traits(self) -> ServerTraits:
        """What the server's metadata says of it, asked once (a failure is the caller's RemoteError)."""
        if not self._metadata_read:
            try:
                reply = self._unary_call("ServerMetadata", pb.ServerMetadataRequest(), None)
            except RemoteError as err:
                if err.status != "UNIMPLEMENTED":
                    raise
                extensions: tuple[str, ...] = ()  # a peer without it lists nothing: plain tensors, raw
            else:
                extensions = tuple(reply.extensions)
            self.traits.read(extensions)
            self._metadata_read = True
            if self.codec != "raw" and self.codec not in self.traits.codecs:
                logger.warning(
                    "edge server %s does not decode %s; sending raw tensors", self.address, self.codec
                )
        return self.traits

    def ready(self, timeout_s: float | None = None) -> bool:
        try:
            reply = self._unary_call("ServerReady", pb.ServerReadyRequest(), timeout_s)
        except RemoteError:
            return False
        return bool(reply.ready)

    def server_metadata(self, timeout_s: float | None = None) -> tuple[str, str, tuple[str, ...]]:
        """The server's name, version and extensions."""
        reply = self._unary_call("ServerMetadata", pb.ServerMetadataRequest(), timeout_s)
        return str(reply.name), str(reply.version), tuple(reply.extensions)

    def model_metadata(self, model: str, timeout_s: float | None = None) -> ModelMetadata:
        reply = self._unary_call("ModelMetadata", pb.ModelMetadataRequest(name=model), timeout_s)
        return converters.model_metadata_from_pb(reply)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the server answers ServerReady, or raise RemoteError."""
        lane = self._lane()
        try:
            self._run(lane, lane.session.channel.channel_ready(), timeout_s)
        except RemoteError as err:
            raise RemoteError(
                f"UNAVAILABLE: edge server {self.address} not reachable within {timeout_s}s"
            ) from err
        if not self.ready(timeout_s):
            raise RemoteError(f"UNAVAILABLE: edge server {self.address} is not ready")

    def close(self) -> None:
        """Close every lane; call it once the calls have returned."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            lanes, self._lanes = self._lanes, []
            pipe, self._pipe = self._pipe, None
        for lane in [*([pipe] if pipe is not None else []), *lanes]:
            if not lane.session.closed:
                lane.close()

    def __enter__(self) -> TailClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _session(self, channel: grpc.aio.Channel, loop: asyncio.AbstractEventLoop) -> Session:
        return Session(
            self.address,
            channel,
            self.traits,
            loop,
            metadata=self._metadata,
            connect_timeout_s=self.connect_timeout_s,
            reopen=lambda: _channel(self.address, self._credentials, self._options),
        )

    def _lane(self) -> _Lane:
        lane: _Lane | None = getattr(self._local, "lane", None)
        if lane is not None and not lane.session.closed:
            return lane
        if self._closed:
            raise closed(self.address)
        loop = asyncio.new_event_loop()
        channel = loop.run_until_complete(_open_channel(self.address, self._credentials, self._options))
        lane = _Lane(loop, self._session(channel, loop))
        with self._lock:
            added = not self._closed
            if added:
                self._lanes.append(lane)
        if not added:
            lane.close()
            raise closed(self.address)
        self._local.lane = lane
        return lane

    def _open_pipe(self) -> _Lane:
        """The pipe: a session whose loop runs on a thread of its own, made on the first submit."""
        with self._lock:
            if self._closed:
                raise closed(self.address)
            if self._pipe is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="edge-pipe", daemon=True)
                thread.start()
                try:
                    channel = asyncio.run_coroutine_threadsafe(
                        _open_channel(self.address, self._credentials, self._options),
                        loop,
                    ).result(10.0)
                except BaseException:
                    loop.call_soon_threadsafe(loop.stop)
                    thread.join(1.0)
                    raise
                self._pipe = _Lane(loop, self._session(channel, loop), thread)
            return self._pipe

    def _run(self, lane: _Lane, work: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``work`` (a call other than inference) on the lane's loop, within ``timeout_s`` once
        connected. Whatever goes wrong on the way, the caller gets a RemoteError."""
        loop = lane.loop
        if lane.session.closed or _running_loop() is not None:
            work.close()
            if lane.session.closed:
                raise closed(self.address)
            raise RuntimeError("TailClient is synchronous: call it from a thread, not from a coroutine")
        # A timer that cancels the task: lighter than asyncio.wait_for, which wraps it in a second task.
        task = loop.create_task(work)
        timer = loop.call_later(self.connect_timeout_s + timeout_s, task.cancel)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError as err:
            raise RemoteError(
                f"DEADLINE_EXCEEDED: edge server {self.address} did not answer within {timeout_s}s",
                status="DEADLINE_EXCEEDED",
            ) from err
        except grpc.aio.AioRpcError as err:
            raise RemoteError(f"{err.code().name}: {err.details()}", status=err.code().name) from err
        except RemoteError:
            raise
        except Exception as err:
            # A peer that breaks the protocol, or a channel in a state gRPC did not expect.
            logger.debug("call to %s failed", self.address, exc_info=err)
            raise RemoteError(
                f"INTERNAL: the call to edge server {self.address} failed: {type(err).__name__}: {err}",
                status="INTERNAL",
            ) from err
        finally:
            timer.cancel()

    def _unary_call(self, method: str, message: object, timeout_s: float | None) -> Any:
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        lane = self._lane()
        return self._run(lane, lane.session.unary(method, message, timeout), timeout)


_running_loop = asyncio.events._get_running_loop
"""The loop running in this thread, or None: called from a coroutine when it is not None."""


async def _open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, int | str]],
) -> grpc.aio.Channel:
    """Create the channel inside the private loop, which it binds to."""
    return _channel(address, credentials, options)


def _channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, int | str]],
) -> grpc.aio.Channel:
    """A channel bound to the running loop."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)
