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
import logging
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from ..codec import InferRequest, ModelMetadata, ParameterValue, decode, encode
from ..errors import ConfigError, EdgeError, RemoteError
from ..protocol import converters, pb, pb_grpc
from .base import RemoteResult

__all__ = ["TLSOptions", "TailClient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSE_SETTLE_S = 0.05

# Reconnect quickly after an edge server restarts; gRPC's default backoff grows to two minutes.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
]


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
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


class TailClient:
    """Talks to one edge server; safe to share between threads (calls take turns).

    ``streaming`` False sends every request as a unary ModelInfer call.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 2.0,
        tls: TLSOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        streaming: bool = True,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.streaming = streaming
        options: list[tuple[str, int | str]] = [
            *_CHANNEL_OPTIONS,
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        credentials = None
        if tls is not None:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            credentials = tls.credentials()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._channel = self._loop.run_until_complete(_open_channel(address, credentials, options))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._stream: Any = None  # the open ModelStreamInfer call, if any

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> RemoteResult:
        """Send ``inputs`` to ``model``; raises RemoteError with the gRPC status name on failure."""
        tensors = tuple(encode(name, array) for name, array in inputs.items())
        request = InferRequest(
            model_name=model, inputs=tensors, parameters=dict(parameters or {}), id=request_id
        )
        message = converters.infer_request_to_pb(request)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        with self._lock:
            started = time.perf_counter()
            reply = self._run(self._infer(message, timeout), timeout)
            call_ms = (time.perf_counter() - started) * 1000.0
        try:
            response = converters.infer_response_from_pb(reply)
            outputs = {t.name: decode(t) for t in response.outputs}
        except EdgeError as err:
            raise RemoteError(
                f"INTERNAL: edge server {self.address} sent an answer that cannot be read: {err}",
                status="INTERNAL",
            ) from err
        return RemoteResult(
            outputs=outputs,
            parameters=response.parameters,
            call_ms=call_ms,
            bytes_sent=sum(t.nbytes for t in tensors),
        )

    def ready(self, timeout_s: float | None = None) -> bool:
        try:
            reply = self._unary_call(self._stub.ServerReady, pb.ServerReadyRequest(), timeout_s)
        except RemoteError:
            return False
        return bool(reply.ready)

    def model_metadata(self, model: str, timeout_s: float | None = None) -> ModelMetadata:
        reply = self._unary_call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=model), timeout_s)
        return converters.model_metadata_from_pb(reply)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the server answers ServerReady, or raise RemoteError."""
        try:
            with self._lock:
                self._run(self._channel.channel_ready(), timeout_s)
        except RemoteError as err:
            raise RemoteError(
                f"UNAVAILABLE: edge server {self.address} not reachable within {timeout_s}s"
            ) from err
        if not self.ready(timeout_s):
            raise RemoteError(f"UNAVAILABLE: edge server {self.address} is not ready")

    def close(self) -> None:
        with self._lock:
            if self._loop.is_closed():
                return
            self._drop_stream()
            self._loop.run_until_complete(self._close_channel())
            self._loop.close()

    def __enter__(self) -> TailClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    async def _close_channel(self) -> None:
        await self._channel.close()
        # gRPC's completion queue is shared by every loop in the process and may still hand this
        # loop the last events of the cancelled calls: take them before the loop closes.
        await asyncio.sleep(_CLOSE_SETTLE_S)

    def _run(self, work: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``work`` on the private loop, within ``timeout_s``; the caller holds the lock.

        Whatever goes wrong on the way, the caller gets a RemoteError: the device then finishes locally.
        """
        if self._loop.is_closed() or _in_coroutine():
            work.close()
            if self._loop.is_closed():
                raise RemoteError(f"CANCELLED: the client of {self.address} is closed", status="CANCELLED")
            raise RuntimeError("TailClient is synchronous: call it from a thread, not from a coroutine")
        # A timer that cancels the task: lighter than asyncio.wait_for, which wraps it in a second task.
        task = self._loop.create_task(work)
        timer = self._loop.call_later(timeout_s, task.cancel)
        try:
            return self._loop.run_until_complete(task)
        except asyncio.CancelledError as err:
            self._drop_stream()  # an answer may still be on its way: never read it as the next one's
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
            self._drop_stream()
            logger.debug("call to %s failed", self.address, exc_info=err)
            raise RemoteError(
                f"INTERNAL: the call to edge server {self.address} failed: {type(err).__name__}: {err}",
                status="INTERNAL",
            ) from err
        finally:
            timer.cancel()

    def _unary_call(self, method: Any, message: object, timeout_s: float | None) -> Any:
        timeout = timeout_s if timeout_s is not None else self.timeout_s

        async def call() -> Any:  # grpc.aio makes the call on the running loop, so inside it
            return await method(message, timeout=timeout)

        with self._lock:
            return self._run(call(), timeout)

    async def _infer(self, message: Any, timeout_s: float) -> Any:
        if self.streaming:
            try:
                return await self._exchange(message)
            except _NoStreamingError as err:
                # If a unary call gets through, the server does not stream, or not in our dialect.
                reply = await self._stub.ModelInfer(message, timeout=timeout_s)
                logger.info("edge server %s: %s; sending unary ModelInfer calls", self.address, err)
                self.streaming = False
                return reply
        return await self._stub.ModelInfer(message, timeout=timeout_s)

    async def _exchange(self, message: Any) -> Any:
        """One request and its answer on the open stream, opening it first if need be."""
        fresh = self._stream is None or self._stream.done()
        if fresh:
            self._stream = self._stub.ModelStreamInfer()
        stream = self._stream
        try:
            await stream.write(message)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as err:
            # The stream ended before this request went out. An old one may simply be gone (the
            # server restarted): send on a new one. A new one refused at once hides its status
            # (gRPC reports INTERNAL), so let the caller find out with a unary call.
            self._stream = None
            if fresh:
                raise _NoStreamingError("it refuses ModelStreamInfer") from err
            return await self._exchange(message)
        try:
            reply = await stream.read()
        except grpc.aio.AioRpcError as err:
            self._stream = None
            if err.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise _NoStreamingError("it refuses ModelStreamInfer") from err
            raise
        if reply is grpc.aio.EOF:
            self._stream = None
            status = await self._ended(stream)
            raise RemoteError(f"{status}: edge server {self.address} ended the stream", status=status)
        if not isinstance(reply, pb.ModelStreamInferResponse):
            # gRPC hands back None when the bytes do not parse as our message (MLServer's stream
            # answers with ModelInferResponse, for one). The stream is of no use with this peer.
            self._drop_stream()
            raise _NoStreamingError("its ModelStreamInfer answers cannot be read")
        if reply.error_message:
            status, detail = converters.stream_error_from_pb(reply.error_message)
            if (
                status == "UNKNOWN"
                and not reply.HasField("infer_response")
                and converters.stream_answer_is_foreign(reply)
            ):
                self._drop_stream()
                raise _NoStreamingError("its ModelStreamInfer answers are not ModelStreamInferResponse")
            raise RemoteError(f"{status}: {detail}", status=status)
        if not reply.HasField("infer_response"):
            self._drop_stream()
            raise _NoStreamingError("its ModelStreamInfer answers carry no infer_response")
        return reply.infer_response

    @staticmethod
    async def _ended(stream: Any) -> str:
        """The status a finished stream ended with (OK reads as UNAVAILABLE: it is gone)."""
        code = await stream.code()
        if code is grpc.StatusCode.UNIMPLEMENTED:
            raise _NoStreamingError("it refuses ModelStreamInfer")
        return "UNAVAILABLE" if code is grpc.StatusCode.OK else str(code.name)

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None


class _NoStreamingError(Exception):
    """The server answered ModelStreamInfer with UNIMPLEMENTED, refused a new stream at once, or
    answered on it in a form this client cannot read."""


def _in_coroutine() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _open_channel(
    address: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int | str]]
) -> grpc.aio.Channel:
    """Create the channel inside the private loop, which it binds to."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)
