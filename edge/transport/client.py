"""A gRPC client for the Open Inference Protocol, tuned for one request at a time.

Tail requests travel on one long-lived ``ModelStreamInfer`` stream: a message on an open
stream costs far less than a new call. A server without streaming (KServe, MLServer) gets
unary ``ModelInfer`` calls instead, chosen on its first UNIMPLEMENTED answer.

The client is synchronous. It drives a grpc.aio channel on a private event loop in the
calling thread, so a request pays no thread hand-off and every request has its own deadline.

Errors come back as :class:`~edge.errors.RemoteError` carrying the gRPC status name, so the
caller can decide to finish locally without importing grpc.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from .. import compression, packed, wire
from ..codec import InferRequest, ModelMetadata, ParameterValue, decode, encode
from ..errors import ConfigError, EdgeError, RemoteError
from ..protocol import converters, pb, pb_grpc
from ..tlsfiles import check_ca, check_pair
from .base import RemoteResult
from .connect import DEFAULT_CONNECT_TIMEOUT_S, channel_options, until_connected
from .loops import finish_tasks, retire
from .pipe import Pipe, read_answer

__all__ = ["TLSOptions", "TailClient", "read_token"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """TLS for the channel: a CA to trust, and a client certificate for mTLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as err:
                raise ConfigError(f"cannot read TLS file {path}: {err.strerror or err}") from err

        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("TLS needs both cert_file and key_file for a client certificate, or neither")
        roots, key, chain = read(self.ca_file), read(self.key_file), read(self.cert_file)
        if self.ca_file is not None:
            check_ca(Path(self.ca_file), what="TLS CA")
        if self.cert_file is not None and self.key_file is not None:
            check_pair(Path(self.cert_file), Path(self.key_file), what="client TLS")
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def read_token(path: Path) -> str:
    """A bearer token from the first line of ``path``; ConfigError naming the file otherwise."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"cannot read the token file {path}: {getattr(err, 'strerror', None) or err}"
        ) from err
    token = lines[0].strip() if lines else ""
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"the token file {path} must hold the token on its first line")
    return token


@dataclass(slots=True)
class _Lane:
    """One thread's way to the server: its own event loop, channel and open stream.

    grpc.aio binds a channel to the loop it was made on, and a loop runs in one thread at a
    time; a lane per thread lets threads call at once, and no lock is held across a call.
    """

    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel
    stub: Any
    stream: Any = None
    """The open ModelStreamInfer call, if any."""
    closed: bool = False

    def drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None


@dataclass(frozen=True, slots=True)
class _Traits:
    """What a server's metadata extensions say about it."""

    codecs: tuple[str, ...]
    """The codecs it decodes."""
    packed: bool
    """It takes, and answers with, packed tensors (:mod:`edge.packed`)."""
    cut_models: frozenset[str]
    """``NAME@K``: the tails it serves under a name of their own."""
    stream_window: int | None
    """The requests one stream may hold; None when it names none."""

    @classmethod
    def of(cls, extensions: tuple[str, ...]) -> _Traits:
        prefix = wire.CUT_MODEL_PREFIX
        return cls(
            codecs=compression.offered(extensions),
            packed=packed.EXTENSION in extensions,
            cut_models=frozenset(e[len(prefix) :] for e in extensions if e.startswith(prefix)),
            stream_window=wire.stream_window(extensions),
        )


class TailClient:
    """Talks to one edge server; a :class:`~edge.transport.base.TailTransport`.

    Safe to share between threads: each calling thread gets a lane of its own (a loop, a
    channel and a stream), so calls from several threads run at once. ``streaming`` False sends
    every request as a unary ModelInfer call. ``token`` is sent as ``authorization: Bearer TOKEN``
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
        codec: str = "raw",
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
        if balance:
            streaming = False
        if codec != "raw" and codec not in compression.available():
            raise ConfigError(
                f"codec {codec!r} is not available here (pip install zstandard lz4); "
                f"choose one of: raw, {', '.join(compression.available()) or '(none installed)'}"
            )
        self.codec = codec
        """Lossless codec for the tensors sent, once the server says it decodes it (else raw)."""
        self._traits_read: _Traits | None = None
        self._pipe: Pipe | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {token}"),) if token else None
        )
        self.timeout_s = timeout_s
        self.streaming = streaming
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
        # Guards _lanes and _closed only: taken to add or close lanes, never during a call.
        self._lock = threading.Lock()
        self._lanes: list[_Lane] = []
        self._closed = False
        self._lane()  # the constructing thread's lane, made now: a bad address fails here

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> RemoteResult:
        """Send ``inputs`` to ``model``; raises RemoteError with the gRPC status name on failure.

        With a ``codec`` the server decodes, the tensors go compressed (each only if that makes it
        smaller), and the server may compress large outputs too."""
        message, finish = self._request(model, inputs, parameters, request_id)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        lane = self._lane()
        self._connected(lane)
        started = time.perf_counter()
        reply = self._run(lane, self._infer(lane, message, timeout), timeout)
        return finish(reply, (time.perf_counter() - started) * 1000.0)

    def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> Future[RemoteResult]:
        """:meth:`infer` without waiting: the request goes on the client's pipe (one stream with
        several requests in flight), and the future holds its RemoteResult or RemoteError."""
        try:
            message, finish = self._request(model, inputs, parameters, request_id)
            pipe = self._open_pipe()
        except RemoteError as err:  # the server's metadata could not be had: this request's failure
            failed: Future[RemoteResult] = Future()
            failed.set_exception(err)
            return failed
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        return pipe.send(message, timeout, finish, request_id)

    def max_inflight(self) -> int | None:
        """The requests the server lets one stream hold (its metadata's stream window); None when it
        names none. Raises RemoteError when the server cannot be asked."""
        return self._traits().stream_window

    def _request(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, ParameterValue] | None,
        request_id: str,
    ) -> tuple[Any, Callable[[Any, float], RemoteResult]]:
        """The ModelInferRequest for ``inputs``, and what turns its answer into a RemoteResult."""
        tensors = tuple(encode(name, array) for name, array in inputs.items())
        params = dict(parameters or {})
        codec = self._codec()
        lossy = False
        if codec != "raw":
            tensors = tuple(compression.compress(tensor, codec) for tensor in tensors)
            if codec in compression.CODECS:
                params[wire.ACCEPT_ENCODING] = codec
            else:
                lossy = any(t.parameters.get(wire.ENCODING) == codec for t in tensors)
        bytes_sent = sum(t.nbytes for t in tensors)
        traits = self._traits()
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
            return RemoteResult(
                outputs=outputs,
                parameters=response.parameters,
                call_ms=call_ms,
                bytes_sent=bytes_sent,
                lossy=lossy,
                server=self.address,
            )

        return converters.infer_request_to_pb(request), finish

    def _traits(self) -> _Traits:
        """What the server's metadata says of it, asked once (a failure is the caller's RemoteError)."""
        if self._traits_read is None:
            try:
                reply = self._unary_call("ServerMetadata", pb.ServerMetadataRequest(), None)
            except RemoteError as err:
                if err.status != "UNIMPLEMENTED":
                    raise
                extensions: tuple[str, ...] = ()  # a peer without it lists nothing: plain tensors, raw
            else:
                extensions = tuple(reply.extensions)
            self._traits_read = _Traits.of(extensions)
            if self.codec != "raw" and self.codec not in self._traits_read.codecs:
                logger.warning(
                    "edge server %s does not decode %s; sending raw tensors", self.address, self.codec
                )
        return self._traits_read

    def _open_pipe(self) -> Pipe:
        with self._lock:
            if self._closed:
                raise RemoteError(f"CANCELLED: the client of {self.address} is closed", status="CANCELLED")
            if self._pipe is None:
                self._pipe = Pipe(
                    self.address,
                    functools.partial(_open_channel, self.address, self._credentials, self._options),
                    metadata=self._metadata,
                    streaming=self.streaming,
                    connect_timeout_s=self.connect_timeout_s,
                )
            return self._pipe

    def _codec(self) -> str:
        """``codec`` if the server lists it among the codecs it decodes; raw otherwise (an older server).
        A failure to ask is the request's failure too: RemoteError, and the caller falls back."""
        if self.codec == "raw":
            return "raw"
        return self.codec if self.codec in self._traits().codecs else "raw"

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
            self._run(lane, lane.channel.channel_ready(), timeout_s)
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
        if pipe is not None:
            pipe.close()
        for lane in lanes:
            if lane.closed:
                continue
            lane.loop.run_until_complete(_close_lane(lane))
            lane.closed = True
            retire(lane.loop)

    def __enter__(self) -> TailClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _lane(self) -> _Lane:
        lane: _Lane | None = getattr(self._local, "lane", None)
        if lane is not None and not lane.closed:
            return lane
        if self._closed:
            raise RemoteError(f"CANCELLED: the client of {self.address} is closed", status="CANCELLED")
        loop = asyncio.new_event_loop()
        channel = loop.run_until_complete(_open_channel(self.address, self._credentials, self._options))
        lane = _Lane(loop, channel, pb_grpc.GRPCInferenceServiceStub(channel))
        with self._lock:
            closed = self._closed
            if not closed:
                self._lanes.append(lane)
        if closed:
            loop.run_until_complete(channel.close())
            retire(loop)
            raise RemoteError(f"CANCELLED: the client of {self.address} is closed", status="CANCELLED")
        self._local.lane = lane
        return lane

    def _connected(self, lane: _Lane) -> None:
        """Connect first, within ``connect_timeout_s``: a call's own deadline starts once it is set up."""
        if lane.channel.get_state(try_to_connect=True) is not grpc.ChannelConnectivity.READY:
            work = until_connected(lane.channel, self.connect_timeout_s, self.address)
            self._run(lane, work, self.connect_timeout_s + 1.0)

    def _run(self, lane: _Lane, work: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``work`` on the lane's loop, within ``timeout_s``.

        Whatever goes wrong on the way, the caller gets a RemoteError: the device then finishes locally.
        """
        loop = lane.loop
        if lane.closed or _in_coroutine():
            work.close()
            if lane.closed:
                raise RemoteError(f"CANCELLED: the client of {self.address} is closed", status="CANCELLED")
            raise RuntimeError("TailClient is synchronous: call it from a thread, not from a coroutine")
        # A timer that cancels the task: lighter than asyncio.wait_for, which wraps it in a second task.
        task = loop.create_task(work)
        timer = loop.call_later(timeout_s, task.cancel)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError as err:
            lane.drop_stream()  # an answer may still be on its way: never read it as the next one's
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
            lane.drop_stream()
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
        self._connected(lane)

        async def call() -> Any:  # grpc.aio makes the call on the running loop, so inside it
            return await getattr(lane.stub, method)(message, timeout=timeout, metadata=self._metadata)

        return self._run(lane, call(), timeout)

    async def _infer(self, lane: _Lane, message: Any, timeout_s: float) -> Any:
        if self.streaming:
            try:
                return await self._exchange(lane, message)
            except _NoStreamingError as err:
                # If a unary call gets through, the server does not stream, or not in our dialect.
                reply = await lane.stub.ModelInfer(message, timeout=timeout_s, metadata=self._metadata)
                logger.info("edge server %s: %s; sending unary ModelInfer calls", self.address, err)
                self.streaming = False
                return reply
        return await lane.stub.ModelInfer(message, timeout=timeout_s, metadata=self._metadata)

    async def _exchange(self, lane: _Lane, message: Any) -> Any:
        """One request and its answer on the lane's open stream, opening it first if need be."""
        fresh = lane.stream is None or lane.stream.done()
        if fresh:
            lane.stream = lane.stub.ModelStreamInfer(metadata=self._metadata)
        stream = lane.stream
        try:
            await stream.write(message)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as err:
            # The stream ended before this request went out. An old one may simply be gone (the
            # server restarted): send on a new one. A new one refused at once hides its status
            # (gRPC reports INTERNAL), so let the caller find out with a unary call.
            lane.stream = None
            if fresh:
                raise _NoStreamingError("it refuses ModelStreamInfer") from err
            return await self._exchange(lane, message)
        try:
            reply = await stream.read()
        except grpc.aio.AioRpcError as err:
            lane.stream = None
            if err.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise _NoStreamingError("it refuses ModelStreamInfer") from err
            raise
        if reply is grpc.aio.EOF:
            lane.stream = None
            status = await self._ended(stream)
            raise RemoteError(f"{status}: edge server {self.address} ended the stream", status=status)
        answer = read_answer(reply)
        if answer.foreign is not None:  # the stream is of no use with this peer (MLServer's, for one)
            lane.drop_stream()
            raise _NoStreamingError(answer.foreign)
        if answer.error is not None:
            raise answer.error
        return answer.response

    @staticmethod
    async def _ended(stream: Any) -> str:
        """The status a finished stream ended with (OK reads as UNAVAILABLE: it is gone)."""
        code = await stream.code()
        if code is grpc.StatusCode.UNIMPLEMENTED:
            raise _NoStreamingError("it refuses ModelStreamInfer")
        return "UNAVAILABLE" if code is grpc.StatusCode.OK else str(code.name)


class _NoStreamingError(Exception):
    """The server answered ModelStreamInfer with UNIMPLEMENTED, refused a new stream at once, or
    answered on it in a form this client cannot read."""


def _in_coroutine() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _close_lane(lane: _Lane) -> None:
    lane.drop_stream()
    await lane.channel.close()
    await finish_tasks()


async def _open_channel(
    address: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int | str]]
) -> grpc.aio.Channel:
    """Create the channel inside the private loop, which it binds to."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)
