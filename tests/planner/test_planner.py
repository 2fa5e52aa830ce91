"""The planner's arithmetic: predictions, choice, constraints, objectives and hysteresis."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from edge.errors import EdgeError
from edge.link import LinkEstimate
from edge.planner import CutCost, Hysteresis, Plan, choose, cut_costs, plan, predict


def make_costs(head: list[float], tail: list[float], nbytes: list[int]) -> list[CutCost]:
    return [CutCost(k, h, t, b) for k, (h, t, b) in enumerate(zip(head, tail, nbytes, strict=True))]


def link(mbit: float, rtt_ms: float) -> LinkEstimate:
    return LinkEstimate(rtt_ms=rtt_ms, bytes_per_ms=mbit * 1000.0 / 8.0, samples=10, method="fit")


# A five-operator model shaped like a CNN: big early activations, small late ones.
# Device head times scale with `device`, server tails with `server`; bytes shrink with depth.
SHARES = [0.0, 0.1, 0.3, 0.6, 0.9, 1.0]
BYTES = [150_000, 400_000, 100_000, 20_000, 1_000, 0]


def cnn(device_ms: float, server_ms: float) -> list[CutCost]:
    head = [device_ms * s for s in SHARES]
    tail = [server_ms * (1.0 - s) for s in SHARES]
    tail[-1] = 0.0
    return make_costs(head, tail, BYTES)


@pytest.mark.parametrize(
    ("device_ms", "server_ms", "mbit", "rtt", "expected"),
    [
        # A very slow device and a fast link: send the input, the server does everything.
        (500.0, 5.0, 1000.0, 1.0, 0),
        # A slow device and a slower link: compute a little, send the small activation.
        (200.0, 5.0, 4.0, 5.0, 3),
        # A fast device and a slow link: the device runs alone.
        (5.0, 1.0, 1.0, 40.0, 5),
        # Fast device, fast link, but the round trip alone costs more than the whole model.
        (5.0, 1.0, 1000.0, 10.0, 5),
    ],
)
def test_choice_follows_device_and_link(device_ms, server_ms, mbit, rtt, expected):
    result = plan(cnn(device_ms, server_ms), link(mbit, rtt))
    assert result.choice == expected
    best = min(p.predicted_ms for p in result.predictions)
    assert result.chosen.predicted_ms == best


def test_prediction_is_the_sum_of_its_terms():
    costs = cnn(100.0, 10.0)
    est = link(8.0, 20.0)  # 1000 bytes per ms
    predictions = predict(costs, est, queue_ms=2.0)
    p = predictions[3]
    assert p.head_ms == pytest.approx(60.0)
    assert p.transfer_ms == pytest.approx(20.0)
    assert p.predicted_ms == pytest.approx(60.0 + 20.0 + 20.0 + 2.0 + 4.0)


@pytest.mark.parametrize("n", [1, 5])
def test_k_zero_and_k_n(n):
    shares = [k / n for k in range(n + 1)]
    costs = make_costs([40.0 * s for s in shares], [8.0 * (1 - s) for s in shares], [1000] * n + [0])
    predictions = predict(costs, link(8.0, 10.0))
    zero, last = predictions[0], predictions[n]
    assert zero.head_ms == 0.0 and zero.predicted_ms == pytest.approx(1.0 + 10.0 + 8.0)
    # K = N: the whole model on the device and nothing else, not even the round trip.
    assert last.local and last.nbytes == 0
    assert last.predicted_ms == pytest.approx(40.0)
    assert (last.transfer_ms, last.rtt_ms, last.queue_ms, last.tail_ms) == (0.0, 0.0, 0.0, 0.0)


def test_bytes_back_count_on_the_wire():
    costs = [CutCost(0, 0.0, 1.0, 1000, 1000), CutCost(1, 5.0, 0.0, 0)]
    p = predict(costs, link(8.0, 0.0))[0]
    assert p.transfer_ms == pytest.approx(2.0)
    assert p.score("bytes") == 2000


def test_no_link_means_device_only():
    result = plan(cnn(500.0, 1.0), None)
    assert result.choice == 5
    assert all(math.isinf(p.predicted_ms) for p in result.predictions[:-1])


def test_unknown_bandwidth_means_device_only():
    unknown = LinkEstimate(rtt_ms=1.0, bytes_per_ms=None, samples=0, method="none")
    assert plan(cnn(500.0, 1.0), unknown).choice == 5


@pytest.mark.parametrize(
    ("deadline", "max_bytes", "expected", "met"),
    [
        (None, None, 0, True),  # unconstrained: the server-only cut wins
        (None, 50_000, 3, True),  # the input is too big to send: best cut that fits
        (None, 0, 5, True),  # nothing may be sent: device only
        (250.0, 50_000, 3, True),
        (10.0, None, 0, False),  # nothing meets 10 ms: best by latency, and the plan says so
    ],
)
def test_constraints(deadline, max_bytes, expected, met):
    result = plan(cnn(400.0, 5.0), link(100.0, 5.0), deadline_ms=deadline, max_bytes=max_bytes)
    assert (result.choice, result.met_constraints) == (expected, met)
    assert bool(result.note) == (not met)
    if not met:
        assert "deadline 10 ms" in result.note


def test_infeasible_cuts_are_marked():
    result = plan(cnn(400.0, 5.0), link(100.0, 5.0), max_bytes=50_000)
    assert [p.feasible for p in result.predictions] == [b <= 50_000 for b in BYTES]


@pytest.mark.parametrize(
    ("compute_w", "radio_w", "expected"),
    [
        # Sending is cheap: the device hands everything over even though K=3 is as fast.
        (5.0, 0.01, 0),
        # Sending is dear: compute locally.
        (0.5, 20.0, 5),
    ],
)
def test_energy_objective(compute_w, radio_w, expected):
    result = plan(
        cnn(100.0, 2.0), link(20.0, 5.0), objective="energy", compute_watts=compute_w, radio_watts=radio_w
    )
    assert result.choice == expected
    p = result.prediction(3)
    # 1 ms at 1 W is 1 mJ.
    assert p.energy_mj == pytest.approx(p.head_ms * compute_w + p.transfer_ms * radio_w)


def test_energy_counts_idle_wait():
    costs = cnn(100.0, 2.0)
    base = predict(costs, link(20.0, 5.0))[2]
    idle = predict(costs, link(20.0, 5.0), idle_watts=1.0)[2]
    assert idle.energy_mj - base.energy_mj == pytest.approx(5.0 + base.tail_ms)


def test_bytes_objective_prefers_sending_nothing_then_least():
    assert plan(cnn(400.0, 5.0), link(100.0, 5.0), objective="bytes").choice == 5
    # With a deadline the device alone cannot meet, the fewest bytes among the cuts that meet it.
    result = plan(cnn(400.0, 5.0), link(100.0, 5.0), objective="bytes", deadline_ms=300.0)
    assert result.choice == 3


def test_unknown_objective():
    with pytest.raises(EdgeError, match="objective"):
        choose(predict(cnn(1.0, 1.0), link(1.0, 1.0)), objective="speed")  # type: ignore[arg-type]


def test_cut_costs_checks_profile_lengths(graphs):
    graph = graphs["digits_tiny"]
    n = graph.num_operators
    costs = cut_costs(graph, [0.0] * (n + 1), [0.0] * (n + 1))
    assert [c.nbytes for c in costs] == [graph.cut(k).nbytes for k in range(n + 1)]
    assert costs[0].nbytes_back == sum(t.nbytes for t in graph.outputs) and costs[n].nbytes_back == 0
    with pytest.raises(EdgeError, match="profiles"):
        cut_costs(graph, [0.0] * n, [0.0] * (n + 1))


# -- hysteresis ---------------------------------------------------------------------------------


def plan_of(latencies: list[float], *, feasible: list[bool] | None = None) -> Plan:
    costs = make_costs(latencies, [0.0] * len(latencies), [0] * len(latencies))
    # A free, instant link: each cut's predicted latency is exactly its "head".
    predictions = predict(costs, LinkEstimate(0.0, float("inf"), 1, "fit"))
    result = choose(predictions)
    if feasible is not None:
        marked = tuple(replace(p, feasible=f) for p, f in zip(result.predictions, feasible, strict=True))
        best = min((p for p in marked if p.feasible), key=lambda p: p.predicted_ms)
        result = Plan(best.index, "latency", marked, True)
    return result


def test_hysteresis_first_plan_is_adopted():
    h = Hysteresis(margin=0.1, patience=3)
    assert h.update(plan_of([10.0, 5.0, 7.0])) == 1


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        # Two cuts within 10% of each other trade places: no switch, ever.
        ([[10.0, 9.5]] * 10, 0),
        # Alternating winners by a wide margin: never M plans in a row against the current cut.
        ([[10.0, 5.0], [5.0, 10.0]] * 5, 0),
        # Beaten by 50% for 2 plans, then not: the streak resets.
        ([[10.0, 5.0], [10.0, 5.0], [10.0, 10.5], [10.0, 5.0], [10.0, 5.0]], 0),
        # Beaten by 50% for 3 plans in a row: switch.
        ([[10.0, 5.0]] * 3, 1),
    ],
)
def test_hysteresis_prevents_flapping(sequence, expected):
    h = Hysteresis(margin=0.1, patience=3)
    h.update(plan_of([1.0, 2.0]))  # start at cut 0
    choices = [h.update(plan_of(latencies)) for latencies in sequence]
    assert choices[-1] == expected
    switches = sum(1 for a, b in zip([0, *choices[:-1]], choices, strict=True) if a != b)
    assert switches <= 1


def test_hysteresis_leaves_a_broken_cut_at_once():
    h = Hysteresis(margin=0.1, patience=3)
    h.update(plan_of([1.0, 2.0, 3.0]))
    assert h.update(plan_of([1.0, 2.0, 3.0], feasible=[False, True, True])) == 1
