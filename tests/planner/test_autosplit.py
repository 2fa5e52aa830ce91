"""AutoSplit as a policy, fed results without a network: re-planning, hysteresis, losing the server."""

from __future__ import annotations

import numpy as np
import pytest

from edge.autosplit import AutoSplit
from edge.cooperative import InferenceResult, StageTimings
from edge.link import LinkEstimator
from edge.transport import RemoteResult


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def graph(graphs):
    return graphs["digits_resnet"]


def slow_device_profiles(graph, device_ms: float = 50.0, server_ms: float = 1.0):
    """Heads that grow linearly with K on a slow device; tails that shrink on a fast server."""
    n = graph.num_operators
    head = [device_ms * k / n for k in range(n + 1)]
    tail = [server_ms * (n - k) / n for k in range(n + 1)]
    return head, tail


def remote_result(graph, k: int, transfer_ms: float, tail_ms: float = 1.0) -> InferenceResult:
    outputs = {t.name: np.zeros(t.shape, t.dtype) for t in graph.outputs}
    nbytes = graph.cut(k).nbytes
    remote = RemoteResult(
        outputs=outputs,
        parameters={"compute_us": int(tail_ms * 1000), "queue_us": 0},
        call_ms=transfer_ms + tail_ms,
        bytes_sent=nbytes,
    )
    timings = StageTimings(
        head_ms=0.0, transfer_ms=transfer_ms, tail_ms=tail_ms, e2e_ms=transfer_ms + tail_ms
    )
    return InferenceResult(outputs, k, False, timings, bytes_sent=nbytes, remote=remote)


def link_with(mbit: float, rtt_ms: float, graph) -> LinkEstimator:
    est = LinkEstimator(clock=Clock())
    est.observe_rtt(rtt_ms)
    for k in (0, graph.num_operators - 1) * 3:
        wire = graph.cut(k).nbytes + sum(t.nbytes for t in graph.cut(k).tail_outputs)
        est.observe_transfer(wire, rtt_ms + wire / (mbit * 125.0))
    return est


def test_starts_at_the_planned_cut(graph):
    head, tail = slow_device_profiles(graph)
    policy = AutoSplit(graph, head, tail, estimator=link_with(100.0, 1.0, graph))
    assert policy.choose() == 0
    assert policy.last_plan is not None and policy.last_plan.choice == 0


def test_without_a_server_it_runs_locally(graph):
    head, _ = slow_device_profiles(graph)
    policy = AutoSplit(graph, head, None)
    assert policy.choose() == graph.num_operators
    assert not policy.reachable


def test_a_slower_link_moves_the_cut_after_patience(graph):
    n = graph.num_operators
    head, tail = slow_device_profiles(graph)
    est = link_with(100.0, 1.0, graph)
    policy = AutoSplit(graph, head, tail, estimator=est, patience=3)
    assert policy.choose() == 0
    # The link drops to 0.01 Mbit/s: sending even one byte costs more than the whole model here.
    choices = []
    for _ in range(40):
        k = policy.choose()
        wire = graph.cut(k).nbytes + 40
        policy.observe(remote_result(graph, k, 1.0 + wire / 1.25) if k < n else _local(graph, head[n]))
        choices.append(policy.choose())
    assert choices[0] == 0 and choices[-1] == n
    first_move = next(i for i, k in enumerate(choices) if k != 0)
    assert first_move >= 2  # three plans in a row had to agree first
    assert len({k for k in choices[first_move:]}) <= 2  # at most one intermediate stop, no flapping


def test_noise_around_a_tie_does_not_flap(graph):
    head, tail = slow_device_profiles(graph)
    est = link_with(100.0, 1.0, graph)
    policy = AutoSplit(graph, head, tail, estimator=est, patience=3, margin=0.2)
    start = policy.choose()
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(60):
        k = policy.choose()
        wire = graph.cut(k).nbytes + 40
        policy.observe(remote_result(graph, k, (1.0 + wire / 12500.0) * rng.uniform(0.9, 1.1)))
        seen.add(policy.choose())
    assert seen == {start}


def test_fallback_sends_it_local_and_a_probe_brings_it_back(graph, prober):
    head, tail = slow_device_profiles(graph)
    clock = Clock()
    policy = AutoSplit(
        graph, head, tail, estimator=link_with(100.0, 1.0, graph), prober=prober, reprobe_s=5.0, clock=clock
    )
    assert policy.choose() == 0
    timings = StageTimings(head_ms=0.0, e2e_ms=3.0)
    policy.observe(InferenceResult({}, 0, True, timings, fallback_reason="UNAVAILABLE: gone"))
    assert policy.choose() == graph.num_operators and not policy.reachable
    clock.now = 6.0  # the re-probe is due; the server answers it
    policy.choose()
    assert policy.reachable


def _local(graph, ms: float) -> InferenceResult:
    return InferenceResult({}, graph.num_operators, False, StageTimings(head_ms=ms, e2e_ms=ms))


def tied_profiles(graph):
    """Every remote cut predicted at 11 ms, the device alone at 10.5 ms: a near-tie the profiles cannot settle."""
    n = graph.num_operators
    head = [0.0] + [10.0] * (n - 1) + [10.5]
    tail = [100.0] + [0.0] * n
    return head, tail


def run_device(policy: AutoSplit, graph, head_at: dict[int, float], requests: int) -> list[int]:
    """Serve ``requests`` choices with a device whose true head times differ from its profile."""
    n = graph.num_operators
    used = []
    for _ in range(requests):
        k = policy.choose()
        used.append(k)
        if k == n:
            policy.observe(_local(graph, head_at.get(n, 10.5)))
        else:
            result = remote_result(graph, k, transfer_ms=1.0, tail_ms=0.01)
            timings = StageTimings(head_ms=head_at.get(k, 10.0), transfer_ms=1.0, tail_ms=0.01, e2e_ms=0.0)
            policy.observe(
                InferenceResult(result.outputs, k, False, timings, result.bytes_sent, remote=result.remote)
            )
    return used


def fast_link(graph) -> LinkEstimator:
    """1 ms round trip, 8 Gbit/s: every remote cut costs its head plus 1 ms."""
    est = LinkEstimator(clock=Clock())
    est.observe_rtt(1.0)
    for nbytes in (1024, 8192) * 3:
        est.observe_transfer(nbytes, 1.0 + nbytes / 1e6)
    return est


def test_exploring_a_near_tie_finds_the_faster_cut(graph):
    head, tail = tied_profiles(graph)
    policy = AutoSplit(graph, head, tail, estimator=fast_link(graph), explore_every=5, min_live=3)
    n = graph.num_operators
    assert policy.choose() == n
    # Cut 16 (a cut the planner may choose: it sends less than any before it) is really twice as
    # fast as profiled; the policy can only learn that by trying it.
    assert 16 in policy.candidates
    used = run_device(policy, graph, {16: 5.0}, requests=300)
    assert policy.choose() == 16
    assert policy.explored.count(16) == 3
    assert used[-10:] == [16] * 10


def test_exploring_stops_once_the_contenders_are_known(graph):
    head, tail = tied_profiles(graph)
    policy = AutoSplit(graph, head, tail, estimator=fast_link(graph), explore_every=5, min_live=3)
    n = graph.num_operators
    # The profile was right: no remote cut beats the device alone.
    used = run_device(policy, graph, {}, requests=400)
    assert policy.choose() == n
    assert all(policy.explored.count(k) <= 3 for k in range(n))
    assert used[-100:].count(n) >= 80


def test_no_exploring_without_near_ties(graph):
    head, tail = slow_device_profiles(graph)
    policy = AutoSplit(graph, head, tail, estimator=link_with(100.0, 1.0, graph), explore_every=2)
    run_device(policy, graph, {}, requests=20)
    assert not policy.explored


def test_a_codec_scales_each_cuts_bytes_charges_its_time_and_learns_the_ratio(graph):
    """Cut 8 sends 2,048 bytes raw; at a ratio of 0.25 and 1 Mbit/s the planner must count 512 bytes
    there (and the codec's time on the head), then the ratio the requests actually achieved."""
    head, tail = slow_device_profiles(graph)
    policy = AutoSplit(graph, head, tail, estimator=link_with(1.0, 1.0, graph))
    raw = {c.index: c for c in policy.costs()}
    n = graph.num_operators
    policy.use_codec("zstd", [0.25] * (n + 1), [0.5] * (n + 1))
    costs = {c.index: c for c in policy.costs()}
    assert policy.codec == "zstd"
    assert costs[8].nbytes == round(raw[8].nbytes * 0.25) and costs[n].nbytes == raw[n].nbytes == 0
    assert costs[8].head_ms == pytest.approx(raw[8].head_ms + 0.5)
    result = remote_result(graph, 8, transfer_ms=5.0)  # sent raw: it says nothing of the codec's ratio
    policy.observe(result)
    assert policy.wire_ratio[8] == 0.25
    result = remote_result(graph, 8, transfer_ms=5.0)
    assert result.remote is not None
    result.remote.coded = True
    result.bytes_sent = graph.cut(8).nbytes // 2  # the live ratio is 0.5
    policy.observe(result)
    assert policy.wire_ratio[8] == pytest.approx(0.7 * 0.25 + 0.3 * 0.5)


def test_connect_profiles_the_codec_on_real_activations(graphs) -> None:
    from edge import models
    from edge.runner import ModelRunner
    from edge.transport import TailClient
    from server.embedded import BackgroundServer

    graph = graphs["digits_resnet"]
    with BackgroundServer.from_files([models.model_path("digits_resnet")]) as server:
        runner = ModelRunner(graph)
        client = TailClient(server.address, timeout_s=10.0, codec="zstd")
        try:
            policy = AutoSplit.connect(runner, client, model_name="digits_resnet", progress=False)
        finally:
            client.close()
            runner.close()
    assert policy.codec == "zstd" and set(policy.wire_ratio) == set(range(graph.num_operators))
    assert all(0 < r <= 1.0 for r in policy.wire_ratio.values())
    assert sum(r < 0.9 for r in policy.wire_ratio.values()) > 5  # ReLU activations compress


def test_the_plan_counts_raw_bytes_for_a_server_that_does_not_decode_the_codec(graphs) -> None:
    """The client sends raw tensors to a server that lists no codec; the planner plans with what is
    sent (it planned with the configured codec's ratios, bytes that never went)."""
    from edge import models
    from edge.runner import ModelRunner
    from edge.transport import TailClient
    from server.dataplane import DataPlane
    from server.embedded import BackgroundServer
    from server.grpc_service import EdgeServer
    from server.repository import ModelRepository

    graph = graphs["digits_resnet"]
    dataplane = DataPlane(ModelRepository.from_files([models.model_path("digits_resnet")]), codecs=())
    with BackgroundServer(EdgeServer(dataplane)) as old, ModelRunner(graph) as runner:
        with TailClient(old.address, timeout_s=10.0, codec="zstd") as client:
            assert client.codec_sent() == "raw"
            policy = AutoSplit.connect(runner, client, model_name="digits_resnet", progress=False)
    assert policy.codec == "raw" and policy.wire_ratio == {}


def test_a_pool_of_servers_with_one_codec_plans_with_it(graphs) -> None:
    from edge import models
    from edge.runner import ModelRunner
    from edge.transport import FailoverClient, TailClient
    from server.embedded import BackgroundServer

    graph = graphs["digits_resnet"]
    with (
        BackgroundServer.from_files([models.model_path("digits_resnet")]) as a,
        BackgroundServer.from_files([models.model_path("digits_resnet")]) as b,
    ):
        runner = ModelRunner(graph)
        pool = FailoverClient([TailClient(s.address, timeout_s=10.0, codec="lz4") for s in (a, b)])
        mixed = FailoverClient([TailClient(a.address, codec="lz4"), TailClient(b.address, codec="zstd")])
        try:
            assert pool.codec_sent() == "lz4" and mixed.codec_sent() == "raw"
            policy = AutoSplit.connect(runner, pool, model_name="digits_resnet", progress=False)
        finally:
            pool.close()
            mixed.close()
            runner.close()
    assert policy.codec == "lz4" and policy.wire_ratio


def test_max_bytes_limits_the_plan_not_the_link_probes(graphs, tmp_path, monkeypatch) -> None:
    """--max-bytes 2048 on MobileNetV2: the plan keeps to it, but the payload probes still use cuts big
    enough to time (limited to 2 KiB they timed fixed costs, and called loopback 1.18 Mbit/s)."""
    from edge import models
    from edge.runner import ModelRunner
    from edge.transport import TailClient
    from server.embedded import BackgroundServer

    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path))
    graph = graphs["mobilenetv2_035"]
    with BackgroundServer.from_files([models.model_path("mobilenetv2_035")]) as server:
        runner = ModelRunner(graph)
        client = TailClient(server.address, timeout_s=30.0)
        try:
            policy = AutoSplit.connect(
                runner, client, model_name="mobilenetv2_035", progress=False, max_bytes=2048
            )
        finally:
            client.close()
            runner.close()
    assert policy.prober is not None
    assert max(graph.cut(k).nbytes for k in policy.prober.probe_cuts) > 16 * 1024
    assert graph.cut(policy.choose()).nbytes <= 2048 or policy.choose() == graph.num_operators


def test_a_cut_the_device_cannot_run_is_never_planned_again(graph):
    """A head its backend refused: the result is a fallback with broken_cut, the server is not blamed
    (the policy stays reachable), and the planner moves to another cut."""
    n = graph.num_operators
    head = [0.01 * k for k in range(n)] + [100.0]  # a cheap head, an expensive whole model
    tail = [1.0 * (n - k) / n for k in range(n + 1)]
    policy = AutoSplit(graph, head, tail, estimator=link_with(0.1, 1.0, graph))  # a slow link: few bytes win
    k = policy.choose()
    assert 0 < k < n, k  # an inner cut: the one whose head will not run
    broken = InferenceResult(
        outputs={}, split_point=k, fallback=True, timings=StageTimings(head_ms=1.0, e2e_ms=1.0),
        fallback_reason="the head cannot run", broken_cut=True,
    )  # fmt: skip
    policy.observe(broken)
    assert policy.reachable
    assert policy.choose() != k
    assert policy.costs()[k].head_ms == float("inf")


def test_a_stacked_answer_counts_every_members_bytes_on_the_link(graph):
    """A request that went stacked with three others shared one call: its transfer time carried four
    requests' bytes each way. Counted as its own bytes alone, the link would look 4x slower."""
    head, tail = slow_device_profiles(graph)
    estimates = {}
    for stacked in (1, 4):
        est = LinkEstimator(clock=Clock())
        est.observe_rtt(1.0)
        policy = AutoSplit(graph, head, tail, estimator=est)
        for k in (1, 2, 3, graph.num_operators - 1) * 3:  # sizes that vary, so the bandwidth is fitted
            outputs = {t.name: np.zeros(t.shape, t.dtype) for t in graph.outputs}
            nbytes = graph.cut(k).nbytes
            wire_bytes = (nbytes + sum(a.nbytes for a in outputs.values())) * stacked
            transfer = 1.0 + wire_bytes / 125.0  # a 1 Mbit/s link
            remote = RemoteResult(
                outputs=outputs,
                parameters={"compute_us": 1000, "queue_us": 0, "edge_stack": stacked},
                call_ms=transfer + 1.0,
                bytes_sent=nbytes,
            )
            timings = StageTimings(head_ms=0.0, transfer_ms=transfer, tail_ms=1.0, e2e_ms=transfer + 1.0)
            policy.observe(InferenceResult(outputs, k, False, timings, bytes_sent=nbytes, remote=remote))
        estimates[stacked] = est.estimate().bytes_per_ms
    assert estimates[1] is not None and estimates[4] is not None
    assert estimates[4] == pytest.approx(estimates[1], rel=0.05) and estimates[1] == pytest.approx(
        125.0, rel=0.05
    )


@pytest.mark.parametrize(
    ("codec", "mbit", "coded"),
    [
        # A lossy codec at a quarter of the bytes: on a slow link it pays, on a fast one it does not
        # beat the raw cut by the margin (10 %), so the chosen cut goes raw and results stay exact.
        ("int4", 1.0, True),
        ("int4", 10_000.0, False),
        # A lossless one goes wherever it is faster at all: not where its time exceeds what it saves.
        ("zstd", 1.0, True),
        ("zstd", 10_000.0, False),
    ],
)
def test_each_cut_is_planned_coded_and_raw_and_goes_coded_only_where_that_pays(
    graph, codec: str, mbit: float, coded: bool
) -> None:
    head, tail = slow_device_profiles(graph)
    n = graph.num_operators
    policy = AutoSplit(graph, head, tail, estimator=link_with(mbit, 1.0, graph))
    policy.use_codec(codec, [0.25] * (n + 1), [0.2] * (n + 1))
    k = policy.choose()
    assert k < n  # the server is used either way
    assert policy.coded(k) is coded
    prediction = policy.last_plan.prediction(k)
    raw_bytes = graph.cut(k).nbytes
    assert prediction.nbytes == (round(raw_bytes * 0.25) if coded else raw_bytes)
    if coded:
        assert max(range(n), key=lambda c: graph.cut(c).nbytes) in policy.coded_cuts  # it saves most there
    else:
        assert policy.coded_cuts == set()


def test_a_lossy_cut_that_alone_meets_the_byte_limit_goes_coded(graph) -> None:
    """On a fast link the raw cut would score better, but --max-bytes leaves only the coded one: cut 0
    (1,024 bytes raw, 256 coded) against a limit of 1,023; raw, only the slow last cuts fit."""
    head, tail = slow_device_profiles(graph)
    n = graph.num_operators
    policy = AutoSplit(graph, head, tail, estimator=link_with(10_000.0, 1.0, graph), max_bytes=1023)
    assert policy.choose() > 8
    policy.use_codec("int4", [0.25] * (n + 1), [0.2] * (n + 1))  # planned again from the start
    assert policy.choose() == 0 and policy.coded(0)
    assert policy.last_plan.met_constraints and policy.last_plan.prediction(0).nbytes == 256
