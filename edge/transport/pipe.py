"""Several requests in flight to one edge server: the device's half of pipelining.

A :class:`Pipe` owns a thread running an event loop, a channel, and one ``ModelStreamInfer``
stream. :meth:`Pipe.send` hands it a request and returns at once with a future, so the device
runs the next request's head while this one is on the wire or on the server. Answers come back
as they complete and are matched to their requests by ``id``.

- Each request keeps its own deadline: one that expires fails alone (``DEADLINE_EXCEEDED``),
  and its late answer is dropped; the stream stays open.
- A stream that ends or breaks fails only the requests it held (the device finishes those
  locally); the next request opens a new stream.
- A server without a readable stream (MLServer, KServe) gets concurrent unary ``ModelInfer``
  calls instead, and the requests the stream held are sent again that way, once.

The link estimate stays truthful: a request's call time runs from the moment it is written on
the stream to its answer, so time spent behind other requests in the device's write queue is
not counted as transfer, and time behind them on the server is the server's ``queue_us``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..errors import RemoteError
from ..protocol import converters, pb, pb_grpc
from .base import RemoteResult
from .connect import DEFAULT_CONNECT_TIMEOUT_S, until_connected
from .loops import finish_tasks, retire

__all__ = ["MAX_PENDING", "Answer", "Pipe", "read_answer"]

logger = logging.getLogger(__name__)

MAX_PENDING = 256
"""Requests one pipe holds at most; past it :meth:`Pipe.send` fails at once (RESOURCE_EXHAUSTED)."""

_ID_CHARS = 200
"""How much of the caller's request id goes on the wire, ahead of the pipe's own sequence number."""

Finish = Callable[[Any, float], RemoteResult]
"""Turns a ModelInferResponse and the call's milliseconds into the caller's result."""


@dataclass(slots=True)
class _Pending:
    message: Any
    future: concurrent.futures.Future[RemoteResult]
    finish: Finish
    deadline: float
    timeout_s: float = 0.0
    timer: asyncio.TimerHandle | None = None
    written_at: float = 0.0
    stream: int = -1
    """The stream it was written on (its generation); -1 while queued or sent unary."""
    resent: bool = False
    probe: bool = False
    """Sent unary because a new stream failed at once: its success means the server does not stream."""


@dataclass(slots=True)
class _Stream:
    generation: int
    call: Any
    outbox: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Pipe:
    """Requests in flight to ``address`` at once, on one stream (or unary calls); thread-safe.

    ``open_channel`` makes the grpc.aio channel inside the pipe's loop. ``metadata`` goes on every
    call (a bearer token). ``streaming`` False sends unary calls from the start.
    """

    def __init__(
        self,
        address: str,
        open_channel: Callable[[], Coroutine[Any, Any, grpc.aio.Channel]],
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
        streaming: bool = True,
        max_pending: int = MAX_PENDING,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.streaming = streaming
        self.max_pending = max_pending
        self.connect_timeout_s = connect_timeout_s
        self._connecting = 0
        """Requests waiting for the channel to connect, before their deadline starts (on the loop only)."""
        self._metadata = metadata
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edge-pipe", daemon=True)
        self._thread.start()
        self._closed = False
        # Touched on the pipe's loop only.
        self._pending: dict[str, _Pending] = {}
        self._stream: _Stream | None = None
        self._generations = itertools.count()
        self._seq = itertools.count()
        self._unary: set[asyncio.Task[None]] = set()
        try:
            self._channel = asyncio.run_coroutine_threadsafe(open_channel(), self._loop).result(10.0)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(1.0)
            raise
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def send(
        self, message: Any, timeout_s: float, finish: Finish, request_id: str = ""
    ) -> concurrent.futures.Future[RemoteResult]:
        """Queue ``message`` (a ModelInferRequest) and return its future: a RemoteResult, or a
        RemoteError once it fails or ``timeout_s`` passes."""
        future: concurrent.futures.Future[RemoteResult] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(_closed(self.address))
            return future
        pending = _Pending(message, future, finish, time.perf_counter() + timeout_s, timeout_s)
        try:
            self._loop.call_soon_threadsafe(self._start, pending, request_id)
        except RuntimeError:  # the loop was closed under us
            future.set_exception(_closed(self.address))
        return future

    def close(self) -> None:
        """Fail what is still pending (CANCELLED), close the channel and stop the thread."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5.0)
        except (concurrent.futures.TimeoutError, RuntimeError) as err:
            logger.debug("pipe to %s did not close cleanly: %s", self.address, err)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            retire(self._loop)

    # -- on the pipe's loop -----------------------------------------------------------

    def _start(self, pending: _Pending, request_id: str) -> None:
        if self._closed:
            pending.future.set_exception(_closed(self.address))
            return
        if len(self._pending) + self._connecting >= self.max_pending:
            pending.future.set_exception(
                RemoteError(
                    f"RESOURCE_EXHAUSTED: {self.max_pending} requests already wait on {self.address}",
                    status="RESOURCE_EXHAUSTED",
                )
            )
            return
        if self._channel.get_state(try_to_connect=True) is not grpc.ChannelConnectivity.READY:
            task = self._loop.create_task(self._connect_first(pending, request_id))
            self._unary.add(task)
            task.add_done_callback(self._unary.discard)
            return
        self._admit(pending, request_id)

    async def _connect_first(self, pending: _Pending, request_id: str) -> None:
        """Wait for the connection (its own deadline), then start the request's."""
        self._connecting += 1
        try:
            await until_connected(self._channel, self.connect_timeout_s, self.address)
        except RemoteError as err:
            pending.future.set_exception(err)
            return
        except asyncio.CancelledError:
            pending.future.set_exception(_closed(self.address))
            raise
        finally:
            self._connecting -= 1
        if self._closed:
            pending.future.set_exception(_closed(self.address))
            return
        pending.deadline = time.perf_counter() + pending.timeout_s
        self._admit(pending, request_id)

    def _admit(self, pending: _Pending, request_id: str) -> None:
        wire_id = f"{request_id[:_ID_CHARS]}#{next(self._seq):x}"
        pending.message.id = wire_id
        self._pending[wire_id] = pending
        pending.timer = self._loop.call_at(
            self._loop.time() + max(pending.deadline - time.perf_counter(), 0.0), self._expire, wire_id
        )
        self._dispatch(wire_id, pending)

    def _dispatch(self, wire_id: str, pending: _Pending) -> None:
        if self.streaming:
            stream = self._stream if self._stream is not None else self._open_stream()
            stream.outbox.put_nowait(wire_id)
        else:
            task = self._loop.create_task(self._unary_call(wire_id, pending))
            self._unary.add(task)
            task.add_done_callback(self._unary.discard)

    def _open_stream(self) -> _Stream:
        stream = _Stream(next(self._generations), self._stub.ModelStreamInfer(metadata=self._metadata))
        stream.tasks = [
            self._loop.create_task(self._write(stream)),
            self._loop.create_task(self._read(stream)),
        ]
        self._stream = stream
        return stream

    async def _write(self, stream: _Stream) -> None:
        while True:
            wire_id = await stream.outbox.get()
            pending = self._pending.get(wire_id)
            if pending is None:  # expired while queued
                continue
            pending.stream = stream.generation
            pending.written_at = time.perf_counter()
            try:
                await stream.call.write(pending.message)
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                # The stream is over; the reader finds out how, and settles what it held (this one too).
                return

    async def _read(self, stream: _Stream) -> None:
        answered = False
        while True:
            try:
                reply = await stream.call.read()
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._no_streaming(stream, "it refuses ModelStreamInfer")
                elif not answered:
                    # A new stream refused at once hides its status (gRPC reports INTERNAL): what it
                    # held goes as unary calls, and if one gets through, the server does not stream.
                    self._no_streaming(stream, "it refuses ModelStreamInfer", certain=False)
                else:
                    self._lost(stream, f"{err.code().name}: {err.details()}", status=err.code().name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a channel in a state gRPC did not expect
                self._lost(stream, f"the stream broke: {type(err).__name__}: {err}", status="INTERNAL")
                return
            if reply is grpc.aio.EOF:
                code = await stream.call.code()
                if code is grpc.StatusCode.UNIMPLEMENTED:
                    self._no_streaming(stream, "it refuses ModelStreamInfer")
                else:
                    status = "UNAVAILABLE" if code is grpc.StatusCode.OK else str(code.name)
                    self._lost(stream, f"edge server {self.address} ended the stream", status=status)
                return
            answered = True
            if not self._answer(stream, reply):
                return

    def _answer(self, stream: _Stream, reply: Any) -> bool:
        """Settle the request ``reply`` answers; False when the stream is of no use with this peer."""
        answer = read_answer(reply)
        if answer.foreign is not None:
            self._no_streaming(stream, answer.foreign)
            return False
        wire_id = self._match(stream, answer.request_id)
        if wire_id is not None:
            if answer.error is not None:
                self._fail(wire_id, answer.error)
            else:
                self._settle(wire_id, answer.response)
        return True

    def _match(self, stream: _Stream, wire_id: str) -> str | None:
        """The pending request an answer is for: by id; an answer without one (a peer that does not
        echo ids, or a request it could not read) goes to the oldest request on that stream."""
        if wire_id:
            return wire_id if wire_id in self._pending else None  # absent: it expired
        for key, pending in self._pending.items():
            if pending.stream == stream.generation:
                return key
        return None

    async def _unary_call(self, wire_id: str, pending: _Pending) -> None:
        pending.written_at = time.perf_counter()
        try:
            reply = await self._stub.ModelInfer(
                pending.message,
                timeout=max(pending.deadline - pending.written_at, 0.001),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            name = err.code().name
            self._fail(wire_id, RemoteError(f"{name}: {err.details()}", status=name))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._fail(wire_id, RemoteError(f"INTERNAL: {type(err).__name__}: {err}", status="INTERNAL"))
        else:
            if pending.probe and self.streaming:
                logger.info(
                    "edge server %s refuses ModelStreamInfer; sending unary ModelInfer calls", self.address
                )
                self.streaming = False
            self._settle(wire_id, reply)

    def _settle(self, wire_id: str, response: Any) -> None:
        pending = self._pop(wire_id)
        if pending is None:
            return
        call_ms = (time.perf_counter() - pending.written_at) * 1000.0
        try:
            result = pending.finish(response, call_ms)
        except RemoteError as err:
            _set(pending.future, error=err)
        except Exception as err:
            _set(pending.future, error=RemoteError(f"INTERNAL: {err}", status="INTERNAL"))
        else:
            _set(pending.future, result=result)

    def _fail(self, wire_id: str, error: RemoteError) -> None:
        pending = self._pop(wire_id)
        if pending is not None:
            _set(pending.future, error=error)

    def _pop(self, wire_id: str) -> _Pending | None:
        pending = self._pending.pop(wire_id, None)
        if pending is not None and pending.timer is not None:
            pending.timer.cancel()
        return pending

    def _expire(self, wire_id: str) -> None:
        self._fail(
            wire_id,
            RemoteError(
                f"DEADLINE_EXCEEDED: edge server {self.address} did not answer in time",
                status="DEADLINE_EXCEEDED",
            ),
        )

    def _held(self, stream: _Stream) -> list[str]:
        return [k for k, p in self._pending.items() if p.stream == stream.generation]

    def _retire(self, stream: _Stream) -> list[str]:
        """Forget ``stream``; the ids still queued on it, not yet written."""
        if self._stream is stream:
            self._stream = None
        current = asyncio.current_task()
        for task in stream.tasks:
            if task is not current:
                task.cancel()
        stream.call.cancel()
        queued: list[str] = []
        while not stream.outbox.empty():
            queued.append(stream.outbox.get_nowait())
        return [k for k in queued if k in self._pending]

    def _lost(self, stream: _Stream, reason: str, *, status: str = "UNAVAILABLE") -> None:
        """The stream is gone: fail the requests it held; send the ones not yet written on a new one."""
        queued = self._retire(stream)
        for wire_id in self._held(stream):
            self._fail(wire_id, RemoteError(f"{status}: {reason}", status=status))
        for wire_id in queued:
            self._dispatch(wire_id, self._pending[wire_id])

    def _no_streaming(self, stream: _Stream, why: str, *, certain: bool = True) -> None:
        """This peer does not stream in our dialect: what the stream held is sent again as unary calls,
        once. When ``certain``, every request from now on is; otherwise once one of those gets through."""
        if certain and self.streaming:
            logger.info("edge server %s: %s; sending unary ModelInfer calls", self.address, why)
            self.streaming = False
        queued = self._retire(stream)
        for wire_id in [*self._held(stream), *queued]:
            pending = self._pending[wire_id]
            if pending.resent:
                self._fail(wire_id, RemoteError(f"INTERNAL: {why}", status="INTERNAL"))
                continue
            pending.resent = True
            pending.stream = -1
            pending.probe = not certain
            task = self._loop.create_task(self._unary_call(wire_id, pending))
            self._unary.add(task)
            task.add_done_callback(self._unary.discard)

    async def _shutdown(self) -> None:
        for wire_id in list(self._pending):
            self._fail(wire_id, _closed(self.address))
        if self._stream is not None:
            self._retire(self._stream)
        for task in list(self._unary):
            task.cancel()
        await self._channel.close()
        await finish_tasks()  # gRPC's per-call status tasks among them


@dataclass(frozen=True, slots=True)
class Answer:
    """One ModelStreamInfer answer, read: the request it answers (its id, "" when the peer gave none)
    and its ModelInferResponse or its error; or, in ``foreign``, why this peer's stream cannot be
    read as ours (it answers with another message, as MLServer does)."""

    request_id: str = ""
    response: Any = None
    error: RemoteError | None = None
    foreign: str | None = None


def read_answer(reply: Any) -> Answer:
    """Read one stream answer, as both the one-at-a-time client and the pipe do."""
    if not isinstance(reply, pb.ModelStreamInferResponse):
        # gRPC hands back None when the bytes do not parse as our message.
        return Answer(foreign="its ModelStreamInfer answers cannot be read")
    has_response = reply.HasField("infer_response")
    request_id = reply.infer_response.id if has_response else ""
    if reply.error_message:
        status, detail = converters.stream_error_from_pb(reply.error_message)
        if status == "UNKNOWN" and not has_response and converters.stream_answer_is_foreign(reply):
            return Answer(foreign="its ModelStreamInfer answers are not ModelStreamInferResponse")
        return Answer(request_id, error=RemoteError(f"{status}: {detail}", status=status))
    if not has_response:
        return Answer(foreign="its ModelStreamInfer answers carry no infer_response")
    return Answer(request_id, response=reply.infer_response)


def _set(
    future: concurrent.futures.Future[RemoteResult],
    *,
    result: RemoteResult | None = None,
    error: BaseException | None = None,
) -> None:
    """Settle ``future`` unless its caller cancelled it."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except concurrent.futures.InvalidStateError:
        pass


def _closed(address: str) -> RemoteError:
    return RemoteError(f"CANCELLED: the client of {address} is closed", status="CANCELLED")
