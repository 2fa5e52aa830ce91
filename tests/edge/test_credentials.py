"""edge.credentials: the token rule both sides keep, secret files named in one line, paths in a
profile resolved against its folder, and the bearer interceptor on a real server.

Covered: tokens the server would refuse (short, long, with a space, empty) refused by the device when
it reads its token file; a profile in another folder whose relative token_file and tls.ca_file
resolve beside it whatever the working directory; the bearer token sent
on unary calls and on the stream, and a server that identifies the caller by the lookup its interceptor made.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from certs import CA

from edge.credentials import MAX_TOKEN_CHARS, MIN_TOKEN_CHARS, beside, read_secret, read_token
from edge.errors import ConfigError
from helpers import MINIMAL_PROFILE


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("short-token\n", f"{MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters"),
        ("x" * (MAX_TOKEN_CHARS + 1), f"{MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters"),
        ("a-token-of-enough with-a-space\n", "no spaces"),
        ("\n", "must hold the token on its first line"),
    ],
    ids=["short", "long", "space", "empty"],
)
def test_the_device_refuses_a_token_the_server_would_refuse(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "token"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why) as err:
        read_token(path)
    assert str(path) in str(err.value)


def test_a_good_token_is_read_from_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  " + "t" * MIN_TOKEN_CHARS + "  \nsecond line\n")
    assert read_token(path) == "t" * MIN_TOKEN_CHARS


def test_an_unreadable_secret_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read the TLS key {tmp_path / 'missing'}: ") as err:
        read_secret(tmp_path / "missing", "the TLS key")
    assert "\n" not in str(err.value)


def test_relative_paths_resolve_beside_the_file_that_names_them(tmp_path: Path) -> None:
    source = tmp_path / "conf" / "device.toml"
    assert beside(Path("tls/ca.pem"), source) == tmp_path / "conf" / "tls" / "ca.pem"
    assert beside(Path("/etc/edge/ca.pem"), source) == Path("/etc/edge/ca.pem")
    assert beside(None, source) is None


TOKEN = "device-one-token-" + "k" * 16


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pki")
    tokens = root / "tokens"
    tokens.write_text(f"device-one {TOKEN}\n")
    return {"ca": CA(root / "ca"), "tokens": tokens}


PROFILE = (
    MINIMAL_PROFILE
    + """
[[edge.servers]]
address = "127.0.0.1:1"
token_file = "secrets/token"
[edge.servers.tls]
ca_file = "secrets/ca.pem"
"""
)


def test_a_profiles_token_and_tls_files_resolve_beside_it(
    tmp_path: Path, pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """They resolved against the working directory, while the model and calibration paths resolved
    against the profile's folder: `edge run --check` from another folder could not find them."""
    from edge.cli import main

    folder = tmp_path / "profiles"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "token").write_text("t" * 24 + "\n")
    (folder / "secrets" / "ca.pem").write_bytes(pki["ca"].pem.read_bytes())
    (folder / "device.toml").write_text(PROFILE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "--config", str(folder / "device.toml"), "--check"]) == 0, capsys.readouterr().err
    (folder / "secrets" / "token").write_text("short\n")
    assert main(["run", "--config", str(folder / "device.toml"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "edge.servers[0].token_file" in err and str(folder / "secrets" / "token") in err, err
    assert os.getcwd() == str(elsewhere)


def test_the_bearer_token_goes_on_every_call_and_the_server_names_the_device(pki, graphs) -> None:
    """Unary calls and the stream both carry it; the server's fair turns see the token's device."""
    import numpy as np

    from edge import models
    from edge.errors import RemoteError
    from edge.transport import TailClient
    from server.dataplane import DataPlane
    from server.embedded import BackgroundServer
    from server.grpc_service import EdgeServer
    from server.repository import ModelRepository
    from server.security import Security

    security = Security(tokens=pki["tokens"])
    seen: list[str] = []

    def identify(context) -> str:
        seen.append(security.identify(context))
        return seen[-1]

    dataplane = DataPlane(ModelRepository.from_files([models.model_path("digits_resnet")]))
    server = EdgeServer(dataplane, interceptors=security.interceptors(), identify=identify)
    graph = graphs["digits_resnet"]
    x = {graph.inputs[0].name: np.zeros(graph.inputs[0].shape, dtype=np.int8)}
    token = TOKEN
    with BackgroundServer(server) as running:
        for streaming in (True, False):
            with TailClient(running.address, token=token, streaming=streaming, timeout_s=10.0) as client:
                assert client.model_metadata("digits_resnet").name == "digits_resnet"
                client.infer("digits_resnet", x)
        with TailClient(running.address, streaming=False, timeout_s=10.0) as anonymous:
            with pytest.raises(RemoteError, match="UNAUTHENTICATED"):
                anonymous.infer("digits_resnet", x)
    assert seen == ["device device-one", "device device-one"]
