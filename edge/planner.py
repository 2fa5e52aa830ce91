"""Choose the cut: predict every cut's cost from profiles and link estimates, pick the best.

The arithmetic is pure (:func:`predict`, :func:`choose`, :func:`plan`, :class:`Hysteresis`):
no clocks, no network. For cut K of a model with N operators::

    T(K) = head(K) + bytes(K) / bandwidth + rtt + queue + tail(K)     0 <= K < N
    T(N) = head(N)                                                    the device alone

``head`` comes from the device's own profile, ``tail`` from the server's, ``rtt`` (the fixed
cost of one request) and ``bandwidth`` from :mod:`edge.link`; ``bytes(K)`` counts the cut
tensors sent and the outputs the tail sends back. :class:`AutoSplit` is the
:class:`~edge.cooperative.SplitPolicy` that keeps these inputs fresh and re-plans as they move.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from .cooperative import InferenceResult
from .errors import EdgeError, ModelMismatchError, RemoteError
from .graph import ModelGraph
from .link import LinkEstimate, LinkEstimator, LinkProber
from .profiler import load_or_profile

if TYPE_CHECKING:
    from .runner import ModelRunner
    from .transport.client import TailClient

__all__ = [
    "DEFAULT_COMPUTE_WATTS",
    "DEFAULT_RADIO_WATTS",
    "AutoSplit",
    "CutCost",
    "Hysteresis",
    "Objective",
    "Plan",
    "Prediction",
    "choose",
    "cut_costs",
    "plan",
    "predict",
]

logger = logging.getLogger(__name__)

Objective = Literal["latency", "energy", "bytes"]
OBJECTIVES: tuple[Objective, ...] = ("latency", "energy", "bytes")

# A phone-class SoC under load, and a Wi-Fi radio while transmitting.
DEFAULT_COMPUTE_WATTS = 2.0
DEFAULT_RADIO_WATTS = 1.2


# -- the pure planner -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CutCost:
    """What one cut costs before the link is known: device head, server tail, bytes sent."""

    index: int
    head_ms: float
    tail_ms: float
    nbytes: int
    """Bytes sent: the cut tensors."""
    nbytes_back: int = 0
    """Bytes received: the outputs the tail computes."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """The predicted cost of one cut under one link estimate."""

    index: int
    head_ms: float
    transfer_ms: float
    """(bytes sent + received) / bandwidth: time the radio spends on the payload."""
    rtt_ms: float
    queue_ms: float
    tail_ms: float
    nbytes: int
    nbytes_back: int
    energy_mj: float
    local: bool
    """True for K = N: nothing is sent."""
    feasible: bool = True
    """Meets the deadline and the byte limit."""

    @property
    def predicted_ms(self) -> float:
        return self.head_ms + self.transfer_ms + self.rtt_ms + self.queue_ms + self.tail_ms

    def score(self, objective: Objective) -> float:
        """Smaller is better."""
        if objective == "latency":
            return self.predicted_ms
        if objective == "energy":
            return self.energy_mj
        return float(self.nbytes + self.nbytes_back)

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "predicted_ms": round(self.predicted_ms, 4),
            "head_ms": round(self.head_ms, 4),
            "transfer_ms": round(self.transfer_ms, 4),
            "rtt_ms": round(self.rtt_ms, 4),
            "queue_ms": round(self.queue_ms, 4),
            "tail_ms": round(self.tail_ms, 4),
            "bytes": self.nbytes,
            "bytes_back": self.nbytes_back,
            "energy_mj": round(self.energy_mj, 4),
            "feasible": self.feasible,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """Every cut's prediction and the one chosen."""

    choice: int
    objective: Objective
    predictions: tuple[Prediction, ...]
    met_constraints: bool
    """False when no cut met the deadline and byte limit, and ``choice`` is merely the best by objective."""
    note: str = ""

    @property
    def chosen(self) -> Prediction:
        return self.predictions[self.choice]

    def prediction(self, k: int) -> Prediction:
        return self.predictions[k]


def cut_costs(graph: ModelGraph, head_ms: Sequence[float], tail_ms: Sequence[float]) -> list[CutCost]:
    """Join the two profiles with the cut sizes; both profiles hold one value per cut, 0..N."""
    n = graph.num_operators
    if len(head_ms) != n + 1 or len(tail_ms) != n + 1:
        raise EdgeError(
            f"profiles must hold {n + 1} values (cuts 0..{n}), got {len(head_ms)} head and {len(tail_ms)} tail"
        )
    costs = []
    for k in range(n + 1):
        cut = graph.cut(k)
        back = 0 if k == n else sum(t.nbytes for t in cut.tail_outputs)
        costs.append(CutCost(k, float(head_ms[k]), float(tail_ms[k]), cut.nbytes, back))
    return costs


def predict(
    costs: Sequence[CutCost],
    link: LinkEstimate | None,
    *,
    queue_ms: float = 0.0,
    compute_watts: float = DEFAULT_COMPUTE_WATTS,
    radio_watts: float = DEFAULT_RADIO_WATTS,
    idle_watts: float = 0.0,
) -> list[Prediction]:
    """Predict every cut; the last cost is K = N (the device alone). ``link`` None: no server, only N is possible.

    Energy on the device (mJ) = head_s x compute_W + transfer_s x radio_W + wait_s x idle_W,
    where wait is the round trip, queue and tail the device sits through.
    """
    if not costs:
        raise EdgeError("no cuts to plan over")
    n = costs[-1].index
    out = []
    for c in costs:
        if c.index == n:
            energy = c.head_ms * compute_watts / 1000.0
            out.append(Prediction(c.index, c.head_ms, 0.0, 0.0, 0.0, 0.0, 0, 0, energy, True))
            continue
        if link is None or not link.usable:
            transfer = rtt = math.inf
        else:
            transfer, rtt = link.transfer_ms(c.nbytes + c.nbytes_back), link.rtt_ms
        wait_ms = rtt + queue_ms + c.tail_ms
        energy = (c.head_ms * compute_watts + transfer * radio_watts + wait_ms * idle_watts) / 1000.0
        out.append(
            Prediction(
                c.index, c.head_ms, transfer, rtt, queue_ms, c.tail_ms, c.nbytes, c.nbytes_back, energy, False
            )
        )
    return out


def choose(
    predictions: Sequence[Prediction],
    *,
    objective: Objective = "latency",
    deadline_ms: float | None = None,
    max_bytes: int | None = None,
) -> Plan:
    """The best cut by ``objective`` among those meeting the constraints; ties go to lower latency.

    If none meets them, the best by objective over all cuts, with a note saying so.
    """
    if objective not in OBJECTIVES:
        raise EdgeError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    marked = tuple(
        replace(
            p,
            feasible=(deadline_ms is None or p.predicted_ms <= deadline_ms)
            and (max_bytes is None or p.nbytes <= max_bytes),
        )
        for p in predictions
    )
    reachable = [p for p in marked if math.isfinite(p.predicted_ms)]
    feasible = [p for p in reachable if p.feasible]
    pool = feasible or reachable

    def key(p: Prediction) -> tuple[float, float, int]:
        return (p.score(objective), p.predicted_ms, -p.index)  # last tie-break: keep more on the device

    best = min(pool, key=key)
    note = ""
    if not feasible:
        limits = []
        if deadline_ms is not None:
            limits.append(f"deadline {deadline_ms:g} ms")
        if max_bytes is not None:
            limits.append(f"max {max_bytes} bytes")
        note = f"no cut meets {' and '.join(limits)}; chose the best by {objective} instead"
    return Plan(
        choice=best.index, objective=objective, predictions=marked, met_constraints=bool(feasible), note=note
    )


def plan(
    costs: Sequence[CutCost],
    link: LinkEstimate | None,
    *,
    objective: Objective = "latency",
    deadline_ms: float | None = None,
    max_bytes: int | None = None,
    queue_ms: float = 0.0,
    compute_watts: float = DEFAULT_COMPUTE_WATTS,
    radio_watts: float = DEFAULT_RADIO_WATTS,
    idle_watts: float = 0.0,
) -> Plan:
    """:func:`predict` then :func:`choose`."""
    predictions = predict(
        costs,
        link,
        queue_ms=queue_ms,
        compute_watts=compute_watts,
        radio_watts=radio_watts,
        idle_watts=idle_watts,
    )
    return choose(predictions, objective=objective, deadline_ms=deadline_ms, max_bytes=max_bytes)


@dataclass(slots=True)
class Hysteresis:
    """Keeps the current cut until another beats it by more than ``margin`` in ``patience`` plans in a row.

    A cut that breaks the constraints while another meets them is left at once.
    """

    margin: float = 0.10
    patience: int = 3
    current: int | None = None
    streak: int = 0

    def update(self, new: Plan) -> int:
        """Feed one plan; returns the cut to use now."""
        if self.current is None or self.current >= len(new.predictions):
            self.current, self.streak = new.choice, 0
            return self.current
        if new.choice == self.current:
            self.streak = 0
            return self.current
        mine, best = new.prediction(self.current), new.chosen
        broken = not mine.feasible and best.feasible
        mine_score, best_score = mine.score(new.objective), best.score(new.objective)
        beaten = best_score < mine_score * (1.0 - self.margin) if math.isfinite(mine_score) else True
        if broken:
            self.current, self.streak = new.choice, 0
        elif beaten:
            self.streak += 1
            if self.streak >= self.patience:
                logger.info(
                    "switching cut %s -> %s: %s %.3f -> %.3f for %d plans",
                    self.current,
                    new.choice,
                    new.objective,
                    mine_score,
                    best_score,
                    self.streak,
                )
                self.current, self.streak = new.choice, 0
        else:
            self.streak = 0
        return self.current

    def reset(self, k: int | None = None) -> None:
        self.current, self.streak = k, 0


# -- the policy -------------------------------------------------------------------------------


class AutoSplit:
    """A :class:`~edge.cooperative.SplitPolicy` that plans the cut from profiles and live link estimates.

    Every result feeds the link estimator (bytes sent, transfer time), the queue estimate and
    what the head and tail took at its cut; then it re-plans, and :class:`Hysteresis` decides
    whether to move. A cut that has run at least ``min_live`` times lately is planned with its
    own recent medians of head and tail time; other cuts with their profiles.

    Profiles are never exact, so near-ties are settled by trying: every ``explore_every``
    requests, the best other cut predicted within ``explore_margin`` of the current one, if it
    has not run ``min_live`` times yet, gets one request.

    When the link has been idle for ``probe_interval_s`` a ServerReady probe refreshes the
    RTT, and while the device runs alone a payload probe now and then refreshes the bandwidth.
    When the server fails the policy goes local (K = N) and re-probes every ``reprobe_s``
    seconds. Probes run in the request that finds them due.
    """

    def __init__(
        self,
        graph: ModelGraph,
        head_ms: Sequence[float],
        tail_ms: Sequence[float] | None,
        *,
        reachable: bool | None = None,
        estimator: LinkEstimator | None = None,
        prober: LinkProber | None = None,
        objective: Objective = "latency",
        deadline_ms: float | None = None,
        max_bytes: int | None = None,
        compute_watts: float = DEFAULT_COMPUTE_WATTS,
        radio_watts: float = DEFAULT_RADIO_WATTS,
        idle_watts: float = 0.0,
        margin: float = 0.10,
        patience: int = 3,
        min_live: int = 3,
        explore_every: int = 10,
        explore_margin: float = 0.15,
        live_max_age_s: float = 300.0,
        probe_interval_s: float = 10.0,
        bandwidth_probe_s: float = 60.0,
        reprobe_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if objective not in OBJECTIVES:
            raise EdgeError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        self.graph = graph
        self.n = graph.num_operators
        self._head = [float(x) for x in head_ms]
        self._tail = [float(x) for x in tail_ms] if tail_ms is not None else None
        self.estimator = estimator or LinkEstimator(clock=clock)
        self.prober = prober
        self.objective: Objective = objective
        self.deadline_ms = deadline_ms
        self.max_bytes = max_bytes
        self._watts = (compute_watts, radio_watts, idle_watts)
        self.hysteresis = Hysteresis(margin=margin, patience=patience)
        self.probe_interval_s = probe_interval_s
        self.bandwidth_probe_s = bandwidth_probe_s
        self.reprobe_s = reprobe_s
        self._clock = clock
        self.queue_ms = 0.0
        # Recent (time, ms) per cut, which replace the profile at cuts that have run enough lately.
        self._live_head: dict[int, deque[tuple[float, float]]] = {}
        self._live_tail: dict[int, deque[tuple[float, float]]] = {}
        self._ran: dict[int, deque[tuple[float, float]]] = {}
        self.live_max_age_s = live_max_age_s
        self.min_live = min_live
        self.explore_every = explore_every
        self.explore_margin = explore_margin
        self._since_explore = 0
        self.explored: deque[int] = deque(maxlen=100)
        """The cuts tried lately, outside the plan."""
        self.reachable = (tail_ms is not None) if reachable is None else (reachable and tail_ms is not None)
        self._next_reprobe = clock() + reprobe_s
        self._last_bandwidth_probe = clock()
        self.last_plan: Plan | None = None
        self.replan()

    @classmethod
    def connect(
        cls,
        runner: ModelRunner,
        client: TailClient | None,
        *,
        model_name: str,
        profile_label: str = "",
        progress: bool = True,
        refresh_profile: bool = False,
        probes: int = 3,
        max_bytes: int | None = None,
        **options: Any,
    ) -> AutoSplit:
        """Profile the device (or read its cached profile), fetch the server's profile, probe the link.

        An unreachable server is not an error: the policy starts local and re-probes.
        """
        graph = runner.graph
        head = load_or_profile(
            runner, label=profile_label, progress=progress, refresh=refresh_profile
        ).head_ms
        estimator = LinkEstimator()
        if client is None:
            return cls(graph, head, None, estimator=estimator, max_bytes=max_bytes, **options)
        prober = LinkProber(client, model_name, graph, max_bytes=max_bytes)
        tail: list[float] | None = None
        reachable = False
        try:
            tail = prober.tail_profile()
            if len(tail) != graph.num_operators + 1:
                raise ModelMismatchError(
                    f"the server's profile of {model_name!r} has {len(tail)} cuts, this model {graph.num_operators + 1}"
                )
            prober.probe(estimator, rtt_count=probes, payload_count=max(1, probes - 1))
            reachable = True
        except RemoteError as err:
            logger.warning("edge server unreachable, starting with the device alone: %s", err)
        return cls(
            graph,
            head,
            tail,
            reachable=reachable,
            estimator=estimator,
            prober=prober,
            max_bytes=max_bytes,
            **options,
        )

    # -- SplitPolicy ----------------------------------------------------------------------

    def choose(self) -> int:
        now = self._clock()
        if not self.reachable:
            if self.prober is not None and now >= self._next_reprobe:
                self._reprobe(now)
            if not self.reachable:
                return self.n
        elif self.prober is not None:
            self._probe_if_idle(now)
        current = self.hysteresis.current
        if current is None:
            return self.n
        if self.reachable and self.explore_every > 0 and self._since_explore >= self.explore_every:
            self._since_explore = 0
            contender = self._contender(current)
            if contender is not None:
                logger.debug("trying cut %d against cut %d", contender, current)
                self.explored.append(contender)
                return contender
        return current

    def observe(self, result: InferenceResult) -> None:
        k = result.split_point
        if result.fallback:
            self._lost(result.fallback_reason or "fallback")
            return
        self._since_explore += 1
        t = result.timings
        now = self._clock()
        self._ran.setdefault(k, deque(maxlen=8)).append((now, t.e2e_ms))
        if 0 < k <= self.n and t.head_ms > 0:
            self._live_head.setdefault(k, deque(maxlen=8)).append((now, t.head_ms))
        remote = result.remote
        if remote is not None and k < self.n:
            received = sum(a.nbytes for a in remote.outputs.values())
            self.estimator.observe_transfer(result.bytes_sent + received, t.transfer_ms)
            self.queue_ms = 0.8 * self.queue_ms + 0.2 * t.queue_ms
            if t.tail_ms > 0:
                self._live_tail.setdefault(k, deque(maxlen=8)).append((now, t.tail_ms))
        self.replan()

    # -- planning -------------------------------------------------------------------------

    def costs(self) -> list[CutCost]:
        """Each cut's head and tail: its own recent median where it has run enough, else the profile."""
        profile_tail = self._tail if self._tail is not None else [0.0] * (self.n + 1)
        head, tail = [], []
        for k in range(self.n + 1):
            live_head, live_tail = self._live(self._live_head, k), self._live(self._live_tail, k)
            head.append(_median(live_head, 0.0) if len(live_head) >= self.min_live else self._head[k])
            tail.append(_median(live_tail, 0.0) if len(live_tail) >= self.min_live else profile_tail[k])
        return cut_costs(self.graph, head, tail)

    def _live(self, samples: dict[int, deque[tuple[float, float]]], k: int) -> list[float]:
        oldest = self._clock() - self.live_max_age_s
        return [ms for t, ms in samples.get(k, ()) if t >= oldest]

    def _contender(self, current: int) -> int | None:
        """The best other cut predicted within ``explore_margin`` of ``current`` that has not run enough."""
        last = self.last_plan
        if last is None:
            return None
        mine = last.prediction(current)
        bar = mine.score(last.objective) * (1.0 + self.explore_margin)
        untried = [
            p
            for p in last.predictions
            if p.index != current
            and (p.feasible or not mine.feasible)
            and math.isfinite(p.predicted_ms)
            and p.score(last.objective) <= bar
            and len(self._live(self._ran, p.index)) < self.min_live
        ]
        if not untried:
            return None
        return min(untried, key=lambda p: (p.score(last.objective), p.predicted_ms)).index

    def replan(self) -> Plan:
        link = self.estimator.estimate() if self.reachable else None
        compute, radio, idle = self._watts
        new = plan(
            self.costs(),
            link,
            objective=self.objective,
            deadline_ms=self.deadline_ms,
            max_bytes=self.max_bytes,
            queue_ms=self.queue_ms,
            compute_watts=compute,
            radio_watts=radio,
            idle_watts=idle,
        )
        if self.last_plan is not None and new.note and new.note != self.last_plan.note:
            logger.warning("%s", new.note)
        self.last_plan = new
        self.hysteresis.update(new)
        return new

    # -- probing --------------------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        if self.reachable:
            logger.warning(
                "edge server lost, running locally and re-probing every %.0fs: %s", self.reprobe_s, reason
            )
        self.reachable = False
        self._next_reprobe = self._clock() + self.reprobe_s
        self.hysteresis.reset(self.n)
        self.replan()

    def _reprobe(self, now: float) -> None:
        assert self.prober is not None
        self._next_reprobe = now + self.reprobe_s
        try:
            if self._tail is None:
                self._tail = list(self.prober.tail_profile())
            self.prober.probe_rtt(self.estimator, count=2)
        except EdgeError as err:
            logger.debug("edge server still unreachable: %s", err)
            return
        logger.info("edge server reachable again")
        self.reachable = True
        self.hysteresis.reset(self.n)
        self.replan()

    def _probe_if_idle(self, now: float) -> None:
        assert self.prober is not None
        probed = False
        try:
            if now - self.estimator.last_sample_at >= self.probe_interval_s:
                self.prober.probe_rtt(self.estimator, count=1)
                probed = True
            if (
                self.hysteresis.current == self.n
                and now - self._last_bandwidth_probe >= self.bandwidth_probe_s
            ):
                self._last_bandwidth_probe = now
                self.prober.probe_bandwidth(self.estimator, count=1)
                probed = True
        except EdgeError as err:
            self._lost(str(err))
            return
        if probed:
            self.replan()


def _median(values: Sequence[float], default: float) -> float:
    if not values:
        return default
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
