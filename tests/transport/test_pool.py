"""A pool of real servers under each policy: one killed, one slowed, requests spread, bit for bit.

Three edge servers: A, B (killed during the run, then started again on its port) and C, reached
through a proxy that adds 15 ms each way. Covered:
- round-robin: requests go to the healthy servers in turn; B, once it fails, leaves the pool
  (every request still answered, bit for bit), and its probe brings it back after it restarts;
- least-loaded, pipelined 8 at a time: the slowed C gets fewer requests than A, and none fails;
- least-loaded, a burst before any server has answered: one request to each, not all to A;
- failover: everything goes to the first healthy server;
- one address naming two servers (the gRPC target ``ipv4:A:P,B:P``, as a DNS name with two
  records resolves): gRPC's round_robin spreads the requests over both;
- the planner keeps a link estimate per server: the slowed one's round trip is its own;
- an unknown policy is a ConfigError.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge import models, wire
from edge.autosplit import AutoSplit
from edge.cooperative import CooperativeRunner
from edge.errors import ConfigError
from edge.graph import ModelGraph
from edge.policy import make_policy
from edge.runner import ModelRunner
from edge.transport import FailoverClient, TailClient
from helpers import same_outputs, seeded_inputs, slow_device_profile, start_logged
from server.embedded import BackgroundServer
from server.metrics import ServerMetrics

MODEL = "digits_resnet"
CUT = 6


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[list[BackgroundServer], str, int]]:
    """Servers A and B on loopback, C behind a 15 ms (each way) proxy; yields them, C's proxy address,
    and B's port (to start it again)."""
    path = models.model_path(MODEL)
    servers = [BackgroundServer.from_files([path]) for _ in range(3)]
    for s in servers:
        s.start()
    b_port = servers[1].server.port
    assert b_port is not None
    proxy, proxy_port = start_logged(
        [sys.executable, "-m", "edge.emulation.proxy", "--listen", "127.0.0.1:0",
         "--upstream", servers[2].address, "--delay-ms", "15"],
        tmp_path / "proxy.log",
    )  # fmt: skip
    try:
        yield servers, f"127.0.0.1:{proxy_port}", b_port
    finally:
        proxy.terminate()
        proxy.wait(10)
        for s in servers:
            s.stop()


def _cases(graph: ModelGraph, count: int) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    with ModelRunner(graph) as runner:
        cuts = [dict(runner.run_head(CUT, seeded_inputs(graph, i)).cut) for i in range(count)]
        return cuts, [runner.run_tail(CUT, c) for c in cuts]


def _pool(addresses: list[str], policy: str, retry_after_s: float = 0.3) -> FailoverClient:
    return FailoverClient(
        [TailClient(a, timeout_s=5.0) for a in addresses],
        policy=policy,  # type: ignore[arg-type]
        retry_after_s=retry_after_s,
    )


def test_round_robin_spreads_drops_a_killed_server_and_takes_it_back(
    three: tuple[list[BackgroundServer], str, int], graphs: dict[str, ModelGraph]
) -> None:
    servers, slowed, b_port = three
    graph = graphs[MODEL]
    cuts, expected = _cases(graph, 12)
    params = {wire.MODEL_SHA256: graph.sha256, wire.SPLIT_POINT: CUT}
    with _pool([servers[0].address, servers[1].address, slowed], "round-robin") as pool:
        for cut, want in zip(cuts[:6], expected[:6], strict=True):
            assert same_outputs(pool.infer(MODEL, cut, parameters=params).outputs, want)
        assert pool.answered == [2, 2, 2]  # in turn
        servers[1].stop()
        for cut, want in zip(cuts[6:], expected[6:], strict=True):
            assert same_outputs(pool.infer(MODEL, cut, parameters=params).outputs, want)  # every one answered
        assert pool.answered[1] == 2 and pool.answered[0] + pool.answered[2] == 10
        assert 1 in pool.order(advance=False)[-1:]  # B is out of the pool, behind the others
        restarted = BackgroundServer.from_files([models.model_path(MODEL)], port=b_port)
        restarted.start()
        try:
            deadline = time.monotonic() + 10
            while 1 in pool.order(advance=False)[-1:] and time.monotonic() < deadline:
                time.sleep(0.05)  # the probe (every 0.3 s) finds it ready
            before = pool.answered[1]
            for cut, want in zip(cuts[:3], expected[:3], strict=True):
                assert same_outputs(pool.infer(MODEL, cut, parameters=params).outputs, want)
            assert pool.answered[1] == before + 1  # back in turn
        finally:
            restarted.stop()


def test_least_loaded_sends_less_to_a_slow_server(
    three: tuple[list[BackgroundServer], str, int], graphs: dict[str, ModelGraph]
) -> None:
    servers, slowed, _ = three
    graph = graphs[MODEL]
    cuts, expected = _cases(graph, 60)
    params = {wire.MODEL_SHA256: graph.sha256, wire.SPLIT_POINT: CUT}
    with _pool([servers[0].address, servers[1].address, slowed], "least-loaded") as pool:
        futures = []
        results = []
        for cut in cuts:
            futures.append(pool.submit(MODEL, cut, parameters=params))
            if len(futures) >= 8:
                results.append(futures.pop(0).result(30))
        results += [f.result(30) for f in futures]
        assert all(same_outputs(r.outputs, e) for r, e in zip(results, expected, strict=True))
        a, b, c = pool.answered
        assert a + b + c == len(cuts)
        assert a > c and b > c, pool.answered  # C (30 ms more a round trip) gets the least
        assert a > 0 and b > 0  # spread over the fast ones


def test_least_loaded_spreads_a_burst_sent_before_any_server_has_answered(
    three: tuple[list[BackgroundServer], str, int], graphs: dict[str, ModelGraph]
) -> None:
    """No server's time is known yet: each takes one, rather than the first taking all (which later
    sent the slowed C a burst of its own before its first answer)."""
    servers, slowed, _ = three
    graph = graphs[MODEL]
    cuts, expected = _cases(graph, 3)
    params = {wire.MODEL_SHA256: graph.sha256, wire.SPLIT_POINT: CUT}
    with _pool([servers[0].address, servers[1].address, slowed], "least-loaded") as pool:
        for client in pool.clients:
            client.wait_ready(10)  # connected, so that the burst below is sent at once
        futures = [pool.submit(MODEL, cut, parameters=params) for cut in cuts]
        assert all(same_outputs(f.result(30).outputs, e) for f, e in zip(futures, expected, strict=True))
        assert pool.answered == [1, 1, 1]


def test_failover_sends_everything_to_the_first_healthy_server(
    three: tuple[list[BackgroundServer], str, int], graphs: dict[str, ModelGraph]
) -> None:
    servers, slowed, _ = three
    graph = graphs[MODEL]
    cuts, expected = _cases(graph, 5)
    params = {wire.MODEL_SHA256: graph.sha256, wire.SPLIT_POINT: CUT}
    with _pool([slowed, servers[0].address], "failover") as pool:
        for cut, want in zip(cuts, expected, strict=True):
            assert same_outputs(pool.infer(MODEL, cut, parameters=params).outputs, want)
        assert pool.answered == [5, 0]


def test_one_address_naming_two_servers_is_balanced_by_grpc(graphs: dict[str, ModelGraph]) -> None:
    """Two servers on one port, on 127.0.0.1 and 127.0.0.2: ``ipv4:127.0.0.1:P,127.0.0.2:P``, as
    a DNS name with two records resolves."""
    graph = graphs[MODEL]
    path = models.model_path(MODEL)
    metrics = [ServerMetrics(), ServerMetrics()]
    first = BackgroundServer.from_files([path], host="127.0.0.1", metrics=metrics[0])
    first.start()
    port = first.server.port  # the kernel's choice on 127.0.0.1, taken on 127.0.0.2 too
    assert port is not None
    servers = [first, BackgroundServer.from_files([path], port=port, host="127.0.0.2", metrics=metrics[1])]
    servers[1].start()
    try:
        cuts, expected = _cases(graph, 10)
        params = {wire.MODEL_SHA256: graph.sha256, wire.SPLIT_POINT: CUT}
        with TailClient(f"ipv4:127.0.0.1:{port},127.0.0.2:{port}", timeout_s=5.0, balance=True) as client:
            assert not client.streaming
            for cut, want in zip(cuts, expected, strict=True):
                assert same_outputs(client.infer(MODEL, cut, parameters=params).outputs, want)
        labels = {"model": MODEL, "cut": str(CUT), "status": "OK"}
        served = [m.registry.get_sample_value("edge_requests_total", labels) or 0 for m in metrics]
        assert all(count >= 3 for count in served), served
    finally:
        for s in servers:
            s.stop()


def test_an_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="round-robin"):
        FailoverClient([TailClient("127.0.0.1:1")], policy="random")  # type: ignore[arg-type]


def test_the_planner_keeps_a_link_estimate_per_server(
    three: tuple[list[BackgroundServer], str, int],
    graphs: dict[str, ModelGraph],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Round robin over A (loopback) and C (30 ms more a round trip): each gets its own estimate."""
    servers, slowed, _ = three
    graph = graphs[MODEL]
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path))
    runner = ModelRunner(graph)
    slow_device_profile(runner, tmp_path, 5000.0)  # 150 ms a model: offloading pays, even through C
    pool = _pool([servers[0].address, slowed], "round-robin")
    policy = make_policy(graph, "auto", runner=runner, client=pool, model_name=MODEL, progress=False)
    assert isinstance(policy, AutoSplit)
    with CooperativeRunner(runner, pool, model_name=MODEL, policy=policy) as device:
        results = [device.infer(seeded_inputs(graph, i)) for i in range(20)]
    assert sum(r.offloaded for r in results) >= 10, (
        policy.reachable,
        policy.last_plan,
        [r.fallback_reason for r in results][:3],
    )
    fast = policy.estimators[servers[0].address].estimate()
    slow = policy.estimators[slowed].estimate()
    assert fast.samples > 0 and slow.samples > 0
    assert slow.rtt_ms > fast.rtt_ms + 10, (fast, slow)
