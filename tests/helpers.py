"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from edge import models
from edge.cooperative import CooperativeRunner, InferenceResult
from edge.graph import ModelGraph
from edge.pipeline import Pipeline
from edge.preprocess import random_inputs
from edge.profiler import HeadProfile, load_or_profile, profile_path
from edge.protocol import pb_grpc
from edge.runner import ModelRunner

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")

MLSERVER = Path(os.environ.get("EDGE_MLSERVER", REPO / ".venv-mlserver" / "bin" / "mlserver"))
"""MLServer's command, in the venv of its own tests/run.sh makes (MLServer 1.7.1 wants protobuf < 7)."""

ZOO_DIR = REPO / "tests" / "zoo"
"""The model zoo (tools/build_zoo.py --zoo): the shapes pretrained models arrive in."""
ZOO_RUNNABLE = [
    "control_flow",
    "dynamic_range",
    "float_classifier",
    "fp16_weights",
    "int8_uint8_io",
    "sparse_weights",
    "ssd_detector",
]
"""The zoo models every backend runs (unknown_custom_op is the one none does)."""

# What tools/build_models.py ships; a missing one fails at collection.
SHIPPED = [
    "digits_resnet",
    "digits_resnet_exit",
    "digits_resnet_f32",
    "digits_tiny",
    "mobilenetv2_035",
    "shapes_cnn",
]

# The numpy type each OIP datatype must map to, written out independently of edge.wire.
NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def seeded_inputs(graph: ModelGraph, seed: int) -> dict[str, np.ndarray]:
    """A reproducible input covering the whole value range of each model input."""
    return random_inputs(graph, seed)


def digit_inputs(graph: ModelGraph, count: int) -> list[dict[str, np.ndarray]]:
    """Real held-out digits, as the model takes them (int8, or the float originals for float models)."""
    sample = models.digits_sample()
    x = sample.x if graph.inputs[0].dtype == np.int8 else sample.x_float
    return [{graph.inputs[0].name: x[i : i + 1]} for i in range(count)]


_LISTENING = r"listening on (?:127\.0\.0\.1|\[::1\]|0\.0\.0\.0):(\d+)"


def start_logged(args: list[str], log: Path, timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``args`` (a server told to listen on port 0) and read the port it took from its log
    ("listening on 127.0.0.1:PORT", as edge-server and the delay proxy say)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(_LISTENING, log.read_text(errors="replace"))
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"{' '.join(args[:3])} did not start: {log.read_text(errors='replace')}")


class RefusedAddress:
    """A loopback address where nothing listens, held: a socket bound to it that never listens, so
    a connection is refused at once and no other server can take the port. :meth:`release` frees it
    for a server the test starts there later."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"

    def release(self) -> int:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        return self.port

    def __enter__(self) -> RefusedAddress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = log.read_text() if log is not None and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@contextlib.contextmanager
def grpc_peer(servicer: object) -> Iterator[str]:
    """A real (synchronous) gRPC server on a free loopback port holding ``servicer``; yields its address."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def slow_device_profile(runner: ModelRunner, cache: Path, factor: float) -> None:
    """Measure ``runner``'s head profile, and cache it ``factor`` times slower under ``cache``, where
    the planner (EDGE_CACHE_DIR) finds it: a device slower than the server it shares a CPU with."""
    measured = load_or_profile(runner, root=cache, progress=False, runs=5)
    path = profile_path(measured.model_sha256, measured.backend, measured.threads, root=cache)
    slow = HeadProfile(
        measured.model_sha256,
        measured.backend,
        measured.threads,
        tuple(ms * factor for ms in measured.head_ms),
        measured.runs,
        measured.warmup,
    )
    path.write_text(slow.to_json())


def same_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> bool:
    """The same output names, and each array equal to the last bit."""
    return set(got) == set(want) and all(np.array_equal(got[k], v) for k, v in want.items())


def whole_model_outputs(graph: ModelGraph, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """What the whole model gives for each of ``feeds``, run here."""
    with ModelRunner(graph) as whole:
        return [whole.run(f) for f in feeds]


def pipelined_with_a_stop(
    device: CooperativeRunner,
    feeds: list[dict[str, np.ndarray]],
    window: int,
    stop_at: int,
    stop: Callable[[], None],
) -> dict[int, InferenceResult]:
    """Each of ``feeds``' results by its index, put through a :class:`~edge.pipeline.Pipeline` of
    ``window`` on ``device``; ``stop()`` (the server stopping) is called before feed ``stop_at`` goes."""
    pipeline: Pipeline[int] = Pipeline(device, window)
    results: dict[int, InferenceResult] = {}
    for i, feed in enumerate(feeds):
        if i == stop_at:
            stop()
        for done in pipeline.put(feed, i):
            results[done.tag] = done.result
    for done in pipeline.drain():
        results[done.tag] = done.result
    return results


MINIMAL_PROFILE = """
device_id = "dev-1"
[model]
path = "digits_resnet"
[split]
type = "fixed"
k = 8
[mqtt]
host = "localhost"
[[sensors]]
topic = "sensors/+/digits"
format = "json"
"""
"""The smallest device profile that loads: the daemon tests' base, edited per case."""
