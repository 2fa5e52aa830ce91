"""Estimate the link to the edge server from live traffic and small probes.

Each offloaded request gives one sample: the bytes on the wire (cut sent plus outputs
received) and its transfer time (call time minus the server's compute and queue time).
Transfer time is modelled as ``rtt + max(0, offset + bytes / bandwidth)``, where ``rtt`` is
everything a request pays whatever its size (propagation both ways, both gRPC stacks) and
``offset`` (0 or negative) accounts for a token-bucket shaper's burst, which lets the first
few kilobytes through at line rate.

* When the recent samples span different sizes, a robust line fit (Theil-Sen: the median of
  pairwise slopes) gives bandwidth and rtt separately.
* When they all have one size, the rtt comes from ping probes and the bandwidth from
  ``bytes / (transfer - rtt)``, the median over the window, when most of them took measurable
  time beyond the rtt (else the few that did are noise).
* Samples older than ``max_age_s`` are dropped, so the estimate follows the link; the last
  bandwidth is remembered while only probes arrive.
* When every payload is too small to time (a fast link), the largest one gives a lower bound.

:class:`LinkEstimator` is pure (the clock is injected). :class:`LinkProber` is the adapter that
sends the probes through a :class:`~edge.transport.base.TailTransport`.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import wire
from .graph import ModelGraph
from .transport.base import TailTransport, ping, tail_profile

if TYPE_CHECKING:
    from .runner import ModelRunner

__all__ = ["LinkEstimate", "LinkEstimator", "LinkProber", "fit_line"]

logger = logging.getLogger(__name__)

# A payload shorter than this on the wire says little about bandwidth: fixed costs dominate it.
_MIN_PAYLOAD_MS = 0.5
_MIN_SIZE_RATIO = 1.5
_LARGE_BYTES = 16 * 1024
"""Payloads at least this big are remembered past ``max_age_s``: what the link does with a large
transfer, beyond the burst a shaper lets small ones through at."""


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """The link as last estimated."""

    rtt_ms: float
    """Fixed cost of one request: round trip and both stacks."""
    bytes_per_ms: float | None
    """Throughput; None while unknown."""
    samples: int
    method: str
    """``fit`` (sizes varied), ``probe`` (rtt from probes, one size), ``remembered``, ``bound`` (payloads too
    small to time: a lower bound) or ``none``."""
    offset_ms: float = 0.0
    """Where the fitted line meets zero bytes, less ``rtt_ms``; negative when a shaper's burst lets the
    first bytes through at line rate, so small payloads cost little more than the round trip."""
    fit_max_bytes: int | None = None
    """The largest recent payload the estimate rests on; past it, :attr:`beyond_bytes_per_ms` applies."""
    beyond_bytes_per_ms: float | None = None
    """Throughput of the large payloads seen (when slower than the fit): a line fitted to small
    payloads only is not extrapolated to large ones at its own, burst-inflated, rate."""

    @property
    def usable(self) -> bool:
        return self.bytes_per_ms is not None and self.bytes_per_ms > 0

    @property
    def mbit_per_s(self) -> float | None:
        return None if self.bytes_per_ms is None else self.bytes_per_ms * 8.0 / 1000.0

    def transfer_ms(self, nbytes: int) -> float:
        """Time on the wire for ``nbytes``, beyond the rtt every request pays."""
        if self.bytes_per_ms is None or self.bytes_per_ms <= 0:
            return float("inf")
        limit, beyond = self.fit_max_bytes, self.beyond_bytes_per_ms
        if limit is not None and beyond is not None and beyond > 0 and nbytes > limit:
            return max(0.0, self.offset_ms + limit / self.bytes_per_ms) + (nbytes - limit) / beyond
        return max(0.0, self.offset_ms + nbytes / self.bytes_per_ms)

    def as_dict(self) -> dict[str, object]:
        mbit = self.mbit_per_s
        return {
            "rtt_ms": round(self.rtt_ms, 4),
            "bandwidth_mbit_s": None if mbit is None else round(mbit, 4),
            "offset_ms": round(self.offset_ms, 4),
            "samples": self.samples,
            "method": self.method,
            "beyond_bytes": self.fit_max_bytes if self.beyond_bytes_per_ms is not None else None,
            "beyond_mbit_s": None
            if self.beyond_bytes_per_ms is None
            else round(self.beyond_bytes_per_ms * 0.008, 4),
        }


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Theil-Sen fit ``y = intercept + slope * x``: (slope, intercept), or None without two distinct x."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    if not keep.any():
        return None
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep]))
    intercept = float(np.median(y - slope * x))
    return slope, intercept


class LinkEstimator:
    """Bandwidth and rtt from (bytes, transfer ms) samples and rtt probes; see the module doc."""

    def __init__(
        self, *, window: int = 32, max_age_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._transfers: deque[tuple[float, int, float]] = deque(maxlen=window)
        self._rtts: deque[tuple[float, float]] = deque(maxlen=8)
        self._large: deque[tuple[int, float]] = deque(maxlen=8)
        self._bytes_per_ms: float | None = None
        self._offset_ms = 0.0
        self.last_sample_at = -float("inf")

    def observe_transfer(self, nbytes: int, transfer_ms: float) -> None:
        """One request: bytes on the wire both ways, and call time minus server compute and queue."""
        if nbytes < 0 or not transfer_ms >= 0:
            return
        now = self._clock()
        self._transfers.append((now, int(nbytes), float(transfer_ms)))
        if nbytes >= _LARGE_BYTES:
            self._large.append((int(nbytes), float(transfer_ms)))
        self.last_sample_at = now

    def observe_rtt(self, rtt_ms: float) -> None:
        """One probe with (almost) no payload: a ServerReady call."""
        if not rtt_ms >= 0:
            return
        now = self._clock()
        self._rtts.append((now, float(rtt_ms)))
        self.last_sample_at = now

    @property
    def probe_rtts(self) -> list[float]:
        """The recent rtt probes, ms."""
        return [ms for _, ms in self._rtts]

    def estimate(self) -> LinkEstimate:
        estimate = self._estimate()
        now = self._clock()
        sizes = [b for t, b, _ in self._transfers if now - t <= self.max_age_s]
        seen = max(sizes, default=0)
        if not estimate.usable or seen >= _LARGE_BYTES or not self._large:
            return estimate
        rates = [
            b / (ms - estimate.rtt_ms) for b, ms in self._large if ms - estimate.rtt_ms >= _MIN_PAYLOAD_MS
        ]
        if not rates or statistics.median(rates) >= (estimate.bytes_per_ms or 0.0):
            return estimate
        return dataclasses.replace(estimate, fit_max_bytes=seen, beyond_bytes_per_ms=statistics.median(rates))

    def _estimate(self) -> LinkEstimate:
        now = self._clock()
        fresh = [(b, ms) for t, b, ms in self._transfers if now - t <= self.max_age_s]
        probes = [ms for t, ms in self._rtts if now - t <= self.max_age_s] or [ms for _, ms in self._rtts]
        probe_rtt = statistics.median(probes) if probes else None
        sizes = [b for b, _ in fresh]
        if len(fresh) >= 3 and min(sizes) * _MIN_SIZE_RATIO <= max(sizes):
            fit = fit_line(sizes, [ms for _, ms in fresh])
            if fit is not None and fit[0] > 0:
                slope, intercept = fit
                self._bytes_per_ms = 1.0 / slope
                # Requests pay at least the probes' round trip; a line that meets zero bytes below
                # it (a token bucket's burst) keeps that as a negative offset on the payload.
                floor = probe_rtt if probe_rtt is not None else max(intercept, 0.0)
                rtt, self._offset_ms = (intercept, 0.0) if intercept >= floor else (floor, intercept - floor)
                return LinkEstimate(rtt, self._bytes_per_ms, len(fresh), "fit", self._offset_ms)
        rtt = probe_rtt if probe_rtt is not None else 0.0
        rates = [b / (ms - rtt) for b, ms in fresh if ms - rtt >= max(_MIN_PAYLOAD_MS, 0.1 * ms)]
        # Only when most payloads took measurable time: where most vanish in the noise, the few
        # that pass are the delayed ones, and their rate would be the noise's, not the link's.
        if rates and 2 * len(rates) > len(fresh):
            self._bytes_per_ms, self._offset_ms = statistics.median(rates), 0.0
            return LinkEstimate(rtt, self._bytes_per_ms, len(fresh), "probe")
        if probe_rtt is None and fresh:
            # No probe and no payload worth the name: the smallest transfer bounds the fixed cost.
            rtt = min(ms for _, ms in fresh)
        if self._bytes_per_ms is not None:
            return LinkEstimate(rtt, self._bytes_per_ms, len(fresh), "remembered", self._offset_ms)
        if fresh and max(sizes) > 0:
            # Even the largest payload vanished in the noise: the link is at least this fast.
            return LinkEstimate(rtt, max(sizes) / _MIN_PAYLOAD_MS, len(fresh), "bound")
        return LinkEstimate(rtt, None, len(fresh), "none")


class LinkProber:
    """Sends probes to the server and feeds the answers to an estimator.

    RTT probes travel like tail requests (see :meth:`_ping`). Payload probes are ordinary tail
    requests (the server reports its compute and queue time, so only the link's share is
    counted) carrying what the head computes from a seeded input when ``runner`` is given (a cut
    may carry shape tensors, which random values would break), else seeded random cut
    tensors, at cuts of three sizes: the smallest, about a third of
    ``payload_bytes`` and about ``payload_bytes``. If the largest still crossed the link
    in under ``min_payload_ms`` (a fast link: fixed costs and the shaper's burst hide its
    size) a cut big enough to take about twice that is probed too, up to ``max_bytes``.
    """

    def __init__(
        self,
        client: TailTransport,
        model_name: str,
        graph: ModelGraph,
        *,
        runner: ModelRunner | None = None,
        payload_bytes: int = 32 * 1024,
        min_payload_ms: float = 10.0,
        max_bytes: int | None = None,
        timeout_s: float = 30.0,
        profile_timeout_s: float = 600.0,
    ) -> None:
        self.client = client
        self.model_name = model_name
        self.graph = graph
        self.runner = runner
        self.timeout_s = timeout_s
        self.profile_timeout_s = profile_timeout_s
        self.min_payload_ms = min_payload_ms
        self._sizes = _probe_sizes(graph, max_bytes, runner)
        self.probe_cuts = _nearest(self._sizes, (0, payload_bytes // 3, payload_bytes))
        self._feeds: dict[int, dict[str, np.ndarray]] = {}

    def tail_profile(self) -> list[float]:
        """The server's median tail time per cut, 0..N (ms)."""
        profile = tail_profile(
            self.client, self.model_name, model_sha256=self.graph.sha256, timeout_s=self.profile_timeout_s
        )
        return [float(x) for x in profile]

    def probe_rtt(self, estimator: LinkEstimator, count: int = 3) -> None:
        for _ in range(count):
            estimator.observe_rtt(self._ping())

    def _ping(self) -> float:
        """One request's fixed cost (ms), paid the way tail requests pay it: a ``ping`` request,
        which the server answers at once without running anything. On a streaming client it is a
        message on the open stream, which costs less than a call, as tail requests do."""
        result = ping(self.client, self.model_name, model_sha256=self.graph.sha256, timeout_s=self.timeout_s)
        return result.transfer_ms

    def probe_bandwidth(self, estimator: LinkEstimator, count: int = 2) -> None:
        for k in self.probe_cuts:
            self._send(estimator, k, count)
        if not self.probe_cuts:
            return
        largest = max(self.graph.cut(k).nbytes for k in self.probe_cuts)
        estimate = estimator.estimate()
        if estimate.usable and estimate.transfer_ms(largest) < self.min_payload_ms:
            wanted = int(2.0 * self.min_payload_ms * (estimate.bytes_per_ms or 0.0))
            (k,) = _nearest(self._sizes, (wanted,))
            if self.graph.cut(k).nbytes > 1.5 * largest:
                self._send(estimator, k, count)

    def probe(self, estimator: LinkEstimator, *, rtt_count: int = 3, payload_count: int = 2) -> LinkEstimate:
        """RTT probes, then payload probes; returns the resulting estimate."""
        self.probe_rtt(estimator, rtt_count)
        self.probe_bandwidth(estimator, payload_count)
        estimate = estimator.estimate()
        logger.info(
            "link: rtt %.2f ms, %s Mbit/s (%s, %d samples)",
            estimate.rtt_ms,
            "?" if estimate.mbit_per_s is None else f"{estimate.mbit_per_s:.2f}",
            estimate.method,
            estimate.samples,
        )
        return estimate

    def _send(self, estimator: LinkEstimator, k: int, count: int) -> None:
        feeds = self._feeds.get(k)
        if feeds is None:
            feeds = self._feeds[k] = self._cut_tensors(k)
        for _ in range(count):
            result = self.client.infer(
                self.model_name,
                feeds,
                parameters={wire.MODEL_SHA256: self.graph.sha256, wire.SPLIT_POINT: k},
                timeout_s=self.timeout_s,
            )
            received = sum(a.nbytes for a in result.outputs.values())
            estimator.observe_transfer(result.bytes_sent + received, result.transfer_ms)

    def _cut_tensors(self, k: int) -> dict[str, np.ndarray]:
        from .preprocess import random_inputs, random_tensors

        if self.runner is None:
            return random_tensors(self.graph.cut(k).tensors, seed=k)
        return self.runner.run_head(k, random_inputs(self.graph, seed=0)).cut


def _probe_sizes(
    graph: ModelGraph, max_bytes: int | None, runner: ModelRunner | None
) -> list[tuple[int, int]]:
    """(bytes, cut) of every cut that sends something to a tail, within ``max_bytes``: with a
    ``runner``, among the cuts its heads may be run at (:func:`edge.measure.safe_cuts`)."""
    from .measure import safe_cuts

    cuts = safe_cuts(graph, runner) if runner is not None else range(graph.num_operators)
    return sorted(
        (graph.cut(k).nbytes, k)
        for k in cuts
        if k < graph.num_operators
        and graph.cut(k).nbytes > 0
        and graph.cut(k).tail_outputs
        and (max_bytes is None or graph.cut(k).nbytes <= max_bytes)
    )


def _nearest(sizes: list[tuple[int, int]], targets: tuple[int, ...]) -> tuple[int, ...]:
    """The cut nearest each target size (the later cut on ties), without repeats."""
    chosen: list[int] = []
    for target in targets:
        if not sizes:
            break
        _, k = min(sizes, key=lambda c: (abs(c[0] - target), -c[1]))
        if k not in chosen:
            chosen.append(k)
    return tuple(chosen)
