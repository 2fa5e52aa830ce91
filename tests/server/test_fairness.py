"""Fairness between devices: compute turns in round robin, and a bound per device.

Covered:
- FairTurns: with one turn held and a device's 10 requests waiting, another device's request
  is served second, not eleventh; turns go round the devices in order; a waiter that is
  cancelled leaves its place, and a turn handed to one is passed on;
- FairTurns.charge: a device that took a stack of 4 samples in one turn lets the other device go
  first 3 times while it waits, then the turns alternate again; a debt is dropped once nothing of
  that device waits; 100 stacks computed with nobody else waiting leave no debt (the turns then
  alternate); and through the real Scheduler and DataPlane (one compute thread, a 10 ms
  tail), a stack of 4 is followed by the calm device's 4 waiting requests before the stacking
  device's next;
- DeviceLimit: the (n+1)-th request of one device is refused, another device's is not, and
  nothing is kept for a device once its requests end;
- through a real server with bearer tokens: a device flooding with more concurrent requests than
  ``--max-inflight-per-device`` gets RESOURCE_EXHAUSTED for the excess, while another device's
  requests all succeed with the whole model's outputs;
- peer_host: the address part of gRPC's peer strings.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from model_builder import slow_conv_model

from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import seeded_inputs
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.errors import ServerOverloadedError
from server.fairness import DeviceLimit, FairTurns, peer_host
from server.grpc_service import EdgeServer
from server.repository import ModelRepository
from server.security import Security


def test_a_device_behind_a_backlog_is_served_next() -> None:
    async def scenario() -> list[str]:
        turns = FairTurns(1)
        order: list[str] = []
        release = asyncio.Event()

        async def request(device: str, n: int) -> None:
            async with turns.turn(device):
                order.append(f"{device}{n}")
                if not order[1:]:
                    await release.wait()  # the first holds the turn until everyone queued

        tasks = [asyncio.create_task(request("flood", 0))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("flood", n)) for n in range(1, 10)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("calm", 0)), asyncio.create_task(request("third", 0))]
        await asyncio.sleep(0)
        assert turns.waiting == 11 and turns.held == 1
        release.set()
        await asyncio.gather(*tasks)
        assert turns.held == 0 and turns.waiting == 0
        return order

    order = asyncio.run(scenario())
    assert order[:5] == ["flood0", "flood1", "calm0", "third0", "flood2"], order
    assert sorted(order) == sorted([f"flood{n}" for n in range(10)] + ["calm0", "third0"])


def test_a_stack_is_charged_its_samples_in_turns() -> None:
    async def scenario() -> tuple[list[str], FairTurns]:
        turns = FairTurns(1)
        order: list[str] = []
        release = asyncio.Event()

        async def request(device: str, n: int, first: bool = False) -> None:
            async with turns.turn(device):
                order.append(f"{device}{n}")
                if first:
                    await release.wait()  # the others queue meanwhile
                    turns.charge(device, 3)  # it carried 4 samples while they waited

        tasks = [asyncio.create_task(request("stack", 0, first=True))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("stack", n)) for n in range(1, 5)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("calm", n)) for n in range(6)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return order, turns

    order, turns = asyncio.run(scenario())
    assert order == [
        "stack0", "calm0", "calm1", "calm2", "stack1", "calm3", "stack2", "calm4", "stack3", "calm5", "stack4"
    ], order  # fmt: skip
    assert not turns._owed and turns.held == 0


def test_stacks_computed_alone_leave_no_debt_to_starve_a_device_later() -> None:
    async def scenario() -> list[str]:
        turns = FairTurns(1)
        for _ in range(100):  # 100 stacks of 8 with nobody else waiting
            async with turns.turn("stack"):
                turns.charge("stack", 7)
        order: list[str] = []
        release = asyncio.Event()

        async def request(device: str, n: int, first: bool = False) -> None:
            async with turns.turn(device):
                order.append(f"{device}{n}")
                if first:
                    await release.wait()

        tasks = [asyncio.create_task(request("other", 0, first=True))]
        await asyncio.sleep(0)
        for n in range(3):
            tasks += [asyncio.create_task(request("stack", n)), asyncio.create_task(request("calm", n))]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["other0", "stack0", "calm0", "stack1", "calm1", "stack2", "calm2"]


def test_a_part_asked_first_goes_before_its_devices_later_requests_and_others_waiting_is_seen() -> None:
    """What a stack computed in parts uses: ``others_wait`` says whether a device other than the one
    asking waits, and ``first`` puts a device's next part ahead of its own waiting requests (not
    ahead of other devices)."""

    async def scenario() -> tuple[list[str], list[bool]]:
        turns = FairTurns(1)
        order: list[str] = []
        seen: list[bool] = []
        release = asyncio.Event()

        async def request(device: str, label: str, *, hold: bool = False, first: bool = False) -> None:
            await turns.acquire(device, first=first)
            try:
                order.append(label)
                if hold:
                    await release.wait()
            finally:
                turns.release()

        tasks = [asyncio.create_task(request("stack", "part0", hold=True))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("stack", "later")))
        await asyncio.sleep(0)
        seen.append(turns.others_wait("stack"))  # only its own request waits
        tasks.append(asyncio.create_task(request("calm", "calm")))
        await asyncio.sleep(0)
        seen += [turns.others_wait("stack"), turns.others_wait("calm")]
        tasks.append(asyncio.create_task(request("stack", "part1", first=True)))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return order, seen

    order, seen = asyncio.run(scenario())
    assert seen == [False, True, True]
    # The turn goes round the devices: stack's queue is [part1, later], calm's [calm].
    assert order == ["part0", "part1", "calm", "later"], order


def test_a_cancelled_waiter_leaves_and_its_turn_passes_on() -> None:
    async def scenario() -> None:
        turns = FairTurns(1)
        hold = asyncio.Event()
        served: list[str] = []

        async def request(device: str) -> None:
            async with turns.turn(device):
                served.append(device)
                if device == "a":
                    await hold.wait()

        first = asyncio.create_task(request("a"))
        await asyncio.sleep(0)
        gone = asyncio.create_task(request("b"))
        later = asyncio.create_task(request("c"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert turns.waiting == 1
        hold.set()
        await asyncio.gather(first, later)
        assert gone.cancelled() and served == ["a", "c"] and turns.held == 0

    asyncio.run(scenario())


def test_the_limit_per_device_refuses_only_that_device() -> None:
    limit = DeviceLimit(2)
    with limit.held("a"), limit.held("a"):
        with pytest.raises(ServerOverloadedError, match="limit per device is 2"):
            with limit.held("a"):
                pass
        with limit.held("b"):
            assert len(limit) == 2
    assert len(limit) == 0


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:[::1]:5000", "[::1]"),
        ("unix:/run/x.sock", "/run/x.sock"),
        ("", "unknown"),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    class Context:
        def peer(self) -> str:
            return peer

    assert peer_host(Context()) == host


def test_a_flooding_device_is_refused_past_its_share_and_another_is_served(tmp_path: Path) -> None:
    model = tmp_path / "slow.tflite"
    model.write_bytes(slow_conv_model())
    graph = ModelGraph.from_file(model)
    x = seeded_inputs(graph, 0)
    with ModelRunner(graph) as runner:
        expected = runner.run(x)
    tokens = tmp_path / "tokens"
    tokens.write_text("flood flood-token-0123456789\ncalm calm-token-0123456789\n")
    security = Security(tokens=tokens)
    dataplane = DataPlane(ModelRepository.from_files([model], replicas=2), max_inflight=64)
    server = EdgeServer(
        dataplane,
        workers=2,
        interceptors=security.interceptors(),
        identify=security.identify,
        max_inflight_per_device=3,
    )
    outcomes: dict[str, list[str]] = {"flood": [], "calm": []}
    lock = threading.Lock()
    with BackgroundServer(server) as running:
        barrier = threading.Barrier(9)

        def device(name: str, requests: int) -> None:
            with TailClient(running.address, timeout_s=60.0, token=f"{name}-token-0123456789") as client:
                barrier.wait(timeout=30)
                for _ in range(requests):
                    try:
                        result = client.infer("slow", x)
                        same = all(np.array_equal(result.outputs[k], v) for k, v in expected.items())
                        outcome = "OK" if same else "WRONG"
                    except RemoteError as err:
                        outcome = err.status
                    with lock:
                        outcomes[name].append(outcome)

        threads = [threading.Thread(target=device, args=("flood", 4)) for _ in range(8)]
        threads.append(threading.Thread(target=device, args=("calm", 4)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert outcomes["calm"] == ["OK"] * 4, outcomes
    assert set(outcomes["flood"]) == {"OK", "RESOURCE_EXHAUSTED"}, outcomes


@pytest.mark.parametrize(
    ("part_us", "expected"),
    [
        # The default: a part per turn, one sample of this tail. The calm device's requests go between
        # the stack's parts, and the stack's parts before its device's later requests.
        (None, ["busy", "calm0", "calm1", "calm2", "stack4", "calm3", "stacker0", "stacker1", "stacker2"]),
        # The whole stack in one part, charged its 4 samples: the calm device's 4 waiting requests then
        # go before the stacking device's next ones (without the charge they would alternate).
        (10**9, ["busy", "stack4", "calm0", "calm1", "calm2", "calm3", "stacker0", "stacker1", "stacker2"]),
    ],
)
def test_the_scheduler_computes_a_stack_in_parts_each_charged_its_samples(
    tmp_path: Path, part_us: int | None, expected: list[str]
) -> None:
    """Through the real scheduler and data plane, one compute thread, a tail of about 10 ms: a device's
    stack of 4 samples, its next 3 requests and the calm device's 4, all waiting for the turn."""
    from edge.wire import InferRequest, encode
    from server.scheduler import Scheduler

    path = tmp_path / "slow.tflite"
    path.write_bytes(slow_conv_model(size=4, channels=1300))
    graph = ModelGraph.from_file(path)
    with ModelRunner(graph) as runner:
        cut = dict(runner.run_head(1, seeded_inputs(graph, 1)).cut)
    dataplane = DataPlane(ModelRepository.from_files([path], replicas=1))

    def prepared(samples: int):  # type: ignore[no-untyped-def]
        tensors = {name: np.concatenate([array] * samples) for name, array in cut.items()}
        params: dict[str, object] = {"split_point": 1}
        if samples > 1:
            params["edge_stack"] = samples
        request = InferRequest(
            model_name="slow",
            inputs=tuple(encode(name, array) for name, array in tensors.items()),
            parameters=params,  # type: ignore[arg-type]
        )
        return dataplane.prepare(request)

    async def scenario() -> list[str]:
        scheduler = Scheduler(dataplane, workers=1, **({} if part_us is None else {"stack_part_us": part_us}))
        order: list[str] = []

        async def run(label: str, device: str, samples: int = 1) -> None:
            await scheduler.run(prepared(samples), device, 0, None)
            order.append(label)

        tasks = [asyncio.create_task(run("busy", "other"))]
        await asyncio.sleep(0.005)  # it holds the one compute turn
        tasks.append(asyncio.create_task(run("stack4", "stacker", samples=4)))
        await asyncio.sleep(0.001)
        for i in range(3):
            tasks.append(asyncio.create_task(run(f"stacker{i}", "stacker")))
            tasks.append(asyncio.create_task(run(f"calm{i}", "calm")))
            await asyncio.sleep(0.001)
        tasks.append(asyncio.create_task(run("calm3", "calm")))
        await asyncio.gather(*tasks)
        scheduler.shutdown()
        return order

    order = asyncio.run(scenario())
    assert order == expected, order
