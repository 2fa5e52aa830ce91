"""Bad numbers and addresses on the command lines: one line on stderr, exit 2, nothing started.

Covered: every range-checked option named in the CLI (counts, timeouts, byte limits, ports,
the in-flight limit), client addresses (ports out of range, IPv6 without brackets, empty
ports), and edge-server bind failures (a port in use, an unknown host, an address that is not
this machine's).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge import models
from edge.address import normalize, parse_address
from edge.errors import ConfigError


def _run(*argv: str, module: str = "edge", timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=timeout
    )


def _assert_one_line(proc: subprocess.CompletedProcess[str], prog: str, needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert re.match(rf"{prog}( [a-z]+)?: error: ", lines[0]), lines[0]
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demo", "-n", "0"], "-n: 0 is below the minimum, 1"),
        (["demo", "-n", "-1"], "-n: -1 is below the minimum, 1"),
        (["bench", "--model", "digits_tiny", "-n", "0"], "-n: 0 is below"),
        (["bench", "--model", "digits_tiny", "--warmup", "-3"], "--warmup: -3 is below the minimum, 0"),
        (["plan", "digits_tiny", "--max-bytes", "-5"], "--max-bytes: -5 is below"),
        (["infer", "--model", "digits_tiny", "--timeout", "0", "--input", "x.npy"], "--timeout: 0 must be"),
        (["infer", "--model", "digits_tiny", "--timeout", "-1", "--input", "x.npy"], "--timeout: -1 must be"),
        (
            ["infer", "--model", "digits_tiny", "--timeout", "nan", "--input", "x.npy"],
            "--timeout: nan must be",
        ),
        (["infer", "--model", "digits_tiny", "--threads", "0", "--input", "x.npy"], "--threads: 0 is below"),
        (["infer", "--model", "digits_tiny", "--server", "127.0.0.1:99999", "--input", "x.npy"], "99999"),
        (["infer", "--model", "digits_tiny", "--server", "::1", "--input", "x.npy"], "brackets"),
    ],
)
def test_edge_refuses_bad_values(argv: list[str], needle: str) -> None:
    _assert_one_line(_run(*argv), "edge", needle)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    (root / "digits_tiny.tflite").write_bytes(models.model_path("digits_tiny").read_bytes())
    return root


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "70000"], "70000 is out of range 0..65535"),
        (["--port", "-5"], "-5 is below the minimum, 0"),
        (["--max-inflight", "0"], "--max-inflight: 0 is below the minimum, 1"),
        (["--workers", "-1"], "--workers: -1 is below"),
        (["--host", "no.such.host.invalid", "--port", "0"], "unknown host"),
        (["--host", "192.0.2.1", "--port", "0"], "Cannot assign requested address"),
        (["--host", "bad host"], "not a host name"),
    ],
)
def test_edge_server_refuses_bad_values(model_dir: Path, argv: list[str], needle: str) -> None:
    _assert_one_line(_run("--models", str(model_dir), *argv, module="server"), "edge-server", needle)


def test_edge_server_on_a_port_in_use_is_one_line(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run("--models", str(model_dir), "--host", "127.0.0.1", "--port", str(port), module="server")
    _assert_one_line(proc, "edge-server", "Address already in use")


@pytest.mark.parametrize("module", ["edge", "server"])
def test_version(module: str) -> None:
    proc = _run("--version", module=module)
    assert proc.returncode == 0
    assert re.fullmatch(r"edge(-server)? \d+\.\d+\.\d+\n", proc.stdout), proc.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost", ("localhost", 8001)),
        ("edge.local:9000", ("edge.local", 9000)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:8001", ("::1", 8001)),
        ("[fe80::1%eth0]:5", ("fe80::1%eth0", 5)),
    ],
)
def test_addresses_that_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dns:///edge.local:9000", "dns:///edge.local:9000"),
        ("dns:edge.local", "dns:///edge.local:8001"),
        ("dns://10.0.0.2/edge.local:9000", "dns://10.0.0.2/edge.local:9000"),
        ("ipv4:127.0.0.1:5,127.0.0.2", "ipv4:127.0.0.1:5,127.0.0.2:8001"),
        ("ipv6:[::1]:5", "ipv6:[::1]:5"),
    ],
)
def test_grpc_targets_naming_several_servers(text: str, expected: str) -> None:
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", "host:", ":8001", "127.0.0.1:99999", "127.0.0.1:0", "::1", "[::1", "[::1]x", "a b:1", "h:0x10",
        "ipv4:", "ipv4:,", "ipv4:127.0.0.1:0", "dns:///", "dns:///a b:1", "ipv4:" + "1.2.3.4:5," * 200,
    ],
)  # fmt: skip
def test_addresses_that_do_not(text: str) -> None:
    with pytest.raises(ConfigError):
        normalize(text)


@pytest.mark.parametrize(
    ("cuts", "needle"),
    [("99", "cuts must be 0..16"), ("-1", "cuts must be 0..16"), ("8,x", "expected cut indices")],
    ids=["out-of-range", "negative", "not-a-number"],
)
def test_export_refuses_bad_cuts_in_one_line(cuts: str, needle: str, tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = _run("export", "mlserver", "digits_resnet", "--cuts", cuts, "--out", str(out))
    _assert_one_line(proc, "edge", needle)
