"""What the benchmarks share: a free port, waiting for a server process to listen, and one ``edge bench``
against an ``edge-server`` of its own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A port free now on loopback (another process may take it before it is used: benchmarks only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, server: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Return once something accepts connections on loopback ``port``; SystemExit when ``server``
    exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("edge-server did not start") from None
            time.sleep(0.1)


def bench_against_server(
    model: Path,
    cut: int,
    n: int,
    *,
    server_prefix: Sequence[str] = (sys.executable,),
    device_prefix: Sequence[str] = (sys.executable,),
    cwd: Path | None = None,
) -> str:
    """Start ``edge-server`` (its defaults) serving a copy of ``model``, run ``edge bench --split-at cut
    -n n --json`` against it, stop the server (SIGTERM: it stops cleanly, so a profiler wrapping it
    writes its file) and return bench's output. Each command is its prefix (a python, behind a
    pinning or a profiler) then ``-m server`` or ``-m edge``; both run in ``cwd``."""
    work = Path(tempfile.mkdtemp())
    shutil.copy(model, work / model.name)
    port = free_port()
    server = subprocess.Popen(
        [*server_prefix, "-m", "server", "--models", str(work), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd,
    )  # fmt: skip
    try:
        wait_listening(port, server)
        return subprocess.run(
            [*device_prefix, "-m", "edge", "bench", "--model", str(model), "--server", f"127.0.0.1:{port}",
             "--split-at", str(cut), "-n", str(n), "--json"],
            check=True, capture_output=True, text=True, cwd=cwd,
        ).stdout  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
