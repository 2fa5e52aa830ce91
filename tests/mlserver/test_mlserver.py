"""Tails on a real MLServer: ``edge export mlserver``, ``mlserver start`` in a subprocess, the device.

MLServer runs from its own venv (``tests/run.sh`` makes ``.venv-mlserver``: MLServer 1.7.1 wants
protobuf < 7); the device side runs here. Covered, at ``parallel_workers`` 0 (in MLServer's own
process), 1 and 2:
- every cut of every shipped digits model through the runtime, bit for bit against the whole model;
- the tails exported under their own names (digits_resnet@8, @12), batched by MLServer
  (max_batch_size 4), pipelined: bit for bit, and batches of more than one were run;
- the device's stream attempt (MLServer answers its stream with another message) and unary
  calls both give the same outputs;
- a stock client (tritonclient, plain INT8 tensors, no packing) gets the same outputs too;
- the same errors as edge-server: a wrong model_sha256 is FAILED_PRECONDITION, a bad cut
  INVALID_ARGUMENT, an unknown model NOT_FOUND, and a malformed packed tensor INVALID_ARGUMENT;
- ``--split-at auto`` offloads through it (it answers profile and ping), with a device
  profile cached 1,000 times slower (digits_resnet takes 0.07 ms here: 70 ms then);
- MLServer killed: the device finishes locally, with identical outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from edge import models, wire
from edge.cooperative import CooperativeRunner, FixedSplit
from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.pipeline import pipelined
from edge.policy import make_policy
from edge.runner import ModelRunner
from edge.transport import TailClient
from edge.transport.base import ping, tail_profile
from helpers import MLSERVER, RefusedAddress, same_outputs, seeded_inputs, slow_device_profile
from server.export import write_mlserver

DIGITS = ["digits_resnet", "digits_resnet_exit", "digits_resnet_f32", "digits_tiny"]
CUT_MODELS = (8, 12)


class MLServer:
    """``mlserver start DIR`` in a subprocess, on free ports; its gRPC address once every model loaded."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "mlserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout_s: float = 90.0) -> str:
        if not MLSERVER.exists():
            raise RuntimeError(f"no MLServer at {MLSERVER}: bash tests/run.sh makes .venv-mlserver")
        settings = json.loads((self.folder / "settings.json").read_text())
        # MLServer cannot take port 0 and say which it took: three ports the kernel gave, held
        # (bound, not listening) until now.
        held = [RefusedAddress() for _ in range(3)]
        port, http_port, metrics_port = (h.release() for h in held)
        settings.update(grpc_port=port, http_port=http_port, metrics_port=metrics_port)
        (self.folder / "settings.json").write_text(json.dumps(settings))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(MLSERVER), "start", str(self.folder)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,  # its workers too are killed with the group
            )
        self.address = f"127.0.0.1:{port}"
        expected = {p.parent.name for p in self.folder.glob("*/model-settings.json")}
        deadline = time.monotonic() + timeout_s
        with TailClient(self.address, timeout_s=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"mlserver exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}"
                    )
                loaded = self.log.read_text().count("successfully")
                if client.ready(1.0) and loaded >= len(expected):
                    return self.address
                time.sleep(0.2)
        raise TimeoutError(f"mlserver not ready in {timeout_s}s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to MLServer and its workers."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # whatever of the group is left


def export(folder: Path, workers: int) -> None:
    for name in DIGITS:
        graph = ModelGraph.from_file(models.model_path(name))
        cuts = CUT_MODELS if name == "digits_resnet" else ()
        write_mlserver(
            graph, folder, cuts=cuts, parallel_workers=workers, max_batch_size=4, max_batch_time_ms=20.0
        )


@pytest.fixture(scope="module", params=[0, 1, 2], ids=["in-process", "workers-1", "workers-2"])
def mlserver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServer]:
    folder = tmp_path_factory.mktemp(f"mlserver-{request.param}")
    export(folder, request.param)
    server = MLServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("name", DIGITS)
def test_every_cut_through_mlserver_is_bit_identical(
    mlserver: MLServer, graphs: dict[str, ModelGraph], name: str
) -> None:
    graph = graphs[name]
    feeds = seeded_inputs(graph, 0)
    with ModelRunner(graph) as whole:
        expected = whole.run(feeds)
    client = TailClient(mlserver.address, timeout_s=30.0)
    with CooperativeRunner(ModelRunner(graph), client, model_name=name, policy=0) as device:
        for k in range(graph.num_operators):
            device.policy = FixedSplit(k)
            result = device.infer(feeds)
            assert not result.fallback, f"cut {k}: {result.fallback_reason}"
            assert same_outputs(result.outputs, expected), f"{name} cut {k}"
            assert result.remote is not None and result.remote.compute_ms > 0
            assert wire.QUEUE_US in result.remote.parameters


def test_tails_under_their_own_names_are_batched_and_bit_identical(
    mlserver: MLServer, graphs: dict[str, ModelGraph]
) -> None:
    graph = graphs["digits_resnet"]
    feeds = [seeded_inputs(graph, seed) for seed in range(24)]
    with ModelRunner(graph) as whole:
        expected = [whole.run(f) for f in feeds]
    for k in CUT_MODELS:
        client = TailClient(mlserver.address, timeout_s=30.0)
        with CooperativeRunner(ModelRunner(graph), client, model_name="digits_resnet", policy=k) as device:
            results = list(pipelined(device, feeds, 8))
        assert [r.fallback_reason for r in results if r.fallback] == []
        assert all(same_outputs(r.outputs, e) for r, e in zip(results, expected, strict=True)), k
        assert {r.remote.parameters.get(wire.SPLIT_POINT) for r in results if r.remote} == {k}
        batched = [int(r.remote.parameters.get(wire.BATCH_SIZE, 1)) for r in results if r.remote]
        assert max(batched) > 1, f"cut {k}: no request ran in a batch ({batched})"


@pytest.mark.parametrize("streaming", [True, False], ids=["stream-first", "unary"])
def test_stream_and_unary_give_the_same_outputs(
    mlserver: MLServer, graphs: dict[str, ModelGraph], streaming: bool
) -> None:
    graph = graphs["digits_resnet"]
    feeds = seeded_inputs(graph, 5)
    with ModelRunner(graph) as whole:
        expected = whole.run(feeds)
    client = TailClient(mlserver.address, timeout_s=30.0, streaming=streaming)
    with CooperativeRunner(ModelRunner(graph), client, model_name="digits_resnet", policy=6) as device:
        for _ in range(3):
            result = device.infer(feeds)
            assert not result.fallback, result.fallback_reason
            assert same_outputs(result.outputs, expected)
        assert not client.streaming  # MLServer's stream answers with ModelInferResponse: unary from then on


def test_a_stock_client_gets_the_same_outputs(mlserver: MLServer, graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    feeds = seeded_inputs(graph, 7)
    with ModelRunner(graph) as runner:
        cut = dict(runner.run_head(6, feeds).cut)
        expected = runner.run_tail(6, cut)
    client = triton.InferenceServerClient(mlserver.address)
    inputs = []
    for name, array in cut.items():
        tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    reply = client.infer("digits_resnet", inputs, parameters={"split_point": 6, "model_sha256": graph.sha256})
    for name, array in expected.items():
        assert np.array_equal(reply.as_numpy(name), array), name
    client.close()


def test_errors_keep_edge_servers_status(mlserver: MLServer, graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    with ModelRunner(graph) as runner:
        cut = dict(runner.run_head(6, seeded_inputs(graph, 1)).cut)
    with TailClient(mlserver.address, timeout_s=30.0) as client:
        cases = {
            "FAILED_PRECONDITION": ("digits_resnet", {wire.SPLIT_POINT: 6, wire.MODEL_SHA256: "0" * 64}),
            "INVALID_ARGUMENT": ("digits_resnet", {wire.SPLIT_POINT: 7, wire.MODEL_SHA256: graph.sha256}),
            "NOT_FOUND": ("no_such_model", {wire.SPLIT_POINT: 6}),
        }
        for status, (model, params) in cases.items():
            with pytest.raises(RemoteError) as err:
                client.infer(model, cut, parameters=params)
            assert err.value.status == status, err.value


def test_a_malformed_packed_tensor_is_invalid_argument(
    mlserver: MLServer, graphs: dict[str, ModelGraph]
) -> None:
    graph = graphs["digits_resnet"]
    with ModelRunner(graph) as runner:
        (name,) = dict(runner.run_head(8, seeded_inputs(graph, 1)).cut)
    client = triton.InferenceServerClient(mlserver.address)
    tensor = triton.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"EDG1 not a header"], dtype=np.object_))
    with pytest.raises(triton.InferenceServerException) as err:
        client.infer("digits_resnet", [tensor], parameters={"split_point": 8, "model_sha256": graph.sha256})
    client.close()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    assert "packed tensor" in err.value.message()


def test_auto_split_offloads_through_mlserver(
    mlserver: MLServer, graphs: dict[str, ModelGraph], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = graphs["digits_resnet"]
    n = graph.num_operators
    with TailClient(mlserver.address, timeout_s=60.0) as client:
        profile = tail_profile(client, "digits_resnet", model_sha256=graph.sha256, timeout_s=60.0)
        assert profile.shape == (n + 1,) and np.isfinite(profile).all()
        assert ping(client, "digits_resnet", model_sha256=graph.sha256).outputs == {}
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path))
    runner = ModelRunner(graph)
    slow_device_profile(runner, tmp_path, 1000.0)
    client = TailClient(mlserver.address, timeout_s=30.0)
    policy = make_policy(
        graph, "auto", runner=runner, client=client, model_name="digits_resnet", progress=False
    )
    feeds = seeded_inputs(graph, 3)
    with ModelRunner(graph) as whole:
        expected = whole.run(feeds)
    with CooperativeRunner(runner, client, model_name="digits_resnet", policy=policy) as device:
        results = [device.infer(feeds) for _ in range(5)]
    assert any(r.split_point < n and not r.fallback for r in results), [
        (r.split_point, r.fallback_reason) for r in results
    ]
    assert all(same_outputs(r.outputs, expected) for r in results)


def test_the_device_finishes_locally_when_mlserver_is_killed(
    graphs: dict[str, ModelGraph], tmp_path: Path
) -> None:
    export(tmp_path, 1)
    server = MLServer(tmp_path)
    graph = graphs["digits_resnet"]
    feeds = seeded_inputs(graph, 2)
    with ModelRunner(graph) as whole:
        expected = whole.run(feeds)
    try:
        server.start()
        client = TailClient(server.address, timeout_s=5.0)
        with CooperativeRunner(ModelRunner(graph), client, model_name="digits_resnet", policy=8) as device:
            before = device.infer(feeds)
            assert not before.fallback, before.fallback_reason
            server.kill()
            after = device.infer(feeds)
            assert after.fallback
            assert same_outputs(before.outputs, expected) and same_outputs(after.outputs, expected)
    finally:
        server.stop()


def test_metadata_lists_inputs_and_outputs(mlserver: MLServer, graphs: dict[str, ModelGraph]) -> None:
    """The runtime's metadata names the model's tensors (the settings name none), and a tail's its cut's."""
    graph = graphs["digits_resnet"]
    client = triton.InferenceServerClient(mlserver.address)
    whole = client.get_model_metadata("digits_resnet", as_json=True)
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in whole["inputs"]] == [
        (t.name, "INT8", list(t.shape)) for t in graph.inputs
    ]
    assert [t["name"] for t in whole["outputs"]] == [t.name for t in graph.outputs]
    tail = client.get_model_metadata("digits_resnet@8", as_json=True)
    assert [t["name"] for t in tail["inputs"]] == [t.name for t in graph.cut(8).tensors]
    client.close()


def test_a_refusal_logs_one_line_not_a_traceback(mlserver: MLServer, graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    with ModelRunner(graph) as runner:
        cut = dict(runner.run_head(6, seeded_inputs(graph, 1)).cut)
    before = mlserver.log.read_text(errors="replace").count("Traceback")
    with TailClient(mlserver.address, timeout_s=30.0) as client:
        for _ in range(3):
            with pytest.raises(RemoteError):
                client.infer(
                    "digits_resnet", cut, parameters={wire.SPLIT_POINT: 7, wire.MODEL_SHA256: graph.sha256}
                )
    time.sleep(0.5)  # the workers' log lines reach the file
    text = mlserver.log.read_text(errors="replace")
    assert text.count("Traceback") == before, text[-3000:]
    assert "INVALID_ARGUMENT" in text
