"""Choose the cut: predict every cut's cost from profiles and link estimates, pick the best.

The arithmetic is pure (:func:`predict`, :func:`choose`, :func:`plan`, :class:`Hysteresis`):
no clocks, no network. For cut K of a model with N operators::

    T(K) = head(K) + bytes(K) / bandwidth + rtt + queue + tail(K)     0 <= K < N
    T(N) = head(N)                                                    the device alone

``head`` comes from the device's own profile, ``tail`` from the server's, ``rtt`` (the fixed
cost of one request) and ``bandwidth`` from :mod:`edge.link`; ``bytes(K)`` counts the cut
tensors sent and the outputs the tail sends back. :class:`edge.autosplit.AutoSplit` is the
:class:`~edge.cooperative.SplitPolicy` that keeps these inputs fresh and re-plans as they move.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

from .errors import EdgeError
from .graph import ModelGraph
from .link import LinkEstimate

__all__ = [
    "DEFAULT_COMPUTE_WATTS",
    "DEFAULT_RADIO_WATTS",
    "OBJECTIVES",
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
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)

# A phone-class SoC under load, and a Wi-Fi radio while transmitting.
DEFAULT_COMPUTE_WATTS = 2.0
DEFAULT_RADIO_WATTS = 1.2


# -- the pure planner -------------------------------------------------------------------------


# Plain slotted dataclasses, not frozen ones: a plan makes two of each per cut on every request, and a
# frozen one's __init__ sets each field through object.__setattr__ (3 times slower to build).
@dataclass(slots=True)
class CutCost:
    """What one cut costs before the link is known: device head, server tail, bytes sent."""

    index: int
    head_ms: float
    tail_ms: float
    nbytes: int
    """Bytes sent: the cut tensors."""
    nbytes_back: int = 0
    """Bytes received: the outputs the tail computes."""


@dataclass(slots=True)
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
            energy = c.head_ms * compute_watts  # ms x W = mJ
            out.append(Prediction(c.index, c.head_ms, 0.0, 0.0, 0.0, 0.0, 0, 0, energy, True))
            continue
        if link is None or not link.usable:
            transfer = rtt = math.inf
        else:
            transfer, rtt = link.transfer_ms(c.nbytes + c.nbytes_back), link.rtt_ms
        wait_ms = rtt + queue_ms + c.tail_ms
        energy = c.head_ms * compute_watts + transfer * radio_watts + wait_ms * idle_watts  # ms x W = mJ
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
    allowed: Collection[int] | None = None,
) -> Plan:
    """The best cut by ``objective`` among those meeting the constraints; ties go to lower latency.

    If none meets them, the best by objective over all cuts, with a note saying so. ``allowed``
    limits the choice to those cuts (the others are still predicted); None allows every cut.
    """
    if objective not in OBJECTIVES:
        raise EdgeError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")

    def meets(p: Prediction) -> bool:
        return (deadline_ms is None or p.predicted_ms <= deadline_ms) and (
            max_bytes is None or p.nbytes <= max_bytes
        )

    marked = tuple(p if meets(p) == p.feasible else replace(p, feasible=not p.feasible) for p in predictions)
    reachable = [
        p
        for p in marked
        if math.isfinite(p.predicted_ms) and (allowed is None or p.index in allowed or p.local)
    ]
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
    allowed: Collection[int] | None = None,
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
    return choose(
        predictions, objective=objective, deadline_ms=deadline_ms, max_bytes=max_bytes, allowed=allowed
    )


@dataclass(slots=True)
class Hysteresis:
    """Keeps the current cut until another beats it by more than ``margin`` in ``patience`` plans in a row.

    A cut that breaks the constraints while another meets them, or that cannot run any more, is left
    at once.
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
        mine_score, best_score = mine.score(new.objective), best.score(new.objective)
        # A cut that breaks the constraints, or that can no longer run at all (its cost went to
        # infinity: the device's backend refused its head), is left at once.
        broken = (not mine.feasible and best.feasible) or (
            not math.isfinite(mine_score) and math.isfinite(best_score)
        )
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
