"""Real slow links for the tests: a TLS edge-server behind a delay proxy at RTT 200 ms, and a plaintext
one at RTT 400 ms (edge.emulation.proxy, which delays every byte in each direction)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from certs import CA

from edge import models
from helpers import start_logged

MODEL = "digits_resnet"


@contextlib.contextmanager
def slow_links(tmp: Path) -> Iterator[dict[str, object]]:
    """``{"ca", "tls", "plain", "x", "tmp"}``: the CA's PEM, the two proxies' addresses, a digit as .npy."""
    ca = CA(tmp / "pki")
    pair = ca.issue("edge-server", server=True)
    (tmp / "models").mkdir()
    (tmp / "models" / f"{MODEL}.tflite").write_bytes(models.model_path(MODEL).read_bytes())
    server = [
        sys.executable,
        "-m",
        "server",
        "--models",
        str(tmp / "models"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        tls, tls_port = start_logged(
            [*server, "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)], tmp / "tls.log"
        )
        procs.append(tls)
        plain, plain_port = start_logged(server, tmp / "plain.log")
        procs.append(plain)
        proxies = {}
        for name, port, delay in (("tls", tls_port, 100), ("plain", plain_port, 200)):
            proxy, proxy_port = start_logged(
                [sys.executable, "-m", "edge.emulation.proxy", "--listen", "127.0.0.1:0",
                 "--upstream", f"127.0.0.1:{port}", "--delay-ms", str(delay)],
                tmp / f"proxy-{name}.log",
            )  # fmt: skip
            procs.append(proxy)
            proxies[name] = f"127.0.0.1:{proxy_port}"
        np.save(tmp / "x.npy", models.digits_sample().x[:1])
        yield {"ca": ca.pem, "tls": proxies["tls"], "plain": proxies["plain"], "x": tmp / "x.npy", "tmp": tmp}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
