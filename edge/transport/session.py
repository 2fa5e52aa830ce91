"""The one way a device talks to one edge server: a session, on one event loop and channel.

A :class:`Session` sends ``ModelInferRequest`` messages and settles each one's future with its
result or a :class:`~edge.errors.RemoteError`. It holds the whole dialect, once:

- requests travel on one long-lived ``ModelStreamInfer`` stream (a message on an open stream
  costs far less than a new call), several at once, matched to their answers by ``id``;
- each request keeps its own deadline: one that expires fails alone (``DEADLINE_EXCEEDED``) and
  its late answer is dropped. The requests after it go on a new stream, as the old one may be
  stuck behind it (a server that answers in order, or a hung one); the old one is closed once
  what it holds is answered;
- a stream that ends or breaks fails only the requests it held (the device finishes those
  locally); requests not yet written go on a new one;
- a server without a readable stream (MLServer, KServe) gets unary ``ModelInfer`` calls instead,
  and what the stream held is sent again that way, once. That finding is the server's
  :class:`ServerTraits`, shared by every session of one client;
- requests for one cut that queue up go as one stacked message (:data:`edge.wire.STACK`) to a server
  that takes them: what a message costs both sides is paid once for all of them. The answer is split
  again, each request settled with exactly its own outputs. To such a server a request that could be
  stacked waits while two messages of its stream await answers (one computing, one travelling), so
  what a pipelining device queues meanwhile goes with it.

Who drives the loop is the caller's choice: :class:`~edge.transport.client.TailClient` runs a
session on the calling thread's own loop for one request at a time (no thread hand-off), and on a
thread of its own for requests in flight while the device works on (pipelining). The call time
runs from the moment a request is written to its answer, so time behind other requests in the
device's write queue is not counted as transfer, and time behind them on the server is its
``queue_us``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from .. import wire
from ..aio import finish_tasks
from ..errors import RemoteError
from ..protocol import converters, pb, pb_grpc
from ..wire import encodings, packed
from .base import RemoteResult
from .connect import until_connected

__all__ = ["MAX_PENDING", "MAX_STACK_BYTES", "Answer", "Request", "ServerTraits", "Session", "read_answer"]

logger = logging.getLogger(__name__)

MAX_PENDING = 256
"""Requests one session holds at most; past it a request fails at once (RESOURCE_EXHAUSTED)."""

MAX_STACK_BYTES = 256 * 1024
"""The most tensor bytes one stacked message carries: well under the smallest message bound edge-server
sets (1 MiB), whatever the models it serves."""

HOLD_BEHIND = 2
"""To a server that takes stacks, a request that can be stacked waits while this many messages on its
stream await answers, and goes stacked with what queued meanwhile."""

_ID_CHARS = 200
"""How much of the caller's request id goes on the wire, ahead of the session's own sequence number."""

Finish = Callable[[Any, float], RemoteResult]
"""Turns a ModelInferResponse and the call's milliseconds into the caller's result."""

AnyFuture = asyncio.Future[RemoteResult] | concurrent.futures.Future[RemoteResult]


@dataclass(slots=True)
class ServerTraits:
    """What one server is, as its metadata and its answers say; one record per client."""

    codecs: tuple[str, ...] = ()
    """The codecs it decodes."""
    packed: bool = False
    """It takes, and answers with, packed tensors (:mod:`edge.wire.packed`)."""
    cut_models: frozenset[str] = frozenset()
    """``NAME@K``: the tails it serves under a name of their own."""
    stream_window: int | None = None
    """The requests one stream may hold; None when it names none."""
    max_stack: int = 1
    """The most requests it takes stacked in one message (1: none)."""
    streaming: bool = True
    """Requests go on a stream; False once the server turned out not to stream in our dialect."""

    def read(self, extensions: tuple[str, ...]) -> None:
        """Take what the server's metadata ``extensions`` say (``streaming`` is learnt from answers)."""
        prefix = wire.CUT_MODEL_PREFIX
        self.codecs = encodings.offered(extensions)
        self.packed = packed.EXTENSION in extensions
        self.cut_models = frozenset(e[len(prefix) :] for e in extensions if e.startswith(prefix))
        self.stream_window = wire.stream_window(extensions)
        self.max_stack = wire.max_stack(extensions)


@dataclass(slots=True)
class Request:
    """One request in a session: its message, its future, and what turns its answer into a result."""

    message: Any
    future: AnyFuture
    finish: Finish
    timeout_s: float
    request_id: str = ""
    deadline: float = 0.0
    timer: asyncio.TimerHandle | None = None
    written_at: float = 0.0
    stream: int = -1
    """The stream it was written on (its generation); -1 while queued or sent unary."""
    resent: bool = False
    probe: bool = False
    """Sent unary because a new stream failed at once: its success means the server does not stream."""
    wake: Callable[[AnyFuture], None] | None = None
    """Called once the future is settled (:func:`_set`): a calling thread's lane stops its loop there,
    in the same turn of the loop, instead of one more turn later (as a done callback would)."""
    _key: tuple[object, ...] | bool | None = False
    """:meth:`stack_key`, once read (False: not yet)."""

    def stack_key(self) -> tuple[object, ...] | None:
        """What requests must share to go stacked with this one (:func:`_stack_key`), read once."""
        if self._key is False:
            self._key = _stack_key(self.message)
        return self._key  # type: ignore[return-value]


@dataclass(slots=True)
class _Stream:
    generation: int
    call: Any
    outbox: deque[str] = field(default_factory=deque)
    """The ids of requests queued for it, in order, not yet taken by its writer."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    carry: str | None = None
    """A request taken from the outbox that did not stack with the ones before it: written next."""
    stacks: dict[str, list[str]] = field(default_factory=dict)
    """The requests each stacked message written on it carries, by the message's id."""
    unanswered: int = 0
    """Messages written on it whose answers have not come."""
    wake: asyncio.Future[None] | None = None
    """What its writer awaits while the outbox is empty or it holds a request back: settled by
    :meth:`nudge` (a request queued, an answer come); the writer looks again either way."""

    def nudge(self) -> None:
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def take_queued(self) -> list[str]:
        """Empty the outbox (and the carried request): what was queued here and not yet written."""
        queued = [self.carry] if self.carry is not None else []
        self.carry = None
        queued.extend(self.outbox)
        self.outbox.clear()
        return queued


class Session:
    """Requests to ``address`` over ``channel``, on the loop the channel was made on.

    Every method runs on that loop; :meth:`start` is the only way in for a request. ``metadata``
    goes on every call (:func:`edge.credentials.bearer_metadata`); ``traits`` is the server's record
    (``streaming`` False sends unary calls from the start).
    """

    def __init__(
        self,
        address: str,
        channel: grpc.aio.Channel,
        traits: ServerTraits,
        loop: asyncio.AbstractEventLoop,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
        max_pending: int = MAX_PENDING,
        connect_timeout_s: float,
        reopen: Callable[[], grpc.aio.Channel] | None = None,
    ) -> None:
        self.address = address
        self.channel = channel
        self.loop = loop
        """The loop ``channel`` is bound to."""
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.traits = traits
        self.metadata = metadata
        self.max_pending = max_pending
        self.connect_timeout_s = connect_timeout_s
        self.reopen = reopen
        """Makes a new channel to ``address`` on ``loop``: what a connect after a failed one uses."""
        self.closed = False
        self._connecting = 0
        """Requests waiting for the channel to connect, before their deadline starts."""
        self._pending: dict[str, Request] = {}
        self._stream: _Stream | None = None
        self._draining: dict[int, _Stream] = {}
        """Streams no new request goes on (one missed a deadline), closed once they hold nothing."""
        self._generations = itertools.count()
        self._seq = itertools.count()
        self._calls: set[asyncio.Task[None]] = set()

    def start(self, request: Request) -> None:
        """Take ``request``: connect first if need be (within the connect timeout, before its own
        deadline starts), then send it on the stream or as a unary call."""
        if self.closed:
            _set(request, error=closed(self.address))
            return
        if len(self._pending) + self._connecting >= self.max_pending:
            error = RemoteError(
                f"RESOURCE_EXHAUSTED: {self.max_pending} requests already wait on {self.address}",
                status="RESOURCE_EXHAUSTED",
            )
            _set(request, error=error)
            return
        if self.channel.get_state(try_to_connect=True) is not grpc.ChannelConnectivity.READY:
            self._spawn(self._connect_first(request))
            return
        self._admit(request)

    def start_on_open_stream(self, request: Request) -> bool:
        """:meth:`start`, called by the thread that runs the loop while the loop is not running, so the
        request needs no turn of the loop to be taken; only onto a stream already open (opening one,
        or connecting, needs the loop running). False: nothing was done, use :meth:`start`."""
        if (
            self._stream is None
            or self.closed
            or not self.traits.streaming
            or len(self._pending) + self._connecting >= self.max_pending
            # gRPC's own view, current without the loop: a server that went away (its streams end
            # with it) is seen by the loop's turn in start, not by writing onto the stream it ended.
            or self.channel.get_state() is not grpc.ChannelConnectivity.READY
        ):
            return False
        self._admit(request)
        return True

    async def unary(self, method: str, message: Any, timeout_s: float) -> Any:
        """A unary call other than inference (metadata, readiness), connected first; RemoteError on failure."""
        await self._connected()
        try:
            return await getattr(self.stub, method)(message, timeout=timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as err:
            raise RemoteError(f"{err.code().name}: {err.details()}", status=err.code().name) from err

    async def close(self) -> None:
        """Fail what is still pending (CANCELLED) and close the channel."""
        self.closed = True
        for wire_id in list(self._pending):
            self._fail(wire_id, closed(self.address))
        for stream in [*self._draining.values(), *([self._stream] if self._stream is not None else [])]:
            self._retire(stream)
        for task in list(self._calls):
            task.cancel()
        await self.channel.close()
        await finish_tasks()  # gRPC's per-call status tasks among them

    # -- sending ------------------------------------------------------------------------

    def _spawn(self, work: Any) -> None:
        task = self.loop.create_task(work)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _connected(self) -> None:
        """Return once the channel is ready, or raise RemoteError (UNAVAILABLE).

        gRPC keeps a channel whose connection failed in TRANSIENT_FAILURE until it connects, and tries
        again only as its backoff allows (up to 2 s later): a server that has come up meanwhile would
        still be refused at once. A new channel tries now, so that is what a connect after a failed
        one uses (a refused connection still fails at once, so the device finishes locally)."""
        state = self.channel.get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.READY:
            return
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and self.reopen is not None:
            old, self.channel = self.channel, self.reopen()
            self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
            await old.close()
        await until_connected(self.channel, self.connect_timeout_s, self.address)

    async def _connect_first(self, request: Request) -> None:
        self._connecting += 1
        try:
            await self._connected()
        except RemoteError as err:
            _set(request, error=err)
            return
        except asyncio.CancelledError:
            _set(request, error=closed(self.address))
            raise
        finally:
            self._connecting -= 1
        if self.closed:
            _set(request, error=closed(self.address))
            return
        self._admit(request)

    def _admit(self, request: Request) -> None:
        wire_id = f"{request.request_id[:_ID_CHARS]}#{next(self._seq):x}"
        request.message.id = wire_id
        request.deadline = time.perf_counter() + request.timeout_s
        self._pending[wire_id] = request
        request.timer = self.loop.call_later(request.timeout_s, self._expire, wire_id)
        self._dispatch(wire_id, request)

    def _dispatch(self, wire_id: str, request: Request) -> None:
        if self.traits.streaming:
            stream = self._stream if self._stream is not None else self._open_stream()
            stream.outbox.append(wire_id)
            stream.nudge()
        else:
            self._spawn(self._unary_infer(wire_id, request))

    def _open_stream(self) -> _Stream:
        loop = self.loop
        stream = _Stream(next(self._generations), self.stub.ModelStreamInfer(metadata=self.metadata))
        stream.tasks = [loop.create_task(self._write(stream)), loop.create_task(self._read(stream))]
        self._stream = stream
        return stream

    async def _write(self, stream: _Stream) -> None:
        while True:
            if stream.carry is None:
                while not stream.outbox:
                    stream.wake = self.loop.create_future()
                    await stream.wake
                stream.carry = stream.outbox.popleft()
            if self.traits.max_stack > 1 and stream.unanswered >= HOLD_BEHIND:
                await self._hold(stream)
            if stream.carry is None:  # taken meanwhile, to go on another stream
                continue
            wire_id, stream.carry = stream.carry, None
            request = self._pending.get(wire_id)
            if request is None:  # expired while queued
                continue
            stream.unanswered += 1
            message, members = self._stacked(stream, request) if stream.outbox else (None, [])
            written_at = time.perf_counter()
            for member in members or (request,):
                member.stream = stream.generation
                member.written_at = written_at
            try:
                await stream.call.write(message if message is not None else request.message)
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                # The stream is over; the reader finds out how, and settles what it held (this one too).
                return

    async def _hold(self, stream: _Stream) -> None:
        """Hold the next request (``stream.carry``, where a new stream finds it) while
        :data:`HOLD_BEHIND` messages on ``stream`` await their answers, when the server takes stacks
        and the request can be stacked: what queues meanwhile goes with it, in one message. The
        server would have held it behind those anyway; with two in flight, one computes while the
        next travels. The writer calls it only when the server takes stacks and that many await."""
        request = self._pending.get(stream.carry) if stream.carry is not None else None
        if request is None or request.stack_key() is None:
            return
        while stream.unanswered >= HOLD_BEHIND and stream.carry is not None:
            stream.wake = self.loop.create_future()
            await stream.wake

    def _stacked(self, stream: _Stream, first: Request) -> tuple[Any, list[Request]]:
        """``first`` and the requests queued after it for the same cut, as one stacked message (and
        its members), when the server takes them and more than one stacks; else (None, [])."""
        limit = self.traits.max_stack
        key = first.stack_key() if limit > 1 else None
        if key is None:
            return None, []
        members = [first]
        nbytes = sum(map(len, first.message.raw_input_contents))
        while len(members) < limit and stream.outbox:
            wire_id = stream.outbox.popleft()
            request = self._pending.get(wire_id)
            if request is None:  # expired while queued
                continue
            size = sum(map(len, request.message.raw_input_contents))
            if nbytes + size > MAX_STACK_BYTES or request.stack_key() != key:
                stream.carry = wire_id  # written next, on its own or at the head of the next stack
                break
            members.append(request)
            nbytes += size
        if len(members) == 1:
            return None, []
        stack_id = f"stack#{next(self._seq):x}"
        stream.stacks[stack_id] = [m.message.id for m in members]
        return _stack_message(stack_id, [m.message for m in members]), members

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

    async def _unary_infer(self, wire_id: str, request: Request) -> None:
        request.written_at = time.perf_counter()
        try:
            reply = await self.stub.ModelInfer(
                request.message,
                timeout=max(request.deadline - request.written_at, 0.001),
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as err:
            name = err.code().name
            self._fail(wire_id, RemoteError(f"{name}: {err.details()}", status=name))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._fail(wire_id, RemoteError(f"INTERNAL: {type(err).__name__}: {err}", status="INTERNAL"))
        else:
            if request.probe and self.traits.streaming:
                logger.info(
                    "edge server %s refuses ModelStreamInfer; sending unary ModelInfer calls", self.address
                )
                self.traits.streaming = False
            self._settle(wire_id, reply)

    # -- answers ------------------------------------------------------------------------

    def _answer(self, stream: _Stream, reply: Any) -> bool:
        """Settle the request ``reply`` answers; False when the stream is of no use with this peer."""
        stream.unanswered = max(0, stream.unanswered - 1)
        stream.nudge()
        answer = read_answer(reply)
        if answer.foreign is not None:
            self._no_streaming(stream, answer.foreign)
            return False
        members = stream.stacks.pop(answer.request_id, None) if answer.request_id else None
        if members is not None:
            self._answer_stack(members, answer)
            return True
        wire_id = self._match(stream, answer.request_id)
        if wire_id is not None:
            if answer.error is not None:
                self._fail(wire_id, answer.error)
            else:
                self._settle(wire_id, answer.response)
        return True

    def _answer_stack(self, members: list[str], answer: Answer) -> None:
        """Settle each request a stacked message carried, with its own slice of the answer."""
        if answer.error is not None:
            for wire_id in members:
                self._fail(wire_id, answer.error)
            return
        try:
            replies = _unstack(answer.response, members)
        except ValueError as err:
            error = RemoteError(
                f"INTERNAL: edge server {self.address} sent a stacked answer that cannot be read: {err}",
                status="INTERNAL",
            )
            for wire_id in members:
                self._fail(wire_id, error)
            return
        for wire_id, reply in zip(members, replies, strict=True):
            self._settle(wire_id, reply)

    def _match(self, stream: _Stream, wire_id: str) -> str | None:
        """The pending request an answer is for: by id; an answer without one (a peer that does not
        echo ids, or a request it could not read) goes to the oldest request on that stream."""
        if wire_id:
            return wire_id if wire_id in self._pending else None  # absent: it expired
        for key, request in self._pending.items():
            if request.stream == stream.generation:
                return key
        return None

    def _settle(self, wire_id: str, response: Any) -> None:
        request = self._pop(wire_id)
        if request is None:
            return
        call_ms = (time.perf_counter() - request.written_at) * 1000.0
        try:
            result = request.finish(response, call_ms)
        except RemoteError as err:
            _set(request, error=err)
        except Exception as err:
            _set(request, error=RemoteError(f"INTERNAL: {err}", status="INTERNAL"))
        else:
            _set(request, result=result)

    def _fail(self, wire_id: str, error: RemoteError) -> None:
        request = self._pop(wire_id)
        if request is not None:
            _set(request, error=error)

    def _pop(self, wire_id: str) -> Request | None:
        request = self._pending.pop(wire_id, None)
        if request is None:
            return None
        if request.timer is not None:
            request.timer.cancel()
        old = self._draining.get(request.stream)
        if old is not None and not self._held(old):
            self._retire(old)
        return request

    def _expire(self, wire_id: str) -> None:
        request = self._pending.get(wire_id)
        timeout = request.timeout_s if request is not None else 0.0
        stream = self._stream
        if request is not None and stream is not None and request.stream == stream.generation:
            self._abandon(stream)
        self._fail(
            wire_id,
            RemoteError(
                f"DEADLINE_EXCEEDED: edge server {self.address} did not answer within {timeout:g}s",
                status="DEADLINE_EXCEEDED",
            ),
        )

    # -- streams that end ---------------------------------------------------------------

    def _abandon(self, stream: _Stream) -> None:
        """No new request goes on ``stream``: the ones queued on it and not yet written go on a new
        one; it stays open for those it holds, and is closed once they are answered or expire."""
        self._stream = None
        self._draining[stream.generation] = stream
        for wire_id in stream.take_queued():
            request = self._pending.get(wire_id)
            if request is not None:
                self._dispatch(wire_id, request)

    def _held(self, stream: _Stream) -> list[str]:
        return [k for k, r in self._pending.items() if r.stream == stream.generation]

    def _retire(self, stream: _Stream) -> list[str]:
        """Forget ``stream``; the ids still queued on it, not yet written."""
        if self._stream is stream:
            self._stream = None
        self._draining.pop(stream.generation, None)
        current = asyncio.current_task()
        for task in stream.tasks:
            if task is not current:
                task.cancel()
        stream.call.cancel()
        return [k for k in stream.take_queued() if k in self._pending]

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
        if certain and self.traits.streaming:
            logger.info("edge server %s: %s; sending unary ModelInfer calls", self.address, why)
            self.traits.streaming = False
        queued = self._retire(stream)
        for wire_id in [*self._held(stream), *queued]:
            request = self._pending[wire_id]
            if request.resent:
                self._fail(wire_id, RemoteError(f"INTERNAL: {why}", status="INTERNAL"))
                continue
            request.resent = True
            request.stream = -1
            request.probe = not certain
            self._spawn(self._unary_infer(wire_id, request))


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
    """Read one stream answer."""
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


def _stack_key(message: Any) -> tuple[object, ...] | None:
    """What requests must share to go stacked in one message: model, parameters and raw tensors of a
    first axis of 1 (same names, types and shapes); None for one that cannot be stacked (the whole
    model, a profile, compressed tensors, a tensor with no sample axis)."""
    params = message.parameters
    if (
        wire.SPLIT_POINT not in params
        or wire.STACK in params
        or wire.PROFILE in params
        or wire.PING in params
    ):
        return None
    inputs = message.inputs
    if len(message.raw_input_contents) != len(inputs):
        return None
    shapes = []
    for tensor in inputs:
        if tensor.parameters or not tensor.shape or tensor.shape[0] != 1:
            return None  # an encoded tensor's bytes cannot be joined with another's
        shapes.append((tensor.name, tensor.datatype, tuple(tensor.shape)))
    settings = sorted(
        (name, value.SerializeToString(deterministic=True))
        for name, value in params.items()
        if name != wire.ACCEPT_ENCODING
    )
    return (message.model_name, message.model_version, tuple(settings), tuple(shapes), tuple(message.outputs))


def _stack_message(stack_id: str, messages: list[Any]) -> Any:
    """One ModelInferRequest carrying ``messages`` (which share a :func:`_stack_key`) stacked."""
    first = messages[0]
    stacked = pb.ModelInferRequest(
        model_name=first.model_name, model_version=first.model_version, id=stack_id, outputs=first.outputs
    )
    for name, value in first.parameters.items():
        if name != wire.ACCEPT_ENCODING:  # the answer comes raw, to be split
            stacked.parameters[name].CopyFrom(value)
    stacked.parameters[wire.STACK].int64_param = len(messages)
    for i, tensor in enumerate(first.inputs):
        stacked.inputs.add(
            name=tensor.name, datatype=tensor.datatype, shape=[len(messages), *tensor.shape[1:]]
        )
        stacked.raw_input_contents.append(b"".join(m.raw_input_contents[i] for m in messages))
    return stacked


def _unstack(response: Any, members: list[str]) -> list[Any]:
    """A stacked message's answer as one ModelInferResponse per member, in order; ValueError when it
    is not the answer of that many samples in raw tensors."""
    count = len(members)
    said = response.parameters.get(wire.STACK)
    if said is None or said.int64_param != count:
        raise ValueError(f"it names {said.int64_param if said is not None else 'no'} samples, not {count}")
    outputs, contents = response.outputs, response.raw_output_contents
    if len(contents) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs with {len(contents)} raw contents")
    for tensor, data in zip(outputs, contents, strict=True):
        if tensor.parameters or not tensor.shape or tensor.shape[0] != count or len(data) % count:
            raise ValueError(f"output {tensor.name[:80]!r} is not {count} raw samples")
    replies = []
    for i, wire_id in enumerate(members):
        reply = pb.ModelInferResponse(
            model_name=response.model_name, model_version=response.model_version, id=wire_id
        )
        for name, value in response.parameters.items():
            reply.parameters[name].CopyFrom(value)  # edge_stack among them: its call carried them all
        reply.parameters[wire.BATCH_SIZE].int64_param = count  # compute_us is the stack's
        for tensor, data in zip(outputs, contents, strict=True):
            size = len(data) // count
            reply.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[1, *tensor.shape[1:]])
            reply.raw_output_contents.append(data[i * size : (i + 1) * size])
        replies.append(reply)
    return replies


def _set(request: Request, *, result: RemoteResult | None = None, error: BaseException | None = None) -> None:
    """Settle ``request``'s future unless its caller cancelled it, then call its ``wake``: every
    request is settled here, so a lane's loop always stops in the turn that settles its request."""
    future = request.future
    if not future.done():
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]
        except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
            pass
    if request.wake is not None:
        request.wake(future)


def closed(address: str) -> RemoteError:
    return RemoteError(f"CANCELLED: the client of {address} is closed", status="CANCELLED")
