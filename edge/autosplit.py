"""The ``auto`` split policy: keeps the planner's inputs fresh from profiles, probes and live traffic.

:mod:`edge.planner` holds the arithmetic; this module feeds it and acts on its answer. It is
the only part of the planner that talks to the network, through a
:class:`~edge.transport.base.TailTransport`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .cooperative import InferenceResult
from .errors import EdgeError, ModelMismatchError, RemoteError
from .graph import ModelGraph
from .link import LinkEstimator, LinkProber
from .measure import candidate_cuts
from .planner import (
    DEFAULT_COMPUTE_WATTS,
    DEFAULT_RADIO_WATTS,
    OBJECTIVES,
    CutCost,
    Hysteresis,
    Objective,
    Plan,
    Prediction,
    choose,
    cut_costs,
    predict,
)
from .profiler import codec_profile, load_or_profile
from .transport.base import RETRYABLE
from .transport.circuit import Circuit
from .wire import encodings

if TYPE_CHECKING:
    from .runner import ModelRunner
    from .transport.base import TailTransport

__all__ = ["AutoSplit"]

logger = logging.getLogger(__name__)

_MAX_SERVERS = 64
"""Servers with a link estimate of their own; past it, all but the connect-time one are dropped."""


class AutoSplit:
    """A :class:`~edge.cooperative.SplitPolicy` that plans the cut from profiles and live link estimates.

    Every result feeds the link estimator (bytes sent, transfer time), the queue estimate and
    what the head and tail took at its cut; then it re-plans, and :class:`Hysteresis` decides
    whether to move. A cut that has run at least ``min_live`` times lately is planned with its
    own recent medians of head and tail time; other cuts with their profiles.

    Profiles are never exact, so near-ties are settled by trying: every ``explore_every``
    requests, the best other cut predicted within ``explore_margin`` of the current one, if it
    has not run ``min_live`` times yet, gets one request.

    When the link has been idle for ``probe_interval_s`` a ping refreshes the RTT, and while the device runs alone a payload probe now and then refreshes the bandwidth.
    When the server fails the policy goes local (K = N) and re-probes every ``reprobe_s``
    seconds. Probes run in the request that finds them due.

    With a codec (:meth:`use_codec`), each cut is planned both coded and raw, and goes coded only
    where that is predicted better: a lossless codec wherever it is faster, a lossy one only where it
    beats the raw cut by more than ``margin``. Where no lossy cut pays (a fast link), results stay
    exact. :meth:`coded` tells the runner which.
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
        # One link estimate per server ("": the one measured at connect, which a server heard from
        # for the first time starts from); a pool says which server a request goes to next.
        self.estimators: dict[str, LinkEstimator] = {"": estimator or LinkEstimator(clock=clock)}
        self.next_server: Callable[[], str] | None = None
        self.prober = prober
        self.probers: dict[str, LinkProber] = {}
        """A pool's servers, each with a prober of its own (probes that reach that server only)."""
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
        self.circuit: Circuit | None = None
        self._next_reprobe = clock() + reprobe_s
        self._last_bandwidth_probe = clock()
        self.candidates = frozenset(candidate_cuts(graph))
        self._sizes = [(c.nbytes, c.nbytes_back) for c in cut_costs(graph, self._head, self._head)]
        """Each cut's bytes sent and received, raw: the graph's, worked out once."""
        self.codec = "raw"
        self.lossy = False
        """The codec loses information (its results are flagged lossy)."""
        self.wire_ratio: dict[int, float] = {}
        """Compressed over raw bytes per cut, with a codec; empty: raw."""
        self.codec_ms: dict[int, float] = {}
        """Each cut's time to compress and decompress, with a codec."""
        self.coded_cuts: frozenset[int] = frozenset()
        """The cuts the last plan sends coded (with a codec); the others go raw."""
        self.last_plan: Plan | None = None
        self.replan()

    @classmethod
    def connect(
        cls,
        runner: ModelRunner,
        client: TailTransport | None,
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
        # Probes measure the link, so they need payloads big enough to time: --max-bytes limits the
        # cuts the plan may choose, not the probes (limited too, they measured fixed costs as bandwidth).
        prober = LinkProber(client, model_name, graph, runner=runner)
        tail: list[float] | None = None
        reachable = False
        try:
            tail = _server_tails(prober, head, progress=progress)
            prober.probe(estimator, rtt_count=probes, payload_count=max(1, probes - 1))
            reachable = True
        except RemoteError as err:
            logger.warning("edge server unreachable, starting with the device alone: %s", err)
        policy = cls(
            graph,
            head,
            tail,
            reachable=reachable,
            estimator=estimator,
            prober=prober,
            max_bytes=max_bytes,
            **options,
        )
        codec = client.codec_sent() if reachable else "raw"
        if codec != "raw":
            encoder = getattr(client, "cut_encoder", None)  # a calibrated codec's file
            policy.use_codec(codec, *codec_profile(runner, codec, encoder=encoder))
        members = getattr(client, "clients", None)
        if reachable and members is not None and len(members) > 1:
            policy.next_server = getattr(client, "next_address", None)
            # A pool: each server's own round trip, measured with probes sent to it alone.
            for member in members:
                own = LinkProber(member, model_name, graph, runner=runner)
                policy.probers[member.address] = own
                try:
                    own.probe_rtt(policy.estimator_for(member.address), count=probes)
                except RemoteError as err:
                    logger.info("edge server %s did not answer its probes: %s", member.address, err)
        return policy

    @property
    def estimator(self) -> LinkEstimator:
        """The link estimate of the server the next request goes to."""
        if self.next_server is None:
            return self.estimators[""]
        return self.estimator_for(self.next_server())

    def _prober(self) -> LinkProber:
        """The prober of the server the next request goes to (the pool's own when it has none)."""
        assert self.prober is not None
        if self.next_server is None or not self.probers:
            return self.prober
        return self.probers.get(self.next_server(), self.prober)

    def estimator_for(self, server: str) -> LinkEstimator:
        """``server``'s own link estimate; a copy of the connect-time one until it has samples."""
        link = self.estimators.get(server)
        if link is None:
            if len(self.estimators) > _MAX_SERVERS:
                self.estimators = {"": self.estimators[""]}
            link = self.estimators[server] = copy.deepcopy(self.estimators[""])
        return link

    # -- SplitPolicy ----------------------------------------------------------------------

    def bind(self, circuit: Circuit) -> None:
        """Follow the transport's circuit: it probes in the background, and the policy comes back to
        the server when the circuit closes, instead of probing inside a request."""
        self.circuit = circuit
        if not self.reachable and self.prober is not None:
            circuit.trip("not reachable at start")

    def choose(self) -> int:
        now = self._clock()
        if not self.reachable:
            if self.circuit is not None:
                if self.circuit.available():
                    self._back()
            elif self.prober is not None and now >= self._next_reprobe:
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
        if result.broken_cut:
            # The device's backend cannot run this cut's head: never plan it again.
            logger.warning("cut %d cannot run on this device; it is no longer planned", k)
            self._head[k] = math.inf
            self.replan()
            return
        if result.fallback and result.fallback_status == "RESOURCE_EXHAUSTED":
            return  # one request refused by a busy server, which is up: the next one goes as planned
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
            raw = self.graph.cut(k).nbytes
            if k in self.wire_ratio and raw and remote.coded:  # the ratio its coded requests achieve
                self.wire_ratio[k] = 0.7 * self.wire_ratio[k] + 0.3 * (result.bytes_sent / raw)
            received = sum(a.nbytes for a in remote.outputs.values())
            link = self.estimator_for(remote.server) if self.next_server is not None else self.estimator
            # A stacked request's call carried every member's bytes, both ways, in its transfer time.
            link.observe_transfer((result.bytes_sent + received) * remote.stacked, t.transfer_ms)
            self.queue_ms = 0.8 * self.queue_ms + 0.2 * t.queue_ms
            if t.tail_ms > 0:
                self._live_tail.setdefault(k, deque(maxlen=8)).append((now, t.tail_ms))
        self.replan()

    # -- planning -------------------------------------------------------------------------

    def coded(self, k: int) -> bool:
        """Whether a request at cut ``k`` goes through the codec, as the last plan chose."""
        return k in self.coded_cuts

    def costs(self, *, coded: bool = True) -> list[CutCost]:
        """Each cut's head and tail: its own recent median where it has run enough, else the profile.

        With a codec (and ``coded``), a cut sends its bytes times the codec's ratio there (profiled
        on real activations, then the ratio its requests actually achieved), and its head pays the
        codec's time (compressing and decompressing, which the head's own time does not hold)."""
        return self._costs(self._times(), coded=coded)

    def _times(self) -> tuple[list[float], list[float]]:
        """Each cut's head and tail time, as :meth:`costs` takes them."""
        profile_tail = self._tail if self._tail is not None else [0.0] * (self.n + 1)
        oldest = self._clock() - self.live_max_age_s
        head, tail = list(self._head), list(profile_tail)
        for times, live in ((head, self._live_head), (tail, self._live_tail)):
            for k, samples in live.items():  # the cuts that have run: few
                recent = [ms for t, ms in samples if t >= oldest]
                if len(recent) >= self.min_live:
                    times[k] = _median(recent, 0.0)
        return head, tail

    def _costs(self, times: tuple[list[float], list[float]], *, coded: bool) -> list[CutCost]:
        head, tail = times
        ratio, codec_ms = (self.wire_ratio, self.codec_ms) if coded else ({}, {})
        return [
            CutCost(
                k,
                head[k] + codec_ms.get(k, 0.0) if k in ratio else head[k],
                tail[k],
                round(sent * ratio[k]) if k in ratio else sent,
                back,
            )
            for k, (sent, back) in enumerate(self._sizes)
        ]

    def use_codec(self, codec: str, ratios: Sequence[float], codec_ms: Sequence[float]) -> None:
        """Plan with ``codec``: each cut's bytes scaled by its ratio, its head charged the codec's time."""
        self.codec = codec
        self.lossy = encodings.ENCODINGS[codec].lossy
        self.wire_ratio = {k: float(r) for k, r in enumerate(ratios) if k < self.n}
        self.codec_ms = {k: float(ms) for k, ms in enumerate(codec_ms) if k < self.n}
        # A cut the codec shrinks may now send fewer bytes than the cuts before it: a candidate too.
        sent = [raw * min(1.0, self.wire_ratio.get(k, 1.0)) for k, (raw, _) in enumerate(self._sizes)]
        self.candidates = frozenset(candidate_cuts(self.graph, sent))
        self.hysteresis.reset()  # planned from the start with the codec, not moved to from a plan without
        self.replan()

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
            and p.index in self.candidates
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
        options = {
            "queue_ms": self.queue_ms,
            "compute_watts": compute,
            "radio_watts": radio,
            "idle_watts": idle,
        }
        times = self._times()
        predictions = predict(self._costs(times, coded=False), link, **options)
        if self.wire_ratio:
            coded = predict(self._costs(times, coded=True), link, **options)
            picks = [self._coded_pays(c, r) for c, r in zip(coded, predictions, strict=True)]
            self.coded_cuts = frozenset(c.index for c, pick in zip(coded, picks, strict=True) if pick)
            predictions = [c if pick else r for c, r, pick in zip(coded, predictions, picks, strict=True)]
        new = choose(
            predictions,
            objective=self.objective,
            deadline_ms=self.deadline_ms,
            max_bytes=self.max_bytes,
            allowed=self.candidates,
        )
        if self.last_plan is not None and new.note and new.note != self.last_plan.note:
            logger.warning("%s", new.note)
        self.last_plan = new
        self.hysteresis.update(new)
        return new

    def _coded_pays(self, coded: Prediction, raw: Prediction) -> bool:
        """Whether a cut goes coded: it meets the deadline and byte limit where raw does not, or (both
        meeting them, or neither) scores better; a lossy codec by more than the margin."""

        def meets(p: Prediction) -> bool:
            return (self.deadline_ms is None or p.predicted_ms <= self.deadline_ms) and (
                self.max_bytes is None or p.nbytes <= self.max_bytes
            )

        if coded.local or meets(coded) != meets(raw):
            return not coded.local and meets(coded)
        bar = raw.score(self.objective) * (1.0 - self.hysteresis.margin if self.lossy else 1.0)
        return coded.score(self.objective) < bar

    # -- probing --------------------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        if self.reachable:
            logger.warning(
                "edge server lost, running locally and re-probing every %.0fs: %s", self.reprobe_s, reason
            )
        self.reachable = False
        if self.circuit is not None:
            self.circuit.trip(reason)
        self._next_reprobe = self._clock() + self.reprobe_s
        self.hysteresis.reset(self.n)
        self.replan()

    def _back(self) -> None:
        """The circuit closed: the server answers pings again."""
        if self._tail is None and self.prober is not None:
            try:
                self._tail = _server_tails(self.prober, self._head, progress=False)
            except EdgeError as err:
                if self.circuit is not None:
                    self.circuit.trip(str(err))
                return
        logger.info("edge server reachable again")
        self.reachable = True
        self.hysteresis.reset(self.n)
        self.replan()

    def _reprobe(self, now: float) -> None:
        assert self.prober is not None
        self._next_reprobe = now + self.reprobe_s
        try:
            if self._tail is None:
                self._tail = _server_tails(self.prober, self._head, progress=False)
            self._prober().probe_rtt(self.estimator, count=2)
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
            estimator, prober = self.estimator, self._prober()
            if now - estimator.last_sample_at >= self.probe_interval_s:
                prober.probe_rtt(estimator, count=1)
                probed = True
            if (
                self.hysteresis.current == self.n
                and now - self._last_bandwidth_probe >= self.bandwidth_probe_s
            ):
                self._last_bandwidth_probe = now
                prober.probe_bandwidth(estimator, count=1)
                probed = True
        except EdgeError as err:
            self._lost(str(err))
            return
        if probed:
            self.replan()


def _server_tails(prober: LinkProber, head_ms: Sequence[float], *, progress: bool) -> list[float]:
    """The server's tail profile; raises RemoteError only when the server cannot be reached.

    A server that is reachable but cannot profile (an older server, a model it cannot time)
    is still a server: its tails are estimated from the device's own profile, and live
    requests correct the estimate at the cuts that run.
    """
    graph = prober.graph
    try:
        tail = _with_status(prober.tail_profile, progress, f"waiting for {prober.client.address} to profile")
    except RemoteError as err:
        if err.status in RETRYABLE:
            raise
        logger.warning("edge server could not profile the tails (%s); estimating them from the device's", err)
        return estimated_tails(head_ms)
    if len(tail) != graph.num_operators + 1:
        raise ModelMismatchError(
            f"the server's profile of {prober.model_name!r} has {len(tail)} cuts, this model "
            f"{graph.num_operators + 1}"
        )
    failed = [k for k, ms in enumerate(tail) if not math.isfinite(ms)]
    if failed:
        logger.warning(
            "the server could not run the tail at %d cut(s) (%s); they are never chosen",
            len(failed),
            ", ".join(map(str, failed[:10])) + (" …" if len(failed) > 10 else ""),
        )
    return tail


def estimated_tails(head_ms: Sequence[float]) -> list[float]:
    """A tail profile taken from the device's head profile: what the device would need to finish."""
    whole = head_ms[-1]
    return [max(whole - h, 0.0) for h in head_ms]


def _with_status(work: Callable[[], list[float]], progress: bool, message: str) -> list[float]:
    logger.info("%s", message)
    if not progress:
        return work()
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        return work()
    with console.status(message + " (the first time per model takes a while)"):
        return work()


def _median(values: Sequence[float], default: float) -> float:
    if not values:
        return default
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
