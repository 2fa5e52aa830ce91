"""TLS, mTLS and bearer tokens on a real server, with throwaway certificates.

Covered: a TLS client trusting the CA gets identical outputs; with mTLS, a client without a
certificate, or with one from another CA, is refused at the handshake; with tokens, no token and
a wrong token get UNAUTHENTICATED on inference and metadata, on unary calls and on the stream,
while health and server metadata stay open; a new token file applies after reload, and a new
certificate applies to new connections while an open stream keeps working; the device's
``--token-file`` and the daemon's ``token_file`` carry the token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from certs import CA

from edge import models
from edge.credentials import TLSOptions
from edge.errors import ConfigError, RemoteError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import seeded_inputs
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.grpc_service import EdgeServer
from server.repository import ModelRepository
from server.security import Security, read_token_table

MODEL = "digits_resnet"
CUT = 8
TOKEN = "t0k3n-for-device-one-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pki")
    ca, other = CA(root / "ca"), CA(root / "other", name="another CA")
    tokens = root / "tokens"
    tokens.write_text(f"# device tokens\ndevice-one {TOKEN}\ndevice-two {'x' * 24}  # another\n")
    return {
        "ca": ca,
        "server": ca.issue("edge-server", server=True),
        "client": ca.issue("device-one", server=False),
        "stranger": other.issue("stranger", server=False),
        "tokens": tokens,
    }


def _serve(security: Security) -> BackgroundServer:
    dataplane = DataPlane(ModelRepository.from_files([models.model_path(MODEL)]))
    return BackgroundServer(
        EdgeServer(dataplane, credentials=security.credentials(), interceptors=security.interceptors())
    )


@pytest.fixture(scope="module")
def mtls_server(pki: dict) -> Iterator[tuple[BackgroundServer, Security]]:
    security = Security(
        cert=pki["server"].cert, key=pki["server"].key, client_ca=pki["ca"].pem, tokens=pki["tokens"]
    )
    with _serve(security) as server:
        yield server, security


def _infer(client: TailClient, graph: ModelGraph) -> dict[str, np.ndarray]:
    x = seeded_inputs(graph, 0)
    with ModelRunner(graph) as runner:
        cut = runner.run_head(CUT, x).cut
        expected = runner.run_tail(CUT, cut)
    result = client.infer(MODEL, cut, parameters={"split_point": CUT, "model_sha256": graph.sha256})
    assert all(np.array_equal(result.outputs[k], v) for k, v in expected.items())
    return result.outputs


def _tls(pki: dict, pair: str | None) -> TLSOptions:
    cert = pki[pair] if pair else None
    return TLSOptions(
        ca_file=pki["ca"].pem, cert_file=cert.cert if cert else None, key_file=cert.key if cert else None
    )


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "unary"])
def test_mtls_and_a_token_get_identical_outputs(mtls_server, pki, graphs, streaming: bool) -> None:
    server, _ = mtls_server
    with TailClient(server.address, tls=_tls(pki, "client"), token=TOKEN, streaming=streaming) as client:
        _infer(client, graphs[MODEL])


@pytest.mark.parametrize("pair", [None, "stranger"], ids=["no-certificate", "another-ca"])
def test_a_client_without_a_good_certificate_is_refused_at_the_handshake(mtls_server, pki, pair) -> None:
    server, _ = mtls_server
    with TailClient(server.address, tls=_tls(pki, pair), token=TOKEN, timeout_s=3.0) as client:
        assert not client.ready(timeout_s=3.0)  # even health needs the handshake
        with pytest.raises(RemoteError) as err:
            client.infer(MODEL, {}, parameters={"ping": True})
        assert err.value.status == "UNAVAILABLE"


@pytest.mark.parametrize("token", [None, "w" * 30], ids=["no-token", "wrong-token"])
@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "unary"])
def test_no_token_or_a_wrong_one_is_unauthenticated_but_health_stays_open(
    mtls_server, pki, graphs, token, streaming
) -> None:
    server, _ = mtls_server
    with TailClient(server.address, tls=_tls(pki, "client"), token=token, streaming=streaming) as client:
        assert client.ready()
        with pytest.raises(RemoteError) as err:
            _infer(client, graphs[MODEL])
        assert err.value.status == "UNAUTHENTICATED"
        with pytest.raises(RemoteError) as err:
            client.model_metadata(MODEL)
        assert err.value.status == "UNAUTHENTICATED" and MODEL not in str(err.value)


def test_reload_applies_new_tokens_and_keeps_open_streams(mtls_server, pki, graphs, tmp_path: Path) -> None:
    server, security = mtls_server
    graph = graphs[MODEL]
    with TailClient(server.address, tls=_tls(pki, "client"), token=TOKEN) as client:
        _infer(client, graph)  # the stream is open
        original = pki["tokens"].read_text()
        fresh = "n" * 40
        try:
            pki["tokens"].write_text(f"device-one {fresh}\n")
            security.reload()
            with TailClient(server.address, tls=_tls(pki, "client"), token=fresh) as newcomer:
                _infer(newcomer, graph)
            _infer(client, graph)  # the open stream was authenticated when it opened: it is not dropped
            with TailClient(server.address, tls=_tls(pki, "client"), token=TOKEN) as late:
                with pytest.raises(RemoteError) as err:  # but a new call with the old token is refused
                    _infer(late, graph)
            assert err.value.status == "UNAUTHENTICATED"
        finally:
            pki["tokens"].write_text(original)
            security.reload()
        _infer(client, graph)


def test_bad_files_are_named(tmp_path: Path, pki) -> None:
    bad = tmp_path / "tokens"
    bad.write_text("only-one-field\n")
    with pytest.raises(ConfigError, match=r"tokens:1: expected DEVICE_ID TOKEN"):
        read_token_table(bad)
    bad.write_text("dev short\n")
    with pytest.raises(ConfigError, match="16 to 512 characters"):
        read_token_table(bad)
    with pytest.raises(ConfigError, match="cannot read the TLS key"):
        Security(cert=pki["server"].cert, key=tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="--tls-client-ca needs --tls-cert"):
        Security(client_ca=pki["ca"].pem)


def test_the_device_cli_sends_its_token_file(mtls_server, pki, tmp_path: Path) -> None:
    import subprocess
    import sys

    server, _ = mtls_server
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    np.save(tmp_path / "x.npy", models.digits_sample().x[:1])
    base = [
        sys.executable,
        "-m",
        "edge",
        "infer",
        "--model",
        MODEL,
        "--server",
        server.address,
        "--split-at",
        str(CUT),
    ]
    tls = [
        "--tls-ca",
        str(pki["ca"].pem),
        "--tls-cert",
        str(pki["client"].cert),
        "--tls-key",
        str(pki["client"].key),
    ]
    ok = subprocess.run(
        [*base, *tls, "--token-file", str(token_file), "--input", str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "fallback" not in ok.stderr, ok.stderr
    refused = subprocess.run(
        [*base, *tls, "--input", str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 0 and "UNAUTHENTICATED" in refused.stderr  # finished locally, and said why


def test_a_reloaded_certificate_applies_to_new_connections(pki, graphs, tmp_path: Path) -> None:
    graph = graphs[MODEL]
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki["server"].cert.read_bytes())
    key.write_bytes(pki["server"].key.read_bytes())
    security = Security(cert=cert, key=key)
    other = CA(tmp_path / "other", name="renewed CA")
    with _serve(security) as server:
        with TailClient(server.address, tls=TLSOptions(ca_file=pki["ca"].pem)) as old_client:
            _infer(old_client, graph)
            renewed = other.issue("edge-server-renewed", server=True)
            cert.write_bytes(renewed.cert.read_bytes())
            key.write_bytes(renewed.key.read_bytes())
            security.reload()
            _infer(old_client, graph)  # the open connection keeps its session
            with TailClient(server.address, tls=TLSOptions(ca_file=other.pem)) as new_client:
                _infer(new_client, graph)
            with TailClient(server.address, tls=TLSOptions(ca_file=pki["ca"].pem), timeout_s=3.0) as stale:
                assert not stale.ready(timeout_s=3.0)
