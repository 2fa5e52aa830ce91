"""tools/make_certs.sh, the README's certificate recipe: what it writes serves a real mTLS edge-server
with tokens, and `edge ping` from a device with its own certificate and token passes every step."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from edge import models
from helpers import REPO, start_logged


def test_the_recipe_gives_a_working_mtls_server_and_devices(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    subprocess.run(["bash", str(REPO / "tools" / "make_certs.sh"), str(out), "127.0.0.1", "rpi4-01", "jetson-01"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
    assert len((out / "tokens").read_text().splitlines()) == 2
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "digits_resnet.tflite").write_bytes(
        models.model_path("digits_resnet").read_bytes()
    )
    proc, port = start_logged(
        [sys.executable, "-m", "server", "--models", str(tmp_path / "models"), "--host", "127.0.0.1", "--port", "0",
         "--tls-cert", str(out / "server.pem"), "--tls-key", str(out / "server.key"),
         "--tls-client-ca", str(out / "ca.pem"), "--auth-tokens", str(out / "tokens")],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        for device in ("rpi4-01", "jetson-01"):
            ping = subprocess.run(
                [sys.executable, "-m", "edge", "ping", "--server", f"127.0.0.1:{port}", "--tls-ca", str(out / "ca.pem"),
                 "--tls-cert", str(out / f"{device}.pem"), "--tls-key", str(out / f"{device}.key"),
                 "--token-file", str(out / f"{device}.token"), "--model", "digits_resnet", "--json"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert ping.returncode == 0, ping.stderr
            assert json.loads(ping.stdout)["ok"]
        # Running it again for one more device keeps the others' tokens.
        subprocess.run(["bash", str(REPO / "tools" / "make_certs.sh"), str(out), "127.0.0.1", "pi5-02"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        assert [line.split()[0] for line in (out / "tokens").read_text().splitlines()] == [
            "rpi4-01",
            "jetson-01",
            "pi5-02",
        ]
    finally:
        proc.kill()
        proc.wait(10)
