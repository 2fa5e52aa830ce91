"""Compute off the event loop, at the default worker count: a real ``edge-server`` process.

Covered:
- the default ``workers`` is one per core the server may run on (its CPU affinity);
- with one request computing on every core, each taking about 110 ms (tests/model_builder.py's
  slow_conv_model), health checks and model metadata keep answering: at least 40 pairs in 1.5 s
  (a loop that computed would answer about one pair per compute), and every flooding request
  gets the whole model's outputs;
- with one compute thread held by a long request, unary requests whose deadline passes while
  they wait for it are dropped before compute (DEADLINE_EXCEEDED at the caller, and counted as
  such in the server's metrics), and the server keeps serving.

How long a health check takes under load is a benchmark (README, Serving a fleet), not a test.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from model_builder import slow_conv_model

from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.protocol import pb, pb_grpc
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import seeded_inputs, start_logged
from server.settings import default_workers

MODEL = "slow"


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slow") / f"{MODEL}.tflite"
    path.write_bytes(slow_conv_model())
    return path


@contextlib.contextmanager
def _server(tmp: Path, model: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    log = tmp / "server.log"
    proc, port = start_logged(
        [sys.executable, "-m", "server", "--models", str(model.parent), "--host", "127.0.0.1",
         "--port", "0", *flags],
        log,
    )  # fmt: skip
    try:
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _metrics_port(log: Path) -> int:
    """The port edge-server said its metrics endpoint took (it was given 0)."""
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log.read_text(errors="replace"))
    assert found, log.read_text(errors="replace")
    return int(found.group(1))


def test_the_default_worker_count_is_the_cores_the_server_may_use() -> None:
    import os

    assert default_workers() == len(os.sched_getaffinity(0))
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", "from server.settings import *; print(default_workers())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert pinned.stdout.strip() == "1"


@pytest.fixture(scope="module")
def slower_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 110 ms a request here: one computing on each core leaves the event loop nothing to wait for."""
    path = tmp_path_factory.mktemp("slower") / f"{MODEL}.tflite"
    path.write_bytes(slow_conv_model(size=48, channels=512))
    return path


def test_health_and_metadata_answer_while_every_core_computes(tmp_path: Path, slower_model: Path) -> None:
    """Counted, not timed tightly: in WINDOW_S of every core computing ~110 ms requests, the loop
    answers at least 40 health-and-metadata pairs. A loop that computed would answer one pair per
    compute at best, about 14 (checked by hand with --workers 0: 9)."""
    graph = ModelGraph.from_file(slower_model)
    x = seeded_inputs(graph, 0)
    with ModelRunner(graph) as runner:
        expected = runner.run(x)
    with _server(tmp_path, slower_model) as (proc, address):  # the default workers
        stop = threading.Event()
        outcomes: list[bool] = []

        def flood() -> None:
            with TailClient(address, timeout_s=60.0) as client:
                while not stop.is_set():
                    result = client.infer(MODEL, x)
                    outcomes.append(all(np.array_equal(result.outputs[k], v) for k, v in expected.items()))

        floods = [threading.Thread(target=flood) for _ in range(default_workers())]
        for t in floods:
            t.start()
        channel = grpc.insecure_channel(address)
        try:
            health = health_pb2_grpc.HealthStub(channel)
            inference = pb_grpc.GRPCInferenceServiceStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
            deadline = time.monotonic() + 60
            while len(outcomes) < len(floods) and time.monotonic() < deadline:  # every route known
                time.sleep(0.01)
            computed_before = len(outcomes)
            pairs = 0
            window_ends = time.monotonic() + WINDOW_S
            while time.monotonic() < window_ends:
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
                assert inference.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10).name == MODEL
                pairs += 1
            computed_during = len(outcomes) - computed_before
        finally:
            stop.set()
            for t in floods:
                t.join(timeout=120)
            channel.close()
        assert all(outcomes) and computed_during >= len(floods), computed_during  # the cores were busy
        assert pairs >= 40, pairs
        assert proc.poll() is None


WINDOW_S = 1.5


def test_requests_past_their_deadline_are_dropped_before_compute(tmp_path: Path, slow_model: Path) -> None:
    """One compute thread, held by a stream of long requests; short-deadline requests queue behind it."""
    from prometheus_client.parser import text_string_to_metric_families

    graph = ModelGraph.from_file(slow_model)
    x = seeded_inputs(graph, 1)
    with _server(tmp_path, slow_model, "--workers", "1", "--metrics-port", "0") as (proc, address):
        metrics_port = _metrics_port(tmp_path / "server.log")
        with TailClient(address, timeout_s=30.0, streaming=False) as warm:
            warm.infer(MODEL, x)  # the route is built and timed: later requests go to the thread
        stop = threading.Event()

        def hold() -> None:
            with TailClient(address, timeout_s=30.0) as client:
                while not stop.is_set():
                    client.infer(MODEL, x)

        holders = [threading.Thread(target=hold) for _ in range(2)]
        for t in holders:
            t.start()
        outcomes: list[str] = []
        try:
            time.sleep(0.2)
            with TailClient(address, timeout_s=0.01, streaming=False) as hurried:
                for _ in range(10):
                    try:
                        hurried.infer(MODEL, x)
                        outcomes.append("OK")
                    except RemoteError as err:
                        outcomes.append(err.status)
                    time.sleep(0.03)
        finally:
            stop.set()
            for t in holders:
                t.join(timeout=60)
        assert set(outcomes) <= {"OK", "DEADLINE_EXCEEDED"} and "DEADLINE_EXCEEDED" in outcomes, outcomes
        # The server saw them run out, and said so: the requests were answered without compute.
        deadline = time.monotonic() + 10
        dropped = 0.0
        while time.monotonic() < deadline and dropped == 0:
            import urllib.request

            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            )
            dropped = sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "edge_requests_total" and sample.labels.get("status") == "DEADLINE_EXCEEDED"
            )
            time.sleep(0.1)
        assert dropped >= 1, text
        with TailClient(address, timeout_s=30.0) as after:
            assert after.infer(MODEL, x).outputs
        assert proc.poll() is None
