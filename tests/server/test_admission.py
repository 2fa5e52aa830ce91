"""Admission at the server's defaults: the in-flight limit refuses work, and health checks stay prompt.

Covered: with the default compute threads, more concurrent requests than ``max_inflight`` get
RESOURCE_EXHAUSTED while the others succeed with the whole model's outputs; a health check
answers while a profile keeps compute busy; with ``workers=0`` (compute on the event loop)
no request is refused there; ``--workers 2`` gives the same outputs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest

from edge import models
from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import RemoteResult, TailClient
from helpers import seeded_inputs
from server.embedded import BackgroundServer

MODEL = "mobilenetv2_035"
CLIENTS = 12
REQUESTS = 15


def _hammer(address: str, graph: ModelGraph) -> Counter[str]:
    """CLIENTS threads, each with its own stream, sending REQUESTS whole-model requests."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    x = seeded_inputs(graph, 1)
    with ModelRunner(graph) as runner:
        expected = runner.run(x)
    start = threading.Barrier(CLIENTS)

    def one() -> None:
        with TailClient(address, timeout_s=30.0) as client:
            start.wait(timeout=30)
            for _ in range(REQUESTS):
                try:
                    result = client.infer(MODEL, x)
                    same = all(np.array_equal(result.outputs[k], v) for k, v in expected.items())
                    outcome = "OK" if same else "WRONG"
                except RemoteError as err:
                    outcome = err.status
                with lock:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=one) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes


@pytest.fixture(scope="module")
def graph() -> ModelGraph:
    return ModelGraph.from_file(models.model_path(MODEL))


def test_the_default_server_refuses_past_its_inflight_limit(graph: ModelGraph) -> None:
    """edge-server's default compute threads (one per core): requests wait for them, and past the
    limit they are refused."""
    from server.settings import default_workers

    with BackgroundServer.from_files(
        [models.model_path(MODEL)], max_inflight=2, workers=default_workers()
    ) as server:
        outcomes = _hammer(server.address, graph)
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["RESOURCE_EXHAUSTED"] > 0 and outcomes["OK"] > 0, outcomes
    assert sum(outcomes.values()) == CLIENTS * REQUESTS


def test_computing_on_the_loop_holds_one_request_and_refuses_none(graph: ModelGraph) -> None:
    """With ``workers=0`` each request computes where it is read, so the server never holds two: a
    limit of 2 refuses nothing (it refused requests it could serve when each waited a turn first)."""
    with BackgroundServer.from_files([models.model_path(MODEL)], max_inflight=2, workers=0) as server:
        outcomes = _hammer(server.address, graph)
    assert outcomes == Counter({"OK": CLIENTS * REQUESTS})


def test_health_answers_while_compute_is_busy(graph: ModelGraph) -> None:
    """A profile request keeps compute busy for a while; ServerReady still answers within a second."""
    with BackgroundServer.from_files([models.model_path(MODEL)]) as server:
        busy = TailClient(server.address, timeout_s=120.0)
        outcome: list[object] = []

        def profile() -> None:
            try:
                outcome.append(
                    busy.infer(MODEL, {}, parameters={"profile": True, "model_sha256": graph.sha256})
                )
            except Exception as err:
                outcome.append(err)

        profiling = threading.Thread(target=profile)
        profiling.start()
        try:
            time.sleep(0.3)
            with TailClient(server.address) as probe:
                assert probe.ready(timeout_s=1.0)
                x = seeded_inputs(graph, 2)
                assert probe.infer(MODEL, x, timeout_s=5.0).outputs
        finally:
            profiling.join(timeout=120)
            busy.close()
    # The busy request did run (had it failed to connect, nothing was busy and the probe proved nothing).
    assert len(outcome) == 1 and isinstance(outcome[0], RemoteResult), outcome


@pytest.mark.parametrize("workers", [0, 2])
def test_other_worker_counts_give_the_same_outputs(graph: ModelGraph, workers: int) -> None:
    with BackgroundServer.from_files(
        [models.model_path(MODEL)], workers=workers, max_inflight=1000
    ) as server:
        outcomes = _hammer(server.address, graph)
    assert outcomes == Counter({"OK": CLIENTS * REQUESTS})


def test_shutdown_stops_a_profile_being_measured() -> None:
    """SIGTERM during a tail profile: the profile ends within a gap, as UNAVAILABLE, not after it finishes."""
    from server.dataplane import DataPlane
    from server.errors import ServerStoppingError
    from server.repository import ModelRepository

    repository = ModelRepository.from_files([models.model_path(MODEL)])
    dataplane = DataPlane(repository)
    outcome: list[BaseException | None] = []

    def profile() -> None:
        try:
            dataplane.tail_profile(next(iter(repository)))
        except BaseException as err:
            outcome.append(err)
        else:
            outcome.append(None)

    worker = threading.Thread(target=profile)
    worker.start()
    time.sleep(0.3)
    stopped_at = time.monotonic()
    dataplane.begin_shutdown()
    worker.join(timeout=30)
    try:
        assert outcome and isinstance(outcome[0], ServerStoppingError), outcome
        assert time.monotonic() - stopped_at < 2.0
    finally:
        repository.close()


def test_an_idle_connection_is_closed_and_the_device_reconnects_by_itself(graph: ModelGraph) -> None:
    """Idle connections cannot pile up: the server closes one with no call for idle_timeout_s."""
    import grpc

    from server.dataplane import DataPlane
    from server.grpc_service import EdgeServer
    from server.repository import ModelRepository

    dataplane = DataPlane(ModelRepository.from_files([models.model_path(MODEL)]))
    with BackgroundServer(EdgeServer(dataplane, idle_timeout_s=0.5)) as server:
        channel = grpc.insecure_channel(server.address)
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=True)
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            deadline = time.monotonic() + 10
            while states[-1] is grpc.ChannelConnectivity.READY and time.monotonic() < deadline:
                time.sleep(0.1)
            assert grpc.ChannelConnectivity.READY in states
            assert states[-1] is not grpc.ChannelConnectivity.READY, "the idle connection stayed open"
        finally:
            channel.close()
        with TailClient(server.address) as client:  # and a device just connects again
            x = seeded_inputs(graph, 0)
            assert client.infer(MODEL, x).outputs


def test_bytes_in_flight_are_bounded() -> None:
    from server.dataplane import DataPlane
    from server.errors import ServerOverloadedError
    from server.repository import ModelRepository

    repository = ModelRepository.from_files([models.model_path("digits_tiny")])
    dataplane = DataPlane(repository, max_inflight_bytes=150_000)
    try:
        with dataplane.admitted(200_000):  # one request alone is always admitted
            with pytest.raises(ServerOverloadedError, match="bytes in flight"):
                with dataplane.admitted(1):
                    pass
        with dataplane.admitted(100_000):
            with dataplane.admitted(50_000):
                with pytest.raises(ServerOverloadedError):
                    with dataplane.admitted(1):
                        pass
        with dataplane.admitted(150_000):  # everything was released
            pass
    finally:
        repository.close()


def test_connections_past_the_limit_are_closed_and_the_others_keep_serving() -> None:
    """1,100 idle connections once took every file descriptor; now the one past --max-connections
    is closed as it opens, and the connections already open still answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from server.dataplane import DataPlane
    from server.grpc_service import EdgeServer
    from server.repository import ModelRepository

    dataplane = DataPlane(ModelRepository.from_files([models.model_path("digits_tiny")]))
    with BackgroundServer(EdgeServer(dataplane, max_connections=3)) as server:
        # A subchannel pool of its own per channel: one connection each.
        channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(5)
        ]
        try:
            outcomes = []
            for channel in channels:
                try:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
                    outcomes.append("OK")
                except grpc.RpcError as err:
                    outcomes.append(err.code().name)
            assert outcomes == ["OK", "OK", "OK", "UNAVAILABLE", "UNAVAILABLE"], outcomes
            for channel in channels[:3]:
                assert (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=3)
                    .status
                    == 1
                )
        finally:
            for channel in channels:
                channel.close()
