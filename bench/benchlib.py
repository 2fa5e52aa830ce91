"""What the benchmarks share: a free port, and waiting for a server process to listen."""

from __future__ import annotations

import socket
import subprocess
import time


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
