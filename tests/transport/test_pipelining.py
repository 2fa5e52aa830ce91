"""Pipelined streaming: several requests in flight on one stream, results in order, bit for bit.

Covered:
- every cut of every shipped model, with 3 in flight and a distinct input per request: each
  result equals the whole model's on its own input (a mismatched answer would fail);
- the server answers a stream's requests as they complete: a ping sent after a long request
  comes back first;
- each request keeps its own deadline: one that expires fails alone, and the others on the
  same stream are answered;
- an error answer carries its request's id: only that request fails;
- a server stopped with requests in flight: each is finished on the device, identically;
- a server without streaming, and a peer streaming another message type, get concurrent unary
  calls with identical outputs;
- the window is capped by the server's per-device limit, so a burst is never refused;
- a failover pool submits to the next server when the first is down.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from model_builder import slow_conv_model
from peers import UNARY_MODEL, ForeignStream

from edge import models, wire
from edge.cooperative import CooperativeRunner, FixedSplit
from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.pipeline import Pipeline, pipelined
from edge.runner import ModelRunner
from edge.transport import FailoverClient, TailClient
from helpers import (
    SHIPPED,
    RefusedAddress,
    pipelined_with_a_stop,
    same_outputs,
    seeded_inputs,
    whole_model_outputs,
)
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.repository import ModelRepository

WINDOW = 3


@pytest.mark.parametrize("name", SHIPPED)
def test_pipelined_results_are_bit_identical_and_in_order_at_every_cut(
    server: BackgroundServer, graphs: dict[str, ModelGraph], name: str
) -> None:
    graph = graphs[name]
    feeds = [seeded_inputs(graph, seed) for seed in range(WINDOW + 2)]
    expected = whole_model_outputs(graph, feeds)
    client = TailClient(server.address, timeout_s=30.0)
    with CooperativeRunner(ModelRunner(graph), client, model_name=name, policy=0) as device:
        for k in range(graph.num_operators):
            device.policy = FixedSplit(k)
            results = list(pipelined(device, feeds, WINDOW))
            assert [r.split_point for r in results] == [k] * len(feeds)
            assert not any(r.fallback for r in results), [r.fallback_reason for r in results]
            for i, result in enumerate(results):
                assert same_outputs(result.outputs, expected[i]), f"{name} cut {k} request {i}"


def test_the_server_answers_a_stream_as_requests_complete(tmp_path: Path) -> None:
    """Eight requests of about 6 ms each (on a compute thread, one after another), then a ping that
    computes nothing: answered in turn, the ping would come last."""
    path = tmp_path / "slow.tflite"
    path.write_bytes(slow_conv_model(size=16, channels=256))
    graph = ModelGraph.from_file(path)
    feeds = seeded_inputs(graph, 0)
    params = {wire.MODEL_SHA256: graph.sha256}
    with (
        BackgroundServer.from_files([path], workers=1) as srv,
        TailClient(srv.address, timeout_s=30.0) as client,
    ):
        client.infer("slow", feeds, parameters=params)  # loaded, and its route known
        slow = [client.submit("slow", feeds, parameters=params) for _ in range(8)]
        ping = client.submit("slow", {}, parameters={wire.PING: True, **params})
        behind = [f for f in slow if not f.done()]
        ping.result(30)
        ahead_of_ping = [f for f in behind if not f.done()]
        for future in slow:
            future.result(30)
    assert len(behind) >= 4, "the requests were answered before the ping could be sent"
    assert ahead_of_ping, "the ping waited for every request sent before it"


def test_each_request_keeps_its_own_deadline(server: BackgroundServer, graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["mobilenetv2_035"]
    feeds = seeded_inputs(graph, 1)
    expected = whole_model_outputs(graph, [feeds])[0]
    with TailClient(server.address, timeout_s=30.0) as client:
        params = {wire.MODEL_SHA256: graph.sha256}
        client.infer("mobilenetv2_035", feeds, parameters=params)
        before = client.submit("mobilenetv2_035", feeds, parameters=params)
        hasty = client.submit("mobilenetv2_035", feeds, parameters=params, timeout_s=0.0005)
        after = client.submit("mobilenetv2_035", feeds, parameters=params)
        with pytest.raises(RemoteError) as err:
            hasty.result(30)
        assert err.value.status == "DEADLINE_EXCEEDED"
        assert same_outputs(before.result(30).outputs, expected)
        assert same_outputs(after.result(30).outputs, expected)
        # The stream is still the same one: a later request is answered on it too.
        assert same_outputs(
            client.submit("mobilenetv2_035", feeds, parameters=params).result(30).outputs, expected
        )


def test_an_error_answer_fails_only_its_own_request(
    server: BackgroundServer, graphs: dict[str, ModelGraph]
) -> None:
    graph = graphs["digits_resnet"]
    feeds = seeded_inputs(graph, 2)
    expected = whole_model_outputs(graph, [feeds])[0]
    params = {wire.MODEL_SHA256: graph.sha256}
    with TailClient(server.address, timeout_s=30.0) as client:
        futures = [
            client.submit("digits_resnet", feeds, parameters=params),
            client.submit("no_such_model", feeds, parameters=params),
            client.submit("digits_resnet", feeds, parameters=params),
        ]
        assert same_outputs(futures[0].result(30).outputs, expected)
        with pytest.raises(RemoteError) as err:
            futures[1].result(30)
        assert err.value.status == "NOT_FOUND"
        assert same_outputs(futures[2].result(30).outputs, expected)


def test_requests_in_flight_when_the_server_stops_finish_on_the_device(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["mobilenetv2_035"]
    feeds = [seeded_inputs(graph, seed) for seed in range(12)]
    expected = whole_model_outputs(graph, feeds)
    srv = BackgroundServer.from_files([models.model_path("mobilenetv2_035")], workers=1)
    srv.start()
    client = TailClient(srv.address, timeout_s=10.0)
    with CooperativeRunner(ModelRunner(graph), client, model_name="mobilenetv2_035", policy=10) as device:
        results = pipelined_with_a_stop(device, feeds, 8, 8, srv.stop)
    assert sorted(results) == list(range(len(feeds)))
    for i, result in results.items():
        assert same_outputs(result.outputs, expected[i]), i
    assert any(r.fallback for r in results.values())


def test_a_server_without_streaming_gets_concurrent_unary_calls(
    unary_only_server: str, graphs: dict[str, ModelGraph]
) -> None:
    graph = graphs[UNARY_MODEL]
    feeds = [seeded_inputs(graph, seed) for seed in range(6)]
    expected = whole_model_outputs(graph, feeds)
    client = TailClient(unary_only_server, timeout_s=10.0)
    with CooperativeRunner(ModelRunner(graph), client, model_name=UNARY_MODEL, policy=6) as device:
        results = list(pipelined(device, feeds, WINDOW))
        assert not client.streaming  # learnt by the pipe, known to the client's every session
    assert not any(r.fallback for r in results), [r.fallback_reason for r in results]
    assert all(same_outputs(r.outputs, e) for r, e in zip(results, expected, strict=True))


def test_a_peer_streaming_other_messages_gets_unary_calls_when_pipelined(
    graphs: dict[str, ModelGraph],
) -> None:
    graph = graphs["digits_resnet"]
    feeds = [seeded_inputs(graph, seed) for seed in range(6)]
    expected = whole_model_outputs(graph, feeds)
    repository = ModelRepository.from_files([models.model_path("digits_resnet")])
    peer = ForeignStream(DataPlane(repository), "1")
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((peer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = TailClient(f"127.0.0.1:{port}", timeout_s=10.0)
        with CooperativeRunner(ModelRunner(graph), client, model_name="digits_resnet", policy=6) as device:
            results = list(pipelined(device, feeds, WINDOW))
        assert not any(r.fallback for r in results), [r.fallback_reason for r in results]
        assert all(same_outputs(r.outputs, e) for r, e in zip(results, expected, strict=True))
        assert peer.streamed <= WINDOW  # what the stream held went again as unary calls, then only those
    finally:
        server.stop(0)
        repository.close()


def test_the_window_is_capped_by_the_servers_limit_per_device(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    feeds = [seeded_inputs(graph, seed) for seed in range(40)]
    expected = whole_model_outputs(graph, feeds)
    with BackgroundServer.from_files(
        [models.model_path("digits_resnet")], workers=1, max_inflight_per_device=2
    ) as srv:
        client = TailClient(srv.address, timeout_s=10.0)
        assert client.max_inflight() == 2
        with CooperativeRunner(ModelRunner(graph), client, model_name="digits_resnet", policy=6) as device:
            pipeline: Pipeline[int] = Pipeline(device, 16)
            assert pipeline.window == 2
            results = [d.result for f in feeds for d in pipeline.put(f, 0)] + [
                d.result for d in pipeline.drain()
            ]
            # edge bench reports that window, not the one asked for.
            from edge.cli.bench_cmd import measure

            report = measure(device, feeds[:10], 10, 2, inflight=16)
            assert report["inflight"] == 2 and report["fallbacks"] == 0
    assert [r.fallback_reason for r in results if r.fallback] == []
    assert all(same_outputs(r.outputs, e) for r, e in zip(results, expected, strict=True))


def test_a_failover_pool_submits_to_the_next_server(
    server: BackgroundServer, graphs: dict[str, ModelGraph], refused: RefusedAddress
) -> None:
    graph = graphs["digits_resnet"]
    feeds = seeded_inputs(graph, 3)
    expected = whole_model_outputs(graph, [feeds])[0]
    params = {wire.MODEL_SHA256: graph.sha256, wire.SPLIT_POINT: 0}
    down = TailClient(refused.address, timeout_s=2.0)
    with FailoverClient([down, TailClient(server.address, timeout_s=10.0)]) as pool:
        result = pool.submit("digits_resnet", feeds, parameters=params).result(30)
        assert same_outputs(result.outputs, expected)
        assert pool.order()[0] == 1  # the one that failed is tried last now


def test_submitting_to_an_unreachable_server_fails_the_future_not_the_caller(
    graphs: dict[str, ModelGraph], refused: RefusedAddress
) -> None:
    graph = graphs["digits_resnet"]
    feeds = seeded_inputs(graph, 4)
    with TailClient(refused.address, timeout_s=0.5) as client:
        future = client.submit("digits_resnet", feeds, parameters={wire.MODEL_SHA256: graph.sha256})
        error = future.exception(10)
    assert isinstance(error, RemoteError) and error.status in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    with CooperativeRunner(
        ModelRunner(graph),
        TailClient(refused.address, timeout_s=0.5),
        model_name="digits_resnet",
        policy=6,
    ) as device:
        (result,) = pipelined(device, [feeds], 2)
    assert result.fallback and same_outputs(result.outputs, whole_model_outputs(graph, [feeds])[0])
