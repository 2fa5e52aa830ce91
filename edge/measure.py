"""How long each half of every cut takes on this machine: the measurement both sides share.

The device profiles heads (:func:`profile_heads`), the server tails (:func:`profile_tails`).
Each cut gets ``warmup`` unmeasured runs, then the median of ``runs`` measured ones; the
first runs also build the half, so building is never measured. Measured runs take turns
between cuts and each follows a short idle gap, as live requests do (a tight loop over one
half keeps its weights in cache and flatters it). All cuts are measured in ``passes``
sweeps and each keeps its smallest median: a burst of load from elsewhere on the machine
inflates one sweep's few cuts, not the profile. By definition the head at K = 0 and the
tail at K = N cost nothing, and the head at K = N is the whole model. Cuts not measured are
spread between the measured ones by per-operator weights (:func:`operator_costs`).

The device's cache of its head profiles is :mod:`edge.profiler`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from .backends import create_backend
from .errors import EdgeError
from .graph import ModelGraph
from .partition import extract_subgraph
from .preprocess import random_inputs
from .runner import ModelRunner

__all__ = [
    "ProfileCancelledError",
    "candidate_cuts",
    "interpolate",
    "operator_costs",
    "profile_heads",
    "profile_tails",
    "safe_cuts",
]

logger = logging.getLogger(__name__)


def _measure(
    calls: Mapping[int, Callable[[], object]],
    *,
    runs: int,
    warmup: int,
    passes: int,
    gap_s: float,
    block: int,
    progress: str | None,
    stop: threading.Event | None = None,
) -> dict[int, float]:
    """Each call's median time (ms), measured the way live requests run them; raises
    :class:`ProfileCancelledError` soon after ``stop`` is set.

    A request runs one half after the network and the rest of the stack have had the CPU, so
    its caches are cold and the core may have idled. Back-to-back runs of one half flatter it
    (by 20-40% here). So the calls take turns, a block at a time, and each measured run
    follows an idle ``gap_s``. Each call keeps the smallest of its ``passes`` medians.
    """
    stop = stop if stop is not None else threading.Event()
    keys = list(calls)
    blocks = [keys[i : i + block] for i in range(0, len(keys), block)] * passes
    best = dict.fromkeys(keys, float("inf"))
    jobs: Iterable[list[int]] = blocks
    if progress is not None:
        from rich.console import Console
        from rich.progress import track

        jobs = track(blocks, description=progress, transient=True, console=Console(stderr=True))
    for group in jobs:
        samples: dict[int, list[float]] = {k: [] for k in group}
        for k in group:
            for _ in range(warmup):  # also builds the half: building is never measured
                calls[k]()
        for _ in range(runs):
            for k in group:
                if stop.wait(gap_s):  # the idle gap, cut short by a stop
                    raise ProfileCancelledError("profiling was stopped")
                started = time.perf_counter()
                calls[k]()
                samples[k].append((time.perf_counter() - started) * 1000.0)
        for k in group:
            best[k] = min(best[k], float(statistics.median(samples[k])))
    return best


class ProfileCancelledError(EdgeError):
    """A profile was stopped before it finished (the server is shutting down)."""


def candidate_cuts(graph: ModelGraph, sent: Sequence[float] | None = None) -> list[int]:
    """The cuts a planner can pick: 0, N, and each cut that sends fewer bytes than every earlier one
    (``sent``: the bytes each cut sends, where a codec makes them fewer than its tensors' own).

    A cut that sends at least as many bytes as an earlier cut also runs more of the model on the
    device: it costs more head time, more transfer and more device energy, and wins back only
    the tail time its extra operators would take on the server. So it can only win when the
    device computes faster than the server, where the device alone (K = N) wins anyway.
    """
    n = graph.num_operators
    sizes = sent if sent is not None else [graph.cut(k).nbytes for k in range(n + 1)]
    chosen = [0]
    fewest = sizes[0]
    for k in range(1, n):
        if graph.cut(k).tail_outputs and sizes[k] < fewest:
            fewest = sizes[k]
            chosen.append(k)
    return [*chosen, n]


def safe_cuts(graph: ModelGraph, runner: ModelRunner | None = None) -> list[int]:
    """The cuts anything may run a head at to measure something (profiles, link probes) or plan:
    :func:`candidate_cuts`, less those whose head ``runner``'s backend cannot build."""
    cuts = candidate_cuts(graph)
    if runner is None:
        return cuts
    return [k for k in cuts if runner.half_error("head", k) is None]


def operator_costs(
    runner: ModelRunner, activations: Mapping[str, np.ndarray], *, runs: int = 5
) -> list[float]:
    """Each operator's median time (ms) run alone on what the model feeds it: weights to spread the
    measured cuts' times over the cuts between them. Alone, an operator pays a little fixed cost of
    its own, so these are weights, not times."""
    graph = runner.graph
    costs = []
    for op in graph.operators:
        if all(t in graph.computed_weights for t in op.outputs):
            costs.append(0.0)  # folded into the weights when the model loads: no run-time cost
            continue
        inputs = [i for i in op.inputs if not graph.is_weight(i)]
        ops = (*graph.weight_operators(op.inputs), op.index)
        data = extract_subgraph(graph, ops, inputs, list(op.outputs))
        feeds = {graph.tensors[i].name: activations[graph.tensors[i].name] for i in inputs}
        try:
            with create_backend(runner.backend, data, threads=runner.threads) as backend:
                backend.run(feeds)
                samples = []
                for _ in range(runs):
                    started = time.perf_counter()
                    backend.run(feeds)
                    samples.append((time.perf_counter() - started) * 1000.0)
        except EdgeError:
            costs.append(0.0)  # cannot run alone (a stateful or custom op): spread nothing onto it
            continue
        costs.append(float(statistics.median(samples)))
    return costs


def interpolate(anchors: Mapping[int, float], weights: Sequence[float]) -> list[float]:
    """One value per cut 0..N from the measured ``anchors`` (which hold 0 and N): between two anchors
    each cut gets the share of the difference that the operators up to it carry in ``weights``.
    A non-finite anchor stays itself and is skipped as an end point."""
    n = len(weights)
    cumulative = [0.0]
    for w in weights:
        cumulative.append(cumulative[-1] + max(w, 0.0))
    ends = sorted(k for k, v in anchors.items() if math.isfinite(v))
    out = [float(anchors[k]) if k in anchors else math.nan for k in range(n + 1)]
    for a, b in itertools.pairwise(ends):
        span = cumulative[b] - cumulative[a]
        for k in range(a + 1, b):
            if k in anchors:
                continue
            share = (cumulative[k] - cumulative[a]) / span if span > 0 else (k - a) / (b - a)
            out[k] = anchors[a] + (anchors[b] - anchors[a]) * share
    return out


def _spread(
    runner: ModelRunner, anchors: Mapping[int, float], activations: Callable[[], Mapping[str, np.ndarray]]
) -> list[float]:
    """Every cut's value from the measured ``anchors``, spread by per-operator weights; the operators
    are timed only when some cut was not measured."""
    n = runner.graph.num_operators
    weights = operator_costs(runner, activations()) if len(anchors) < n + 1 else [1.0] * n
    return interpolate(anchors, weights)


def _runnable(
    calls: Mapping[int, Callable[[], object]], *, what: str
) -> tuple[dict[int, Callable[[], object]], dict[int, str]]:
    """Each call run once (building its half), before any is timed: (those that ran, why the others
    failed). A failed cut is marked +inf, so that a planner never picks it."""
    ran: dict[int, Callable[[], object]] = {}
    failed: dict[int, str] = {}
    for k, call in calls.items():
        try:
            call()
        except EdgeError as err:  # ModelMismatchError among them
            failed[k] = str(err)
            continue
        ran[k] = call
    if failed:
        logger.warning(
            "%d %s cannot run and are never planned: %s",
            len(failed),
            what,
            "; ".join(f"cut {k}: {why}" for k, why in list(failed.items())[:3]),
        )
    return ran, failed


def profile_heads(
    runner: ModelRunner,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    runs: int = 9,
    warmup: int = 2,
    passes: int = 2,
    gap_s: float = 0.005,
    progress: bool = True,
    cuts: Sequence[int] | None = None,
) -> list[float]:
    """Median head latency (ms) at every cut 0..N, with ``runner``'s backend and threads.

    The ``cuts`` (default: :func:`candidate_cuts`, the ones a planner can pick, and N) are
    measured; the others are spread between them by per-operator weights.
    """
    graph = runner.graph
    n = graph.num_operators
    feeds = feeds if feeds is not None else random_inputs(graph, seed=0)
    measured_cuts = sorted((set(cuts if cuts is not None else candidate_cuts(graph)) | {n}) - {0})
    logger.info("profiling %d of %d heads of %s on %s", len(measured_cuts), n, graph.source, runner.backend)
    if n in measured_cuts:
        runner.run_head(n, feeds)  # the whole model: if it cannot run, there is nothing to plan with
    calls, failed = _runnable(
        {k: functools.partial(runner.run_head, k, feeds) for k in measured_cuts},
        what=f"head(s) of {graph.source} on {runner.backend}",
    )
    measured = _measure(
        calls,
        runs=runs,
        warmup=warmup,
        passes=passes,
        gap_s=gap_s,
        block=max(1, runner.cache_size // 2),
        progress=f"profiling {len(calls)} heads" if progress else None,
    )
    head = _spread(
        runner, {0: 0.0, **measured, **dict.fromkeys(failed, math.inf)}, lambda: runner.activations(feeds)
    )
    logger.info(
        "profiled %d of %d heads of %s (the rest spread by operator): whole model %.3f ms",
        len(calls),
        n,
        graph.source,
        head[n],
    )
    return head


def profile_tails(
    runner: ModelRunner,
    *,
    runs: int = 9,
    warmup: int = 2,
    passes: int = 2,
    gap_s: float = 0.005,
    seed: int = 0,
    cuts: Sequence[int] | None = None,
    stop: threading.Event | None = None,
) -> list[float]:
    """Median tail latency (ms) at every cut 0..N, fed what the head computes from a seeded input.

    ``stop`` set ends it early with :class:`ProfileCancelledError`.

    The ``cuts`` (default: :func:`candidate_cuts`) are measured, the others spread between them
    by per-operator weights. A measured tail that cannot run (its backend refuses it) gets +inf,
    so a planner never picks that cut; the other cuts are still measured.
    """
    graph = runner.graph
    n = graph.num_operators
    activations = runner.activations(random_inputs(graph, seed=seed))
    calls, failed = _runnable(
        {
            k: functools.partial(
                runner.run_tail, k, {t.name: activations[t.name] for t in graph.cut(k).tensors}
            )
            for k in sorted(set(cuts if cuts is not None else candidate_cuts(graph)) - {n})
            if graph.cut(k).tail_outputs
        },
        what=f"tail(s) of {graph.source}",
    )
    measured = _measure(
        calls,
        runs=runs,
        warmup=warmup,
        passes=passes,
        gap_s=gap_s,
        block=max(1, runner.cache_size // 2),
        progress=None,
        stop=stop,
    )
    anchors: dict[int, float] = {n: 0.0, **measured, **dict.fromkeys(failed, math.inf)}
    # A cut with no tail outputs (the model's outputs all computed already) costs nothing to finish.
    anchors.update({k: 0.0 for k in range(n) if not graph.cut(k).tail_outputs})
    tail = _spread(runner, anchors, lambda: activations)
    logger.info(
        "profiled %d of %d tails of %s (the rest spread by operator): whole model %.3f ms",
        len(calls),
        n,
        graph.source,
        tail[0],
    )
    return tail
