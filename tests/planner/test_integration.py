"""--split-at auto and the profile request against a real edge server on loopback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as triton

from edge import models
from edge.autosplit import AutoSplit
from edge.cli import main
from edge.cooperative import CooperativeRunner
from edge.errors import RemoteError
from edge.policy import make_policy
from edge.runner import ModelRunner
from edge.transport import TailClient, tail_profile
from helpers import digit_inputs

MODEL = "digits_resnet"


def test_profile_request_returns_every_cut(client, graphs):
    graph = graphs[MODEL]
    n = graph.num_operators
    profile = tail_profile(client, MODEL, model_sha256=graph.sha256)
    assert profile.shape == (n + 1,)
    assert profile[n] == 0.0 and (profile[:n] > 0).all()
    # Measured once per model: the second answer is the cached one.
    assert np.array_equal(tail_profile(client, MODEL), profile)


def test_profile_request_checks_the_model(client):
    with pytest.raises(RemoteError) as err:
        tail_profile(client, MODEL, model_sha256="0" * 64)
    assert err.value.status == "FAILED_PRECONDITION"


def test_profile_request_carries_no_inputs(client, graphs):
    graph = graphs[MODEL]
    x = digit_inputs(graph, 1)[0]
    with pytest.raises(RemoteError) as err:
        client.infer(MODEL, x, parameters={"profile": True})
    assert err.value.status == "INVALID_ARGUMENT"


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "unary"])
def test_ping_runs_nothing_and_answers(server, graphs, streaming):
    graph = graphs[MODEL]
    with TailClient(server.address, streaming=streaming) as client:
        result = client.infer(MODEL, {}, parameters={"ping": True, "model_sha256": graph.sha256})
        assert result.outputs == {} and result.bytes_sent == 0
        assert result.compute_ms < 1.0 and result.transfer_ms > 0
        x = digit_inputs(graph, 1)[0]
        cases = [
            ({"ping": True}, x, "INVALID_ARGUMENT"),  # a ping carries no inputs
            ({"ping": 1}, {}, "INVALID_ARGUMENT"),
            ({"ping": True, "model_sha256": "0" * 64}, {}, "FAILED_PRECONDITION"),
        ]
        for parameters, inputs, status in cases:
            with pytest.raises(RemoteError) as err:
                client.infer(MODEL, inputs, parameters=parameters)
            assert err.value.status == status
        assert client.streaming is streaming


def test_tritonclient_with_and_without_profile(server, graphs):
    graph = graphs[MODEL]
    x = digit_inputs(graph, 1)[0][graph.inputs[0].name]
    tc = triton.InferenceServerClient(url=server.address)
    # An ordinary OIP request, without the parameter: the whole model, as before.
    tensor = triton.InferInput(graph.inputs[0].name, list(x.shape), "INT8")
    tensor.set_data_from_numpy(x)
    plain = tc.infer(MODEL, [tensor])
    with ModelRunner(graph) as runner:
        expected = runner.run({graph.inputs[0].name: x})
    for t in graph.outputs:
        assert np.array_equal(plain.as_numpy(t.name), expected[t.name])
    # The profile request, as any OIP client can send it.
    profiled = tc.infer(MODEL, [], parameters={"profile": True})
    tail_ms = profiled.as_numpy("tail_ms")
    assert tail_ms.dtype == np.float32 and tail_ms.shape == (graph.num_operators + 1,)
    tc.close()


@pytest.mark.parametrize(
    ("options", "offloads"),
    [
        ({"objective": "latency"}, None),
        # Computing is dear and sending is cheap: the plan hands work to the server.
        ({"objective": "energy", "compute_watts": 100.0, "radio_watts": 0.001}, True),
        ({"objective": "bytes"}, False),
    ],
)
def test_auto_split_outputs_equal_the_whole_model(server, graphs, options, offloads):
    graph = graphs[MODEL]
    runner = ModelRunner(graph)
    client = TailClient(server.address, timeout_s=30.0)
    policy = make_policy(
        graph, "auto", runner=runner, client=client, model_name=MODEL, progress=False, **options
    )
    assert isinstance(policy, AutoSplit) and policy.reachable
    device = CooperativeRunner(runner, client, model_name=MODEL, policy=policy)
    results = []
    try:
        for feeds in digit_inputs(graph, 12):
            result = device.infer(feeds)
            expected = runner.run(feeds)
            assert not result.fallback
            for name, array in expected.items():
                assert np.array_equal(result.outputs[name], array)
            results.append(result)
    finally:
        device.close()
        runner.close()
    if offloads is not None:
        assert any(r.offloaded for r in results) == offloads
    assert all(r.split_point == policy.hysteresis.current for r in results[-1:])


def test_auto_split_without_a_server_runs_locally(graphs, refused):
    graph = graphs[MODEL]
    runner = ModelRunner(graph)
    client = TailClient(refused.address, timeout_s=0.5)
    policy = make_policy(graph, "auto", runner=runner, client=client, model_name=MODEL, progress=False)
    assert isinstance(policy, AutoSplit) and not policy.reachable
    device = CooperativeRunner(runner, client, model_name=MODEL, policy=policy)
    try:
        for feeds in digit_inputs(graph, 3):
            result = device.infer(feeds)
            assert result.split_point == graph.num_operators and not result.offloaded
            for name, array in runner.run(feeds).items():
                assert np.array_equal(result.outputs[name], array)
    finally:
        device.close()
        runner.close()


def test_edge_plan_json(server, graphs, capsys):
    graph = graphs[MODEL]
    n = graph.num_operators
    code = main(
        ["plan", str(models.model_path(MODEL)), "--server", server.address, "--json", "--probes", "2"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["choice"] <= n
    cuts = report["cuts"]
    assert [c["index"] for c in cuts] == list(range(n + 1))
    assert all({"index", "predicted_ms", "head_ms", "tail_ms", "bytes"} <= set(c) for c in cuts)
    assert [c["bytes"] for c in cuts] == [graph.cut(k).nbytes for k in range(n + 1)]
    best = min(c["predicted_ms"] for c in cuts)
    assert cuts[report["choice"]]["predicted_ms"] == best
    assert report["link"]["rtt_ms"] > 0 and report["link"]["bandwidth_mbit_s"] > 0


def test_edge_plan_constraint_that_nothing_meets(server, capsys):
    code = main(
        ["plan", MODEL, "--server", server.address, "--json", "--probes", "1", "--deadline-ms", "0.000001"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["met_constraints"] is False and "no cut meets deadline" in report["note"]
