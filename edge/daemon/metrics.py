"""What an operator can scrape from ``edge run`` (``[metrics]`` in the profile), with prometheus-client.

Messages by outcome, fallbacks, where results were computed, the cut in use, an end-to-end
latency histogram, the queue's depth, and the link estimate when the cut is planned.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import prometheus
from ..cooperative import InferenceResult

__all__ = ["DaemonMetrics"]

logger = logging.getLogger(__name__)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DaemonMetrics:
    """The daemon's metrics in a registry of their own, served over HTTP by :meth:`serve`."""

    def __init__(self) -> None:
        prom = prometheus.load("[metrics]", "daemon")
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.messages = prom.Counter(
            "edge_daemon_messages",
            "Sensor messages, by outcome (result, error, duplicate).",
            ["outcome"],
            registry=r,
        )
        self.fallbacks = prom.Counter(
            "edge_daemon_fallbacks",
            "Results the device finished itself because the server failed.",
            registry=r,
        )
        self.where = prom.Counter(
            "edge_daemon_results", "Results by where the tail ran (local, offloaded).", ["where"], registry=r
        )
        self.cut = prom.Gauge(
            "edge_daemon_cut", "The cut of the last result (N: the device alone).", registry=r
        )
        self.latency = prom.Histogram(
            "edge_daemon_e2e_seconds", "End-to-end time of a result.", buckets=_BUCKETS, registry=r
        )
        self.queue_depth = prom.Gauge("edge_daemon_queue_depth", "Messages held, waiting.", registry=r)
        self.behind = prom.Counter("edge_daemon_behind", "Messages that arrived to a full queue.", registry=r)
        self.answered_by = prom.Counter(
            "edge_daemon_answered",
            "Results by the stage that gave them (device-small: the cascade's small model; server; device-big).",
            ["by"],
            registry=r,
        )
        self.rtt = prom.Gauge("edge_daemon_link_rtt_ms", "The link's round trip, as estimated.", registry=r)
        self.bandwidth = prom.Gauge(
            "edge_daemon_link_mbit_per_s", "The link's bandwidth, as estimated (0: unknown).", registry=r
        )
        self._http: Any = None

    def result(self, inference: InferenceResult, *, answered_by: str = "") -> None:
        self.messages.labels("result").inc()
        self.where.labels("offloaded" if inference.offloaded else "local").inc()
        self.fallbacks.inc(int(inference.fallback))
        if answered_by:
            self.answered_by.labels(answered_by).inc()
        if answered_by != "device-small":  # the small model's answer says nothing of the cut
            self.cut.set(inference.split_point)
        self.latency.observe(inference.timings.e2e_ms / 1000.0)

    def link(self, rtt_ms: float, mbit_per_s: float | None) -> None:
        self.rtt.set(rtt_ms)
        self.bandwidth.set(mbit_per_s or 0.0)

    def serve(self, host: str, port: int) -> int:
        self._http = prometheus.serve(self.registry, host, port)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
