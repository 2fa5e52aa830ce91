"""A synchronous gRPC client for the Open Inference Protocol, tuned for one request at a time.

Errors come back as :class:`~edge.errors.RemoteError` carrying the gRPC status name, so the
caller can decide to finish locally without importing grpc.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from ..codec import InferRequest, ModelMetadata, decode, encode
from ..errors import ConfigError, RemoteError
from ..protocol import converters, pb, pb_grpc

__all__ = ["RETRYABLE", "RemoteResult", "TLSOptions", "TailClient"]

logger = logging.getLogger(__name__)

# Statuses after which the device should finish the work itself: the link or the server is the problem.
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"})

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


@dataclass(frozen=True, slots=True)
class RemoteResult:
    """What the server returned, and how long the call took as seen from the device."""

    outputs: dict[str, np.ndarray]
    parameters: Mapping[str, bool | int | float | str]
    call_ms: float
    """Wall time of the RPC on the device: transfer both ways, queueing and compute."""
    bytes_sent: int

    @property
    def compute_ms(self) -> float:
        return float(self.parameters.get("compute_us", 0)) / 1000.0

    @property
    def queue_ms(self) -> float:
        return float(self.parameters.get("queue_us", 0)) / 1000.0

    @property
    def transfer_ms(self) -> float:
        """Call time not spent computing or queueing on the server: the network and both stacks."""
        return max(self.call_ms - self.compute_ms - self.queue_ms, 0.0)


class TailClient:
    """Talks to one edge server."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 2.0,
        tls: TLSOptions | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        options: list[tuple[str, int | str]] = [
            *_CHANNEL_OPTIONS,
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls is not None:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(address, tls.credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, bool | int | float | str] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> RemoteResult:
        """Send ``inputs`` to ``model``; raises RemoteError with the gRPC status name on failure."""
        tensors = tuple(encode(name, array) for name, array in inputs.items())
        request = InferRequest(
            model_name=model, inputs=tensors, parameters=dict(parameters or {}), id=request_id
        )
        message = converters.infer_request_to_pb(request)
        started = time.perf_counter()
        reply = self._call(self._stub.ModelInfer, message, timeout_s)
        call_ms = (time.perf_counter() - started) * 1000.0
        response = converters.infer_response_from_pb(reply)
        return RemoteResult(
            outputs={t.name: decode(t) for t in response.outputs},
            parameters=response.parameters,
            call_ms=call_ms,
            bytes_sent=sum(t.nbytes for t in tensors),
        )

    def tail_profile(
        self, model: str, *, model_sha256: str | None = None, timeout_s: float | None = None
    ) -> np.ndarray:
        """The server's median tail latency (ms) of ``model`` at every cut 0..N.

        A ModelInfer request with the bool parameter ``profile`` and no inputs; the first one
        per model makes the server measure, so give it a generous timeout.
        """
        parameters: dict[str, bool | int | float | str] = {"profile": True}
        if model_sha256 is not None:
            parameters["model_sha256"] = model_sha256
        result = self.infer(model, {}, parameters=parameters, timeout_s=timeout_s)
        profile = result.outputs.get("tail_ms")
        if profile is None or profile.ndim != 1:
            raise RemoteError(f"INTERNAL: edge server {self.address} sent no tail profile", status="INTERNAL")
        return profile.astype(np.float64)

    def ready(self, timeout_s: float | None = None) -> bool:
        try:
            return bool(self._call(self._stub.ServerReady, pb.ServerReadyRequest(), timeout_s).ready)
        except RemoteError:
            return False

    def model_metadata(self, model: str, timeout_s: float | None = None) -> ModelMetadata:
        reply = self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=model), timeout_s)
        return converters.model_metadata_from_pb(reply)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the server answers ServerReady, or raise RemoteError."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as err:
            raise RemoteError(
                f"UNAVAILABLE: edge server {self.address} not reachable within {timeout_s}s"
            ) from err
        if not self.ready(timeout_s):
            raise RemoteError(f"UNAVAILABLE: edge server {self.address} is not ready")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TailClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: grpc.UnaryUnaryMultiCallable, message: object, timeout_s: float | None) -> Any:
        try:
            return method(message, timeout=timeout_s if timeout_s is not None else self.timeout_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            details = err.details() if hasattr(err, "details") else str(err)
            raise RemoteError(f"{code.name}: {details}", status=code.name) from err
