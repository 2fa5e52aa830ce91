"""The failover client against real edge servers: in order, skipping the ones that just failed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from edge import models
from edge.autosplit import AutoSplit
from edge.cooperative import CooperativeRunner
from edge.daemon import load, open_device, resolve
from edge.errors import ConfigError, RemoteError
from edge.graph import ModelGraph
from edge.policy import make_policy
from edge.runner import ModelRunner
from edge.transport import FailoverClient, TailClient, TailTransport
from helpers import RefusedAddress
from server.embedded import BackgroundServer

GRAPH = ModelGraph.from_file(models.model_path("digits_resnet"))
CUT = 8


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def servers() -> Iterator[list[BackgroundServer]]:
    started = [BackgroundServer.from_files([models.model_path("digits_resnet")]) for _ in range(2)]
    for s in started:
        s.start()
    try:
        yield started
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def cut_tensors() -> dict[str, np.ndarray]:
    with ModelRunner(GRAPH) as runner:
        return runner.run_head(CUT, {GRAPH.inputs[0].name: models.digits_sample().x[:1]}).cut


def infer(client: FailoverClient, cut: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    params: dict[str, str | int] = {"model_sha256": GRAPH.sha256, "split_point": CUT}
    return client.infer("digits_resnet", cut, parameters=params).outputs


def test_a_dead_first_server_fails_over_to_the_next_and_stays_behind_it(
    servers: list[BackgroundServer], cut_tensors: dict[str, np.ndarray], refused: RefusedAddress
) -> None:
    dead = refused.address
    clock = Clock()
    clients = [TailClient(dead, timeout_s=1.0), TailClient(servers[0].address, timeout_s=1.0)]
    with FailoverClient(clients, retry_after_s=5.0, clock=clock) as client:
        with ModelRunner(GRAPH) as runner:
            expected = runner.run({GRAPH.inputs[0].name: models.digits_sample().x[:1]})
        got = infer(client, cut_tensors)
        np.testing.assert_array_equal(got[GRAPH.outputs[0].name], expected[GRAPH.outputs[0].name])
        assert client.order() == [1, 0]  # the dead one waits behind the live one
        clock.now = 10.0
        assert client.order() == [1, 0]  # time alone does not bring it back: a probe that it answers does
        assert client.ready(1.0)


def test_all_dead_raises_remote_error_naming_each(cut_tensors: dict[str, np.ndarray]) -> None:
    with (
        RefusedAddress() as one,
        RefusedAddress() as two,
        FailoverClient([TailClient(a.address, timeout_s=0.5) for a in (one, two)]) as client,
    ):
        dead = [one.address, two.address]
        with pytest.raises(RemoteError) as err:
            infer(client, cut_tensors)
        assert err.value.status == "UNAVAILABLE"
        assert all(a in str(err.value) for a in dead)
        assert not client.ready(0.2)
        with pytest.raises(RemoteError):
            client.wait_ready(0.5)


def test_a_server_that_comes_back_is_preferred_again(
    cut_tensors: dict[str, np.ndarray], refused: RefusedAddress
) -> None:
    backup = BackgroundServer.from_files([models.model_path("digits_resnet")])
    backup.start()
    try:
        clock = Clock()
        primary_address = refused.address
        clients = [TailClient(primary_address, timeout_s=1.0), TailClient(backup.address, timeout_s=1.0)]
        with FailoverClient(clients, retry_after_s=1.0, clock=clock) as client:
            infer(client, cut_tensors)
            assert client.order() == [1, 0]
            port = refused.release()  # held until now: the primary comes up where the device looks
            primary = BackgroundServer.from_files([models.model_path("digits_resnet")], port=port)
            primary.start()
            try:
                clients[0].wait_ready(10)
                # The pool's probe (every retry_after_s) finds it ready and brings it back.
                deadline = time.monotonic() + 10
                while client.order(advance=False) != [0, 1] and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert client.order(advance=False) == [0, 1]
                answered = client.answered[0]
                infer(client, cut_tensors)
                assert client.answered[0] == answered + 1
            finally:
                primary.stop()
    finally:
        backup.stop()


def test_no_servers_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        FailoverClient([])


def test_auto_split_plans_across_several_servers(
    servers: list[BackgroundServer], tmp_path, monkeypatch: pytest.MonkeyPatch, refused: RefusedAddress
) -> None:
    """Two or more servers with split type auto: the planner profiles and probes through the pool."""
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path / "cache"))
    dead = refused.address
    clients: list[TailTransport] = [TailClient(dead, timeout_s=1.0)] + [
        TailClient(s.address, timeout_s=30.0) for s in servers
    ]
    pool = FailoverClient(clients)
    with ModelRunner(GRAPH) as runner:
        policy = make_policy(GRAPH, "auto", runner=ModelRunner(GRAPH), client=pool, progress=False)
        assert isinstance(policy, AutoSplit) and policy.reachable
        device = CooperativeRunner(runner, pool, model_name="digits_resnet", policy=policy)
        x = {GRAPH.inputs[0].name: models.digits_sample().x[:1]}
        expected = ModelRunner(GRAPH).run(x)
        result = device.infer(x)
        assert not result.fallback
        np.testing.assert_array_equal(result.outputs[GRAPH.outputs[0].name], expected[GRAPH.outputs[0].name])
        device.close()


def test_a_daemon_profile_with_two_servers_and_auto_split_starts(
    servers: list[BackgroundServer], tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shape of the shipped raspberry-pi-5 and jetson-orin-nano profiles, without their TLS."""
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "two.toml"
    path.write_text(
        f"""
device_id = "two-servers"
[model]
path = "digits_resnet"
[split]
type = "auto"
objective = "bytes"
[[edge.servers]]
address = "{servers[0].address}"
[[edge.servers]]
address = "{servers[1].address}"
streaming = false
[mqtt]
host = "127.0.0.1"
[[sensors]]
topic = "sensors/+/digits"
format = "json"
"""
    )
    resolved = resolve(load(path), path)
    device = open_device(resolved)
    try:
        assert isinstance(device.client, FailoverClient)
        assert isinstance(device.policy, AutoSplit) and device.policy.reachable
    finally:
        device.close()
