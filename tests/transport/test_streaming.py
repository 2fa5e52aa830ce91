"""The device's transport: tail requests on one ModelStreamInfer stream, unary calls for servers without one.

Covered: many requests share one stream and give the whole model's outputs; a server without
streaming gets unary calls with the same outputs; errors on the stream keep their gRPC status and
leave the stream usable; a stream that does not answer in time is DEADLINE_EXCEEDED and the next
request opens a new one; a stopping server ends idle streams at once instead of waiting out its
grace period; the client refuses to block inside a coroutine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from peers import ForeignStream

from edge import models
from edge.cooperative import CooperativeRunner
from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.link import LinkEstimator, LinkProber
from edge.preprocess import random_tensors
from edge.protocol import pb_grpc
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import grpc_peer, seeded_inputs
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.grpc_service import EdgeServer, InferenceServicer
from server.repository import ModelRepository

MODEL = "digits_resnet"
CUT = 6


@pytest.fixture
def counted() -> Iterator[tuple[BackgroundServer, list[int]]]:
    """A real server whose servicer counts the calls it receives: [ModelStreamInfer, ModelInfer, ServerReady]."""
    counts = [0, 0, 0]

    class Counting(InferenceServicer):
        async def ModelStreamInfer(self, requests: Any, context: Any) -> None:  # noqa: N802
            counts[0] += 1
            await super().ModelStreamInfer(requests, context)

        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
            counts[1] += 1
            return await super().ModelInfer(request, context)

        async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            counts[2] += 1
            return await super().ServerReady(request, context)

    dataplane = DataPlane(ModelRepository.from_files([models.model_path(MODEL)]))
    with BackgroundServer(EdgeServer(dataplane, servicer=Counting(dataplane))) as server:
        yield server, counts


def _cut_feeds(graph: ModelGraph, seed: int) -> dict[str, np.ndarray]:
    return random_tensors(graph.cut(CUT).tensors, seed)


def _params(graph: ModelGraph) -> dict[str, bool | int | float | str]:
    return {"split_point": CUT, "model_sha256": graph.sha256}


def test_requests_share_one_stream(
    counted: tuple[BackgroundServer, list[int]], graphs: dict[str, ModelGraph]
) -> None:
    server, calls = counted
    graph = graphs[MODEL]
    runner = ModelRunner(graph)
    with TailClient(server.address, timeout_s=10.0) as client:
        device = CooperativeRunner(runner, client, model_name=MODEL, policy=CUT)
        for seed in range(20):
            feeds = seeded_inputs(graph, seed)
            result = device.infer(feeds)
            assert result.offloaded and not result.fallback
            for name, expected in runner.run(feeds).items():
                assert np.array_equal(result.outputs[name], expected)
    assert calls == [1, 0, 0]


def test_a_server_without_streaming_gets_unary_calls(
    unary_only_server: str, graphs: dict[str, ModelGraph]
) -> None:
    graph = graphs[MODEL]
    runner = ModelRunner(graph)
    with TailClient(unary_only_server, timeout_s=10.0) as client:
        assert client.streaming
        for seed in range(3):
            feeds = _cut_feeds(graph, seed)
            result = client.infer(MODEL, feeds, parameters=_params(graph))
            expected = runner.run_tail(CUT, feeds)
            assert set(result.outputs) == set(expected)
            assert all(np.array_equal(result.outputs[k], v) for k, v in expected.items())
        assert not client.streaming


def test_errors_on_the_stream_keep_their_status_and_the_stream(
    counted: tuple[BackgroundServer, list[int]], graphs: dict[str, ModelGraph]
) -> None:
    server, calls = counted
    graph = graphs[MODEL]
    feeds = _cut_feeds(graph, 0)
    name = next(iter(feeds))
    wrong_shape = {**feeds, name: np.zeros((1, *feeds[name].shape), feeds[name].dtype)}
    cases = [
        ({"split_point": CUT, "model_sha256": "0" * 64}, feeds, MODEL, "FAILED_PRECONDITION"),
        (_params(graph), wrong_shape, MODEL, "INVALID_ARGUMENT"),
        ({"split_point": 10_000}, feeds, MODEL, "INVALID_ARGUMENT"),
        (_params(graph), feeds, "no_such_model", "NOT_FOUND"),
    ]
    with TailClient(server.address, timeout_s=10.0) as client:
        for parameters, inputs, model, status in cases:
            with pytest.raises(RemoteError) as caught:
                client.infer(model, inputs, parameters=parameters)
            assert caught.value.status == status
            assert not str(caught.value).startswith(f"{status}: {status}")
            # The same stream still answers.
            ok = client.infer(MODEL, feeds, parameters=_params(graph))
            assert set(ok.outputs) == {t.name for t in graph.cut(CUT).tail_outputs}
    assert calls == [1, 0, 0]


class _SilentStream(pb_grpc.GRPCInferenceServiceServicer):
    """A real gRPC peer whose stream reads requests and never answers them."""

    def ModelStreamInfer(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        for _ in requests:
            time.sleep(0.01)
        return iter(())


def test_a_silent_stream_is_deadline_exceeded_and_replaced(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs[MODEL]
    runner = ModelRunner(graph)
    with grpc_peer(_SilentStream()) as address:
        client = TailClient(address)
        device = CooperativeRunner(runner, client, model_name=MODEL, policy=CUT, timeout_s=0.3)
        for seed in (1, 2):
            feeds = seeded_inputs(graph, seed)
            result = device.infer(feeds)
            assert result.fallback and "DEADLINE_EXCEEDED" in (result.fallback_reason or "")
            expected = runner.run(feeds)
            assert all(np.array_equal(result.outputs[k], v) for k, v in expected.items())
        assert client.streaming  # a silent stream is not a missing one
        client.close()


def test_stopping_ends_open_streams_at_once(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_tiny"]
    server = BackgroundServer.from_files([models.model_path("digits_tiny")])
    server.start()
    with TailClient(server.address, timeout_s=10.0) as client:
        feeds = random_tensors(graph.cut(2).tensors, 0)
        client.infer("digits_tiny", feeds, parameters={"split_point": 2})  # the stream is now open
        started = time.monotonic()
        server.stop(grace=30.0)
        assert time.monotonic() - started < 10.0, "stop waited for the idle stream's grace period"
        with pytest.raises(RemoteError) as caught:
            client.infer("digits_tiny", feeds, parameters={"split_point": 2})
        assert caught.value.status == "UNAVAILABLE"


def test_the_client_refuses_to_block_inside_a_coroutine(server: BackgroundServer) -> None:
    with TailClient(server.address) as client:

        async def inside() -> None:
            client.ready()

        with pytest.raises(RuntimeError, match="from a thread"):
            asyncio.run(inside())
        assert client.ready()


def test_link_probes_travel_like_tail_requests(
    counted: tuple[BackgroundServer, list[int]], graphs: dict[str, ModelGraph]
) -> None:
    """The planner's round-trip probes are ping messages on the open stream, not calls of their own,
    so they cost what a tail request's fixed part costs."""
    graph = graphs[MODEL]
    server, calls = counted
    with TailClient(server.address) as client:
        prober = LinkProber(client, MODEL, graph)
        estimator = LinkEstimator()
        prober.probe_rtt(estimator, count=5)
        assert len(estimator.probe_rtts) == 5 and all(ms > 0 for ms in estimator.probe_rtts)
    assert calls == [1, 0, 0]


@pytest.mark.parametrize("version", ["1", ""], ids=["unreadable", "foreign-fields"])
def test_a_peer_streaming_other_messages_gets_unary_calls_with_identical_outputs(
    graphs: dict[str, ModelGraph], version: str
) -> None:
    graph = graphs[MODEL]
    repository = ModelRepository.from_files([models.model_path(MODEL)])
    peer = ForeignStream(DataPlane(repository), version)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((peer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    runner = ModelRunner(graph)
    try:
        client = TailClient(f"127.0.0.1:{port}", timeout_s=10.0)
        with CooperativeRunner(runner, client, model_name=MODEL, policy=CUT) as device:
            for seed in range(3):
                feeds = seeded_inputs(graph, seed)
                result = device.infer(feeds)
                assert not result.fallback, result.fallback_reason
                expected = ModelRunner(graph).run(feeds)
                assert all(np.array_equal(result.outputs[k], v) for k, v in expected.items())
            assert not client.streaming
        assert peer.streamed == 1  # one try on the stream, then unary calls
    finally:
        server.stop(0)
        repository.close()
