"""Who may talk to the server: TLS (and mTLS) credentials, and bearer tokens per device.

Both are read from files and read again on :meth:`Security.reload` (``edge-server`` calls it on
SIGHUP): a new certificate applies to new connections, open streams keep theirs, and a new
token file applies to the next request.

Without a token an unauthenticated caller may still ask for health (the gRPC health service,
ServerLive, ServerReady) and server metadata; everything about models, and inference, needs a
valid token when ``--auth-tokens`` is given.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from edge.credentials import bearer_token, check_tls_files, check_token, read_secret
from edge.errors import ConfigError
from edge.ratelog import RateLimitedLog

from .fairness import peer_host

__all__ = ["ADMIN_METHODS", "OPEN_METHODS", "Security", "TokenInterceptor", "read_token_table"]

_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("edge_caller", default=None)
"""The device a call's token names, set by :class:`TokenInterceptor` in the task that then runs the
call: the servicer asks :meth:`Security.identify`, and the token is parsed and looked up once."""

logger = logging.getLogger(__name__)
_REFUSALS = RateLimitedLog(logger)
"""One line a minute per kind of refusal: a flood of unauthenticated calls wrote one each."""

OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ServerMetadata",
    }
)
"""What a caller without a token may call."""

_STREAMING = frozenset({"/inference.GRPCInferenceService/ModelStreamInfer"})
MAX_TOKENS = 10_000


ADMIN_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)
"""What only a token marked ``admin`` may call (with --model-control): any device could unload any model."""


def read_token_table(path: Path) -> tuple[dict[str, str], frozenset[str]]:
    """``DEVICE_ID TOKEN [admin]`` per line, ``#`` comments: (token -> device id, the admin tokens)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path}: cannot read the token file: {getattr(err, 'strerror', None) or err}"
        ) from err
    tokens: dict[str, str] = {}
    admins: set[str] = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
            raise ConfigError(f"{path}:{number}: expected DEVICE_ID TOKEN, or DEVICE_ID TOKEN admin")
        device, token = parts[0], parts[1]
        if len(parts) == 3:
            admins.add(token)
        problem = check_token(token)
        if problem is not None:
            raise ConfigError(f"{path}:{number}: {problem}")
        if token in tokens:
            raise ConfigError(f"{path}:{number}: this token is given to {tokens[token]!r} already")
        tokens[token] = device
    if len(tokens) > MAX_TOKENS:
        raise ConfigError(f"{path}: {len(tokens)} tokens; at most {MAX_TOKENS}")
    if not tokens:
        # Every call but health and metadata would be refused: surely not what was meant.
        raise ConfigError(f"{path}: the token file holds no DEVICE_ID TOKEN line")
    return tokens, frozenset(admins)


def _digest(token: str) -> bytes:
    """What a token is looked up by: a dict lookup on its digest takes the same time whichever
    token is near, where comparing tokens would leak how much of one matched."""
    return hashlib.sha256(token.encode()).digest()


def _table(path: Path) -> tuple[dict[bytes, str], frozenset[bytes]]:
    """:func:`read_token_table`, keyed by the tokens' digests."""
    tokens, admins = read_token_table(path)
    return {_digest(t): device for t, device in tokens.items()}, frozenset(map(_digest, admins))


class Security:
    """The server's TLS files and token file, and what they currently say."""

    def __init__(
        self,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        client_ca: Path | None = None,
        tokens: Path | None = None,
    ) -> None:
        if (cert is None) != (key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if client_ca is not None and cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS first")
        self.cert, self.key, self.client_ca, self.tokens_file = cert, key, client_ca, tokens
        self.on_refused: Callable[[str], None] | None = None
        """Called with the reason ("no_token", "unknown_token") for every call refused: the metrics' hook."""
        # Guards _config and _tokens, which reload() replaces.
        self._lock = threading.Lock()
        self._config = self._read_config()
        self._fresh = False
        self._tokens: dict[bytes, str] | None = None
        self._admins: frozenset[bytes] = frozenset()
        if tokens is not None:
            self._tokens, self._admins = _table(tokens)

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def credentials(self) -> grpc.ServerCredentials | None:
        """Server credentials that fetch the certificate again after a reload; None for plaintext."""
        if self._config is None:
            return None
        return grpc.dynamic_ssl_server_credentials(
            self._config, self._fetch, require_client_authentication=self.client_ca is not None
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(self)] if self.tokens_file is not None else []

    def identify(self, context: grpc.aio.ServicerContext) -> str:
        """The device a call comes from: its token's DEVICE_ID (found by the interceptor), else its address."""
        device = _CALLER.get()
        return f"device {device}" if device is not None else peer_host(context)

    def device_for(self, token: str) -> str | None:
        with self._lock:
            tokens = self._tokens
        return None if tokens is None else tokens.get(_digest(token))

    def is_admin(self, token: str) -> bool:
        with self._lock:
            admins = self._admins
        return _digest(token) in admins

    def reload(self) -> None:
        """Read the files again; on an error the old ones stay in force, and the error is logged."""
        try:
            config = self._read_config()
            tokens, admins = _table(self.tokens_file) if self.tokens_file is not None else (None, frozenset())
        except ConfigError as err:
            logger.error("reload failed, keeping the current certificates and tokens: %s", err)
            return
        with self._lock:
            self._config, self._fresh, self._tokens, self._admins = config, True, tokens, admins
        logger.info("reloaded certificates and tokens")

    def _read_config(self) -> Any:
        if self.cert is None or self.key is None:
            return None
        pairs = [(read_secret(self.key, "the TLS key"), read_secret(self.cert, "the TLS certificate"))]
        roots = read_secret(self.client_ca, "the client CA") if self.client_ca is not None else None
        check_tls_files(cert=self.cert, key=self.key, ca=self.client_ca, what="TLS", ca_what="client CA")
        try:
            return grpc.ssl_server_certificate_configuration(pairs, root_certificates=roots)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"unusable TLS files: {err}") from err

    def _fetch(self) -> Any:
        """Called by gRPC at each new handshake: the new configuration once after a reload, else None."""
        with self._lock:
            if not self._fresh:
                return None
            self._fresh = False
            return self._config


MAX_OPEN_WATCHES = 64
"""Health Watch streams callers without a valid token may hold at once: held open, they kept connections
(a thousand locked a device with a token out); past it, RESOURCE_EXHAUSTED."""
_WATCH = "/grpc.health.v1.Health/Watch"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses with UNAUTHENTICATED every call but :data:`OPEN_METHODS` without a valid bearer token,
    and bounds the Watch streams such callers hold (:data:`MAX_OPEN_WATCHES`)."""

    def __init__(self, security: Security, max_open_watches: int = MAX_OPEN_WATCHES) -> None:
        self.security = security
        self.max_open_watches = max_open_watches
        self._open_watches = 0  # on the server's event loop only

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        token = bearer_token(details.invocation_metadata)
        device = self.security.device_for(token) if token else None
        if device is None and method == _WATCH:
            return await self._counted_watch(continuation, details)
        if method in OPEN_METHODS:
            _CALLER.set(device)
            return await continuation(details)
        if device is not None:
            if method in ADMIN_METHODS and not self.security.is_admin(token):
                self._refused("not_admin", method, "the token is not an admin's")
                return _refusal(
                    method,
                    "repository control needs a token marked admin in the token file",
                    grpc.StatusCode.PERMISSION_DENIED,
                )
            _CALLER.set(device)
            return await continuation(details)
        why = "no bearer token" if not token else "an unknown bearer token"
        self._refused("unknown_token" if token else "no_token", method, why)
        return _refusal(method, f"{why}: send 'authorization: Bearer TOKEN' metadata")

    def _refused(self, reason: str, method: str, why: str) -> None:
        """A refused call, logged (a line a minute per reason) and counted (the metrics' hook)."""
        _REFUSALS.log(logging.INFO, reason, "refused %s: %s", method[:80], why)
        if self.security.on_refused is not None:
            self.security.on_refused(reason)

    async def _counted_watch(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return await _watch_limited(self, handler) if handler is not None else handler


async def _watch_limited(
    interceptor: TokenInterceptor, handler: grpc.RpcMethodHandler
) -> grpc.RpcMethodHandler:
    inner = handler.unary_stream

    async def watch(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if interceptor._open_watches >= interceptor.max_open_watches:
            _REFUSALS.log(
                logging.INFO,
                "watch",
                "refused a health Watch: %d open without a token",
                interceptor._open_watches,
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{interceptor.max_open_watches} health Watch streams are open without a token; use Check",
            )
        interceptor._open_watches += 1
        try:
            return await inner(request, context)
        finally:
            interceptor._open_watches -= 1

    return grpc.unary_stream_rpc_method_handler(
        watch,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusal(
    method: str, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield None  # pragma: no cover - abort raises

    if method in _STREAMING:
        return grpc.stream_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)
