"""`edge ping`: a real TLS edge-server with tokens, and each way a device can get it wrong. The first
step that fails is the one error line (exit 2), and it names that step."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from certs import CA

from edge import models
from helpers import start_logged

TOKEN = "device-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("ping")
    ca = CA(tmp / "pki")
    other = CA(tmp / "other", name="another CA")
    pair = ca.issue("edge-server", server=True)
    (tmp / "models").mkdir()
    (tmp / "models" / "digits_resnet.tflite").write_bytes(models.model_path("digits_resnet").read_bytes())
    (tmp / "tokens").write_text(f"dev1 {TOKEN}\n")
    (tmp / "good").write_text(TOKEN + "\n")
    (tmp / "bad").write_text("not-the-token-0123456789\n")
    proc, port = start_logged(
        [sys.executable, "-m", "server", "--models", str(tmp / "models"), "--host", "127.0.0.1", "--port", "0",
         "--tls-cert", str(pair.cert), "--tls-key", str(pair.key), "--auth-tokens", str(tmp / "tokens")],
        tmp / "server.log",
    )  # fmt: skip
    try:
        yield {"address": f"127.0.0.1:{port}", "ca": str(ca.pem), "other": str(other.pem),
               "good": str(tmp / "good"), "bad": str(tmp / "bad")}  # fmt: skip
    finally:
        proc.kill()
        proc.wait(10)


def _ping(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", "ping", *args], capture_output=True, text=True, timeout=60
    )


def test_every_step_passes(server: dict[str, str]) -> None:
    proc = _ping("--server", server["address"], "--tls-ca", server["ca"], "--token-file", server["good"],
                 "--model", "digits_resnet", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and [s["step"] for s in report["steps"]] == [
        "address",
        "tls",
        "server",
        "token",
        "model",
    ]
    assert "the same file" in report["steps"][-1]["detail"]


@pytest.mark.parametrize(
    ("args", "step", "says"),
    [
        (["--tls-ca", "{other}", "--token-file", "{good}"], "tls", "not trusted"),
        (["--token-file", "{good}"], "server", "no Open Inference Protocol answer over plaintext"),
        (["--tls-ca", "{ca}", "--token-file", "{bad}"], "token", "refused the token"),
        (["--tls-ca", "{ca}"], "token", "wants a token"),
        (
            ["--tls-ca", "{ca}", "--token-file", "{good}", "--model", "digits_resnet_exit"],
            "model",
            "does not serve",
        ),
        (
            [
                "--tls-ca",
                "{ca}",
                "--token-file",
                "{good}",
                "--model",
                "digits_tiny",
                "--model-name",
                "digits_resnet",
            ],
            "model",
            "another version",
        ),
    ],
    ids=["wrong-ca", "plaintext-to-tls", "bad-token", "no-token", "not-served", "other-version"],
)
def test_the_first_failing_step_is_named(
    server: dict[str, str], args: list[str], step: str, says: str
) -> None:
    proc = _ping("--server", server["address"], *(a.format(**server) for a in args))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"edge: error: {step}: ") and says in errors[0], errors[0]


def test_a_closed_port_fails_at_the_address() -> None:
    proc = _ping("--server", "127.0.0.1:9")
    assert proc.returncode == 2 and "address: cannot connect to 127.0.0.1:9" in proc.stderr
