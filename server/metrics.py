"""What an operator can scrape from ``edge-server`` (``--metrics-port``), with prometheus-client.

Requests by model, cut and status; histograms of queue, compute and total time and of batch
sizes; requests in flight and waiting for a compute turn; bytes in and out; tail-cache hits and
loads per model. Labels are bounded: models are the served ones, cuts at most N + 1
per model, statuses the gRPC codes.

Under ``edge-server --processes N`` each server process writes its values to files in the
directory the supervisor names (prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``),
and the supervisor serves their sums on one endpoint (:func:`serve_multiprocess`). What is read at
scrape time in one process (requests waiting for a turn, tail-cache counts) is then written every
:data:`REFRESH_S` instead (:meth:`ServerMetrics.refresh`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from edge import prometheus

__all__ = ["REFRESH_S", "ServerMetrics", "serve_metrics", "serve_multiprocess"]

logger = logging.getLogger(__name__)

REFRESH_S = 1.0
"""How often a process of several writes what one process reads at scrape time."""

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """The server's metrics, in a registry of their own; ``multiprocess``: one process of several,
    whose values the supervisor sums (prometheus-client's multiprocess mode, which must be set in the
    environment before prometheus-client is imported)."""

    def __init__(self, *, multiprocess: bool = False) -> None:
        prom = prometheus.load("--metrics-port", "server")
        self.multiprocess = multiprocess
        self._refreshers: list[Callable[[], None]] = []
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "edge_requests",
            "Inference requests answered, by model, cut and status.",
            ["model", "cut", "status"],
            registry=self.registry,
        )
        self.refused = prom.Counter(
            "edge_refused",
            "Calls refused before any work: UNAUTHENTICATED, by reason (no_token, unknown_token).",
            ["reason"],
            registry=self.registry,
        )
        self.queue = prom.Histogram(
            "edge_queue_seconds",
            "Arrival to the start of compute.",
            ["model"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.compute = prom.Histogram(
            "edge_compute_seconds",
            "Compute time.",
            ["model", "cut"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.total = prom.Histogram(
            "edge_request_seconds",
            "Arrival to answer, on the server.",
            ["model"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.inflight = prom.Gauge(
            "edge_requests_in_flight",
            "Requests admitted, waiting or computing.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.bytes_in = prom.Counter(
            "edge_received_bytes", "Tensor bytes received.", ["model"], registry=self.registry
        )
        self.bytes_out = prom.Counter(
            "edge_sent_bytes", "Tensor bytes sent.", ["model"], registry=self.registry
        )

        self.batch_size = prom.Histogram(
            "edge_batch_size",
            "Requests computed together (1: alone).",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self._prom = prom

    def watch(self, waiting: Callable[[], int], runners: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        """Export what is read at scrape time: requests waiting for a compute turn, and each served
        model's tail-cache hits and loads (``runners`` gives (model name, ModelRunner) pairs)."""
        gauge = self._prom.Gauge(
            "edge_compute_waiting",
            "Requests admitted and waiting for a compute turn.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        if not self.multiprocess:
            gauge.set_function(waiting)
            self.registry.register(_TailCache(runners))
            return
        hits = self._prom.Counter(
            "edge_tail_cache_hits", "Model halves found loaded.", ["model"], registry=self.registry
        )
        loads = self._prom.Counter(
            "edge_tail_loads", "Model halves built and loaded.", ["model"], registry=self.registry
        )
        seen: dict[tuple[str, int], tuple[int, int]] = {}
        """What was written of each served runner's counts; only the runners served now are kept."""

        def refresh() -> None:
            gauge.set(waiting())
            now: dict[tuple[str, int], tuple[int, int]] = {}
            for name, runner in runners():
                key = (name, id(runner))  # a replaced model's runner counts from 0 again
                counts = now[key] = (runner.half_hits, runner.half_loads)
                was = seen.get(key, (0, 0))
                if counts[0] < was[0] or counts[1] < was[1]:
                    was = (0, 0)  # another runner at a freed one's address: it counts from 0
                hits.labels(name).inc(counts[0] - was[0])
                loads.labels(name).inc(counts[1] - was[1])
            seen.clear()
            seen.update(now)

        self._refreshers.append(refresh)

    def refresh(self) -> None:
        """Write what a scrape of one process would read live (only in multiprocess mode)."""
        for refresher in self._refreshers:
            refresher()

    def answered(
        self,
        model: str,
        cut: str,
        status: str,
        *,
        queue_s: float = 0.0,
        compute_s: float = 0.0,
        total_s: float = 0.0,
        bytes_in: int = 0,
        bytes_out: int = 0,
        batch: int = 1,
    ) -> None:
        self.requests.labels(model, cut, status).inc()
        if status == "OK":
            self.batch_size.labels(model).observe(batch)
            self.queue.labels(model).observe(queue_s)
            self.compute.labels(model, cut).observe(compute_s)
            self.total.labels(model).observe(total_s)
            self.bytes_in.labels(model).inc(bytes_in)
            self.bytes_out.labels(model).inc(bytes_out)


class _TailCache:
    """A collector: halves found loaded and halves loaded, per served model, read at scrape time."""

    def __init__(self, runners: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self.runners = runners

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        hits = CounterMetricFamily("edge_tail_cache_hits", "Model halves found loaded.", labels=["model"])
        loads = CounterMetricFamily("edge_tail_loads", "Model halves built and loaded.", labels=["model"])
        for name, runner in self.runners():
            hits.add_metric([name], runner.half_hits)
            loads.add_metric([name], runner.half_loads)
        yield hits
        yield loads


def serve_metrics(metrics: ServerMetrics, host: str, port: int) -> Any:
    """Serve ``/metrics`` over HTTP on a thread; returns the HTTP server (``shutdown()`` stops it)."""
    return prometheus.serve(metrics.registry, host, port)


def serve_multiprocess(directory: str, host: str, port: int) -> Any:
    """Serve the sums of what the processes writing to ``directory`` count, as :func:`serve_metrics`."""
    prom = prometheus.load("--metrics-port", "server")
    from prometheus_client import multiprocess

    registry = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return prometheus.serve(registry, host, port)
