"""``edge ping --server ADDR [--model M]``: check the way to an edge server, one step at a time.

Address, TCP, TLS, the Open Inference Protocol, the token, the model: each step is checked in
turn and printed, and the first that fails is the one error line (exit 2), so a device operator
knows which one to fix.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from .. import models, wire
from ..address import parse_address
from ..errors import EdgeError, RemoteError
from ..graph import ModelGraph
from ..transport import TailClient
from .common import add_address_args, client_options

__all__ = ["register"]

_PROBE_MODEL = "__edge_ping__"
"""A model name no server serves: asking for it tells a refused token (UNAUTHENTICATED) from an accepted one."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ping",
        help="check the address, TLS, token and model of an edge server, step by step",
        description="Check the way to an edge server as the device would take it: the address and TCP, the TLS "
        "handshake (with --tls-ca), the server's Open Inference Protocol answer, the bearer token (with "
        "--token-file) and, with --model, that the server serves this model, the same file. Each step is printed; "
        "the first that fails is one error line, exit 2.",
    )
    add_address_args(p)
    p.add_argument(
        "--model", help="also check that the server serves this model (a .tflite or a shipped name)"
    )
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each call, seconds (default: 5)")
    p.add_argument("--json", action="store_true", help="print the steps as JSON")
    p.set_defaults(func=run)


class _Steps:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.done: list[dict[str, Any]] = []

    def ok(self, step: str, detail: str) -> None:
        self.done.append({"step": step, "ok": True, "detail": detail})
        if not self.as_json:
            print(f"ok  {step}: {detail}", flush=True)

    def fail(self, step: str, detail: str) -> EdgeError:
        self.done.append({"step": step, "ok": False, "detail": detail})
        if self.as_json:
            print(json.dumps({"ok": False, "steps": self.done}, indent=2))
        return EdgeError(f"{step}: {detail}")


def run(args: argparse.Namespace) -> int:
    if not args.server:
        raise EdgeError("edge ping needs --server HOST[:PORT]")
    steps = _Steps(args.json)
    host, port = parse_address(args.server)
    started = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=args.connect_timeout) as sock:
            tcp_ms = (time.perf_counter() - started) * 1000.0
            steps.ok("address", f"{host}:{port} accepts TCP connections ({tcp_ms:.1f} ms)")
            tls = args.tls_ca or args.tls_cert
            if tls:
                _tls(sock, host, args, steps)
    except OSError as err:
        raise steps.fail("address", f"cannot connect to {host}:{port}: {err.strerror or err}") from err
    security = client_options(args)
    with TailClient(args.server, timeout_s=args.timeout, streaming=False, **security) as client:
        try:
            ready = client.ready(args.timeout)
            name, version, _ = client.server_metadata(args.timeout)
        except RemoteError as err:
            raise steps.fail("server", f"no Open Inference Protocol answer over {_how(args)}: {err}") from err
        if not ready:
            raise steps.fail("server", f"{name or 'the server'} answers, but is not ready")
        steps.ok("server", f"{name} {version}, ready, over {_how(args)}")
        try:
            client.model_metadata(_PROBE_MODEL, timeout_s=args.timeout)
        except RemoteError as err:
            if err.status == "UNAUTHENTICATED":
                what = "refused the token" if args.token_file else "wants a token (--token-file)"
                raise steps.fail("token", f"the server {what}: {err}") from err
            if err.status not in ("NOT_FOUND", "INVALID_ARGUMENT"):
                raise steps.fail("token", f"unexpected answer: {err}") from err
        steps.ok("token", "accepted" if args.token_file else "none needed")
        if args.model:
            _model(client, args, steps)
    if args.json:
        print(json.dumps({"ok": True, "steps": steps.done}, indent=2))
    return 0


def _how(args: argparse.Namespace) -> str:
    return "TLS" if args.tls_ca or args.tls_cert else "plaintext"


def _tls(sock: socket.socket, host: str, args: argparse.Namespace, steps: _Steps) -> None:
    """The TLS handshake as the device makes it, with the standard library: its error says what is wrong."""
    try:
        context = ssl.create_default_context(cafile=str(args.tls_ca) if args.tls_ca else None)
        if args.tls_cert:
            context.load_cert_chain(str(args.tls_cert), str(args.tls_key) if args.tls_key else None)
        context.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as err:
        raise steps.fail("tls", f"the TLS files cannot be used: {err}") from err
    try:
        with context.wrap_socket(sock, server_hostname=host) as wrapped:
            version = wrapped.version()
    except ssl.SSLCertVerificationError as err:
        raise steps.fail("tls", f"the server's certificate is not trusted: {err.verify_message}") from err
    except (ssl.SSLError, OSError) as err:
        raise steps.fail("tls", f"the handshake failed (does the server speak TLS?): {err}") from err
    steps.ok("tls", f"{version}, the certificate for {host} verified" + (", mTLS" if args.tls_cert else ""))


def _model(client: TailClient, args: argparse.Namespace, steps: _Steps) -> None:
    spec = args.model
    local: ModelGraph | None = None
    if Path(spec).suffix == ".tflite" or spec in models.names():
        local = ModelGraph.from_file(models.resolve(spec))
    name = args.model_name or (Path(local.source).stem if local is not None else spec)
    try:
        client.model_metadata(name, timeout_s=args.timeout)
    except RemoteError as err:
        raise steps.fail("model", f"the server does not serve {name!r}: {err}") from err
    if local is None:
        steps.ok("model", f"{name} is served")
        return
    try:
        client.infer(
            name, {}, parameters={wire.PING: True, wire.MODEL_SHA256: local.sha256}, timeout_s=args.timeout
        )
    except RemoteError as err:
        if err.status == "FAILED_PRECONDITION":
            raise steps.fail(
                "model", f"the server serves another version of {name!r} than {local.source}"
            ) from err
        raise steps.fail("model", f"{name!r}: {err}") from err
    steps.ok("model", f"{name} is served, the same file as {local.source} (sha256 {local.sha256[:12]})")
