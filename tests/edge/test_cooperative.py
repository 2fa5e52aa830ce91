"""Split inference through a real server: outputs equal the whole model's, and fallback keeps them so.

Covered: every cut 0..N of every shipped model (helpers.SHIPPED: digits_resnet, digits_resnet_exit with
its two outputs, digits_resnet_f32, digits_tiny and mobilenetv2_035), multi-tensor cuts included, and mobilenetv2_035's cut tensors named with up to 402
characters. Inputs: a seeded random tensor spanning the input's range.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge import models
from edge.cooperative import CooperativeRunner
from edge.errors import TensorFormatError
from edge.graph import ModelGraph
from edge.protocol import pb, pb_grpc
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import SHIPPED, grpc_peer, seeded_inputs
from server.embedded import BackgroundServer


def _cases() -> list[tuple[str, int]]:
    cases = []
    for name in SHIPPED:
        n = ModelGraph.from_file(models.model_path(name)).num_operators
        cases += [(name, k) for k in range(n + 1)]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def runners(graphs: dict[str, ModelGraph]) -> dict[str, ModelRunner]:
    return {name: ModelRunner(graph) for name, graph in graphs.items()}


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> TailClient:
    return TailClient(server.address, timeout_s=10.0)


@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-K{k}" for n, k in CASES])
def test_outputs_through_the_network_equal_the_whole_model(
    name: str, k: int, runners: dict[str, ModelRunner], client: TailClient
) -> None:
    runner = runners[name]
    graph = runner.graph
    device = CooperativeRunner(runner, client, model_name=name, policy=k)
    for seed in (3, 4):
        feeds = seeded_inputs(graph, seed)
        result = device.infer(feeds)
        expected = runner.run(feeds)
        assert not result.fallback, result.fallback_reason
        assert result.split_point == k
        assert list(result.outputs) == [t.name for t in graph.outputs]
        for out, want in expected.items():
            assert result.outputs[out].dtype == want.dtype
            assert np.array_equal(result.outputs[out], want), f"{name} cut {k}: {out} differs"
        cut = graph.cut(k)
        if k < graph.num_operators:
            assert result.offloaded and result.bytes_sent == cut.nbytes
            assert result.timings.tail_ms > 0
        else:
            assert not result.offloaded and result.bytes_sent == 0


def test_cut_zero_sends_the_raw_input(graphs: dict[str, ModelGraph], client: TailClient) -> None:
    graph = graphs["digits_resnet"]
    device = CooperativeRunner(ModelRunner(graph), client, model_name="digits_resnet", policy=0)
    result = device.infer(seeded_inputs(graph, 0))
    assert result.bytes_sent == graph.inputs[0].nbytes == 1024
    assert result.timings.head_ms < result.timings.e2e_ms


def test_last_cut_and_local_never_touch_the_network(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    nowhere = TailClient("127.0.0.1:9", timeout_s=0.5)  # the discard port: nothing listens
    runner = ModelRunner(graph)
    feeds = seeded_inputs(graph, 0)
    for device in (
        CooperativeRunner(runner, nowhere, model_name="digits_resnet", policy=graph.num_operators),
        CooperativeRunner(runner, None, model_name="digits_resnet", policy=3),
    ):
        result = device.infer(feeds)
        assert not result.fallback and not result.offloaded and result.fallback_reason is None
        assert np.array_equal(result.outputs[graph.outputs[0].name], runner.run(feeds)[graph.outputs[0].name])


class _SlowServicer(pb_grpc.GRPCInferenceServiceServicer):
    """A real gRPC peer that takes longer than any deadline the test sets."""

    def ModelInfer(self, request: object, context: grpc.ServicerContext) -> object:  # noqa: N802
        time.sleep(2.0)
        return pb.ModelInferResponse()


def test_deadline_exceeded_falls_back_with_identical_outputs(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["mobilenetv2_035"]
    runner = ModelRunner(graph)
    with grpc_peer(_SlowServicer()) as address:
        device = CooperativeRunner(
            runner, TailClient(address), model_name="mobilenetv2_035", policy=33, timeout_s=0.3
        )
        feeds = seeded_inputs(graph, 5)
        result = device.infer(feeds)
    assert result.fallback and "DEADLINE_EXCEEDED" in (result.fallback_reason or "")
    expected = runner.run(feeds)
    assert all(np.array_equal(result.outputs[k], v) for k, v in expected.items())


def test_model_mismatch_falls_back_and_says_why(graphs: dict[str, ModelGraph], client: TailClient) -> None:
    """A device whose model differs from the server's still answers, from its own copy."""
    graph = graphs["digits_tiny"]
    device = CooperativeRunner(ModelRunner(graph), client, model_name="digits_resnet", policy=2)
    result = device.infer(seeded_inputs(graph, 0))
    assert result.fallback
    assert graph.sha256 in (result.fallback_reason or "")


def test_server_killed_mid_run(graphs: dict[str, ModelGraph], server_process: tuple) -> None:
    """A real edge-server process killed part-way: later requests fall back, every output stays identical."""
    proc, address = server_process
    graph = graphs["digits_resnet"]
    runner = ModelRunner(graph)
    client = TailClient(address, timeout_s=5.0)
    device = CooperativeRunner(runner, client, model_name="digits_resnet", policy=6, timeout_s=5.0)
    results = []
    for i in range(40):
        if i == 20:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        feeds = seeded_inputs(graph, 100 + i)
        result = device.infer(feeds)
        expected = runner.run(feeds)
        assert np.array_equal(result.outputs[graph.outputs[0].name], expected[graph.outputs[0].name])
        results.append(result)
    assert [r.fallback for r in results[:20]] == [False] * 20
    assert [r.fallback for r in results[20:]] == [True] * 20
    assert all("UNAVAILABLE" in (r.fallback_reason or "") for r in results[20:])
    assert client.streaming, "a dead server is not one without streaming"


def test_device_recovers_when_the_server_comes_back(graphs: dict[str, ModelGraph], tmp_path: Path) -> None:
    graph = graphs["digits_tiny"]
    first = BackgroundServer.from_files([models.model_path("digits_tiny")])
    first.start()
    port = int(first.address.rsplit(":", 1)[1])
    runner = ModelRunner(graph)
    client = TailClient(first.address)
    device = CooperativeRunner(runner, client, model_name="digits_tiny", policy=2, timeout_s=5.0)
    feeds = seeded_inputs(graph, 0)
    assert not device.infer(feeds).fallback
    first.stop()
    assert device.infer(feeds).fallback
    with BackgroundServer.from_files([models.model_path("digits_tiny")], port=port):
        # gRPC reconnects within its (short, capped) backoff; then requests offload again.
        deadline = time.monotonic() + 15
        while device.infer(feeds).fallback:
            assert time.monotonic() < deadline, "the device never offloaded again"
            time.sleep(0.05)
        assert not device.infer(feeds).fallback
        assert client.streaming


def test_the_device_refuses_bad_inputs_before_anything_runs(graphs: dict[str, ModelGraph]) -> None:
    """Checked on the device for every cut, K = 0 included, where no head would catch them."""
    graph = graphs["digits_tiny"]
    (spec,) = graph.inputs
    good = seeded_inputs(graph, 0)
    device = CooperativeRunner(ModelRunner(graph), None, model_name="digits_tiny", policy=0)
    cases = {
        "missing input": {},
        "unexpected input(s): zzz": {**good, "zzz": good[spec.name]},
        "must be": {spec.name: good[spec.name].astype(np.float64)},
    }
    for message, feeds in cases.items():
        with pytest.raises(TensorFormatError, match=re.escape(message)):
            device.infer(feeds)
