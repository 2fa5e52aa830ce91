"""The device's path stays small: what ``edge run``, ``edge infer`` and the library import.

Covered: the library, the daemon and the device commands load neither the benchmark's
emulation code nor the server package nor matplotlib; a command that starts an embedded
server (``edge demo``) is the exception that proves the check can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge import models

FORBIDDEN = ("edge.emulation", "server", "matplotlib", "tritonclient")

PROBE = """
import json, sys
{body}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {roots} or m.startswith("edge.emulation"))))
"""


def _loaded(body: str) -> list[str]:
    roots = {f.split(".")[0] for f in FORBIDDEN if "." not in f}
    code = PROBE.format(body=body, roots=sorted(roots))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_library_and_daemon_import_no_bench_or_server_code() -> None:
    body = "import edge, edge.cli, edge.daemon, edge.cooperative, edge.autosplit, edge.transport, edge.policy"
    assert _loaded(body) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["infer", "--local", "--model", "digits_tiny", "--input", "{x}"],
        ["run", "--config", "generic-x86", "--check"],
        ["inspect", "digits_tiny", "--json"],
    ],
    ids=["infer", "run-check", "inspect"],
)
def test_device_commands_import_no_bench_or_server_code(argv: list[str], tmp_path) -> None:
    np.save(tmp_path / "x.npy", models.digits_sample().x[:1])
    args = [a.replace("{x}", str(tmp_path / "x.npy")) for a in argv]
    body = f"from edge.cli import main\nimport contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n    assert main({args!r}) == 0"
    assert _loaded(body) == []


def test_the_check_sees_an_embedded_server() -> None:
    body = "from edge.cli import main\nimport contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n    assert main(['demo', '-n', '2', '--json']) == 0"
    assert any(m.startswith("server") for m in _loaded(body))
