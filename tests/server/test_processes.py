"""``edge-server --processes N``: N server processes on one port (SO_REUSEPORT), one supervisor.

Covered, with real edge-server processes: two processes start on port 0 and the supervisor says so
once both listen; separate clients (separate connections) all get the whole model's outputs; SIGHUP
reaches every process (a token added to the file then works on every new connection); SIGTERM stops
them all and the supervisor exits 0; a process that dies stops the rest, and the supervisor exits 1;
a supervisor killed outright (SIGKILL) leaves no process serving: each sees it gone and drains;
--metrics-port serves the sums of every process's metrics on one endpoint (requests answered
over 12 connections, tail loads, nothing in flight or waiting), and the supervisor removes the
processes' metric files when it stops; a port already taken, and a metrics port already taken,
are each one line and status 2 (no metrics directory left behind).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_metrics import scrape

from edge import models
from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import digit_inputs

MODEL = "digits_resnet"
GRAPH = ModelGraph.from_file(models.model_path(MODEL))
ONE = "device-one " + "a" * 24
TWO = "device-two " + "b" * 24


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    (folder / f"{MODEL}.tflite").write_bytes(models.model_path(MODEL).read_bytes())
    log = tmp_path / "server.log"
    args = [sys.executable, "-m", "server", "--models", str(folder), "--host", "127.0.0.1", "--port", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*args, "--processes", "2", *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"2 processes listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if found:
            return proc, int(found.group(1)), log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the supervisor did not say both processes listen:\n{log.read_text()}")


@pytest.fixture()
def two(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    tokens = tmp_path / "tokens"
    tokens.write_text(ONE + "\n")
    started = _start(tmp_path, "--auth-tokens", str(tokens))
    children = _children(started[0].pid)  # now: once the supervisor is gone they are nobody's
    try:
        yield started
    finally:
        _stop_all(started[0], children)


def _stop_all(proc: subprocess.Popen[bytes], children: list[int]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for child in children:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_two_processes_serve_one_port_and_sighup_reaches_both(two, tmp_path: Path) -> None:
    proc, port, _ = two
    assert len(_children(proc.pid)) == 2
    feeds = digit_inputs(GRAPH, 12)
    with ModelRunner(GRAPH) as runner:
        expected = [runner.run(feed) for feed in feeds]
    token_one, token_two = ONE.split()[1], TWO.split()[1]
    for feed, want in zip(feeds, expected, strict=True):
        with TailClient(f"127.0.0.1:{port}", token=token_one, timeout_s=10.0) as client:  # a connection each
            got = client.infer(MODEL, feed).outputs
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    with TailClient(f"127.0.0.1:{port}", token=token_two, timeout_s=10.0) as client:
        with pytest.raises(RemoteError) as refused:
            client.infer(MODEL, feeds[0])
    assert refused.value.status == "UNAUTHENTICATED"
    (tmp_path / "tokens").write_text(ONE + "\n" + TWO + "\n")
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    for feed in feeds[:8]:  # new connections, spread over both processes: each must know the new token
        with TailClient(f"127.0.0.1:{port}", token=token_two, timeout_s=10.0) as client:
            assert client.infer(MODEL, feed).outputs


def test_sigterm_stops_every_process_and_the_supervisor_exits_0(two) -> None:
    proc, _, _ = two
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not [c for c in children if os.path.exists(f"/proc/{c}") and _alive(c)]


def test_a_process_that_dies_stops_the_others_and_the_supervisor_exits_1(two) -> None:
    proc, _, log = two
    first, second = _children(proc.pid)
    os.kill(first, signal.SIGKILL)
    assert proc.wait(30) == 1
    assert not _alive(second)
    assert "a server process stopped; stopping the others" in log.read_text()


def test_the_processes_of_a_supervisor_killed_outright_stop_by_themselves(two) -> None:
    proc, port, _ = two
    children = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # nothing of it runs to stop them
    proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if _alive(c)], "orphaned server processes still serve the port"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_the_metrics_of_every_process_are_summed_on_one_endpoint(tmp_path: Path) -> None:
    proc, port, log = _start(tmp_path, "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    children = _children(proc.pid)
    try:
        found = re.search(r"metrics on (http://\S+/metrics)", log.read_text())
        assert found, log.read_text()
        url = found.group(1)
        feeds = digit_inputs(GRAPH, 12)
        with ModelRunner(GRAPH) as runner:
            cuts = [dict(runner.run_head(8, feed).cut) for feed in feeds]
        for cut in cuts:  # a connection each: spread over both processes
            with TailClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
                client.infer(MODEL, cut, parameters={"split_point": 8})
        answered = ("edge_requests_total", (("cut", "8"), ("model", MODEL), ("status", "OK")))
        loads = ("edge_tail_loads_total", (("model", MODEL),))
        deadline = time.monotonic() + 15  # each process writes its tail-cache counts every second
        samples = scrape(url)
        while samples.get(loads, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            samples = scrape(url)
        assert samples[answered] == 12
        assert samples[loads] >= 1
        assert samples[("edge_requests_in_flight", ())] == 0
        assert samples[("edge_compute_waiting", ())] == 0
        directory = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", _environ(_children(proc.pid)[0]))
        assert directory and Path(directory.group(1)).is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not Path(directory.group(1)).exists(), "the supervisor removes the processes' metric files"
    finally:
        _stop_all(proc, children)


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [sys.executable, "-m", "server", "--models", str(models.model_path(MODEL).parent)]
        args += ["--host", "127.0.0.1", "--port", str(port), "--processes", "2"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_a_metrics_port_in_use_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [sys.executable, "-m", "server", "--models", str(models.model_path(MODEL).parent)]
        args += ["--host", "127.0.0.1", "--port", "0", "--processes", "2"]
        args += ["--metrics-host", "127.0.0.1", "--metrics-port", str(port)]
        env = {**os.environ, "TMPDIR": str(tmp_path)}  # where its metrics directory would be made
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert not list(tmp_path.glob("edge-metrics-*")), "its metrics directory is left"
