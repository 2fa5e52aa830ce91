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

import bisect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from edge import prometheus

__all__ = ["REFRESH_S", "ServerMetrics", "serve_metrics", "serve_multiprocess"]

logger = logging.getLogger(__name__)

REFRESH_S = 1.0
"""How often a process of several writes what one process reads at scrape time."""

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


_HISTOGRAMS: tuple[tuple[str, str, tuple[str, ...], tuple[float, ...]], ...] = (
    ("edge_queue_seconds", "Arrival to the start of compute.", ("model",), _BUCKETS),
    ("edge_compute_seconds", "Compute time.", ("model", "cut"), _BUCKETS),
    ("edge_request_seconds", "Arrival to answer, on the server.", ("model",), _BUCKETS),
    ("edge_batch_size", "Requests computed together (1: alone).", ("model",), (1, 2, 4, 8, 16, 32, 64, 128, 256)),
)  # fmt: skip
"""The histograms of answered requests, in the order :meth:`ServerMetrics.answered` takes their values."""

_BYTES = (("edge_received_bytes", "Tensor bytes received."), ("edge_sent_bytes", "Tensor bytes sent."))
_REQUESTS = (
    "edge_requests",
    "Inference requests answered, by model, cut and status.",
    ("model", "cut", "status"),
)
_IN_FLIGHT = ("edge_requests_in_flight", "Requests admitted, waiting or computing.")
_WAITING = ("edge_compute_waiting", "Requests admitted and waiting for a compute turn.")


class ServerMetrics:
    """The server's metrics, in a registry of their own; ``multiprocess``: one process of several,
    whose values the supervisor sums (prometheus-client's multiprocess mode, which must be set in the
    environment before prometheus-client is imported).

    What each answer counts costs the request path little: in one process it is tallied in plain
    Python (a dict lookup and a few additions, on the event loop) and turned into metric families when
    scraped (:class:`_Tallies`); in a process of several it goes to prometheus-client's metrics,
    whose values are the files the supervisor reads, through label children looked up once.
    """

    def __init__(self, *, multiprocess: bool = False) -> None:
        prom = prometheus.load("--metrics-port", "server")
        self.multiprocess = multiprocess
        self._refreshers: list[Callable[[], None]] = []
        self.registry = prom.CollectorRegistry()
        self.refused = prom.Counter(
            "edge_refused",
            "Calls refused before any work: UNAUTHENTICATED, by reason (no_token, unknown_token).",
            ["reason"],
            registry=self.registry,
        )
        self._prom = prom
        counted: _Tallies | _Children = _Children(prom, self.registry) if multiprocess else _Tallies()
        if isinstance(counted, _Tallies):
            self.registry.register(counted)
        self._count = counted.count

    def answered(
        self,
        model: str,
        cut: str,
        status: str,
        *,
        queue_s: float = 0.0,
        compute_s: float = 0.0,
        total_s: float = 0.0,
        batch: int = 1,
        bytes_in: int = 0,
        bytes_out: int = 0,
    ) -> None:
        """One answer, counted; its times, batch and sizes only for status OK."""
        self._count((model, cut, status), (queue_s, compute_s, total_s, batch), bytes_in, bytes_out)

    def watch(
        self,
        waiting: Callable[[], int],
        runners: Callable[[], Iterable[tuple[str, Any]]],
        inflight: Callable[[], int] = lambda: 0,
    ) -> None:
        """Export what is read at scrape time: requests admitted (``inflight``) and waiting for a
        compute turn, and each served model's tail-cache hits and loads (``runners`` gives (model name,
        ModelRunner) pairs)."""
        gauges = [
            (self._prom.Gauge(*names, registry=self.registry, multiprocess_mode="livesum"), read)
            for names, read in ((_IN_FLIGHT, inflight), (_WAITING, waiting))
        ]
        if not self.multiprocess:
            for gauge, read in gauges:
                gauge.set_function(read)
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
            for gauge, read in gauges:
                gauge.set(read())
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


class _Record:
    """What the answers of one (model, cut, status) add up to: plain numbers, written on the event loop."""

    __slots__ = ("answers", "buckets", "received", "sent", "sums")

    def __init__(self) -> None:
        self.answers = 0
        self.buckets = [[0] * (len(bounds) + 1) for _, _, _, bounds in _HISTOGRAMS]
        """Per histogram, the answers whose value falls in each bucket (not cumulative; the last: +Inf)."""
        self.sums = [0.0] * len(_HISTOGRAMS)
        self.received = 0
        self.sent = 0


class _Tallies:
    """The answers' counts, times and sizes tallied in plain Python, and exported as prometheus-client
    metric families when scraped: a collector. Written on the event loop only; a scrape (on an HTTP
    thread) reads copies, so it may miss an answer being counted, never mixes two."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str, str], _Record] = {}
        """By (model, cut, status): bounded as the labels are (served models, their cuts, the codes)."""
        self._bounds = [bounds for _, _, _, bounds in _HISTOGRAMS]

    def count(self, key: tuple[str, str, str], observed: tuple[float, ...], received: int, sent: int) -> None:
        """One answer of (model, cut, status) ``key``: its :data:`_HISTOGRAMS` values, and its bytes."""
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record()
        record.answers += 1
        if key[2] != "OK":
            return
        buckets, sums, bounds = record.buckets, record.sums, self._bounds
        for i, value in enumerate(observed):
            buckets[i][bisect.bisect_left(bounds[i], value)] += 1  # le: the first bound at or above it
            sums[i] += value
        record.received += received
        record.sent += sent

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        copies = [
            (key, record.answers, [list(b) for b in record.buckets], list(record.sums), record.received, record.sent)
            for key, record in list(self._records.items())
        ]  # fmt: skip
        requests = CounterMetricFamily(_REQUESTS[0], _REQUESTS[1], labels=list(_REQUESTS[2]))
        for key, answers, *_ in copies:
            requests.add_metric(list(key), answers)
        yield requests
        ok = [copy for copy in copies if copy[0][2] == "OK"]
        for i, (name, text, labels, bounds) in enumerate(_HISTOGRAMS):
            merged: dict[tuple[str, ...], tuple[list[int], float]] = {}
            for key, _, buckets, sums, _, _ in ok:
                values = key[: len(labels)]  # (model,) or (model, cut)
                counts, total = merged.get(values, ([0] * (len(bounds) + 1), 0.0))
                merged[values] = ([a + b for a, b in zip(counts, buckets[i], strict=True)], total + sums[i])
            histogram = HistogramMetricFamily(name, text, labels=list(labels))
            les = [*map(floatToGoString, bounds), "+Inf"]
            for values, (counts, total) in merged.items():
                cumulative = itertools.accumulate(counts)
                histogram.add_metric(list(values), list(zip(les, cumulative, strict=True)), total)
            yield histogram
        for j, (name, text) in enumerate(_BYTES):
            per_model: dict[str, int] = {}
            for key, _, _, _, received, sent in ok:
                per_model[key[0]] = per_model.get(key[0], 0) + (received, sent)[j]
            counter = CounterMetricFamily(name, text, labels=["model"])
            for model, value in per_model.items():
                counter.add_metric([model], value)
            yield counter


class _Children:
    """The answers counted into prometheus-client's own metrics (a process of several: their values
    are the files the supervisor sums), through each label set's children, looked up once."""

    def __init__(self, prom: Any, registry: Any) -> None:
        self._requests = prom.Counter(*_REQUESTS, registry=registry)
        self._histograms = [
            prom.Histogram(name, text, list(labels), buckets=bounds, registry=registry)
            for name, text, labels, bounds in _HISTOGRAMS
        ]
        self._bytes = [prom.Counter(name, text, ["model"], registry=registry) for name, text in _BYTES]
        self._children: dict[tuple[str, str, str], tuple[Any, ...]] = {}

    def count(self, key: tuple[str, str, str], observed: tuple[float, ...], received: int, sent: int) -> None:
        """:meth:`_Tallies.count`, into prometheus-client's metrics."""
        model, cut, status = key
        children = self._children.get(key)
        if children is None:
            # An error answer counts in edge_requests alone: no times or sizes, so no series of them.
            children = self._children[key] = (
                self._requests.labels(model, cut, status),
                *(
                    (
                        *(
                            histogram.labels(*(model, cut)[: len(labels)])
                            for histogram, (_, _, labels, _) in zip(
                                self._histograms, _HISTOGRAMS, strict=True
                            )
                        ),
                        *(counter.labels(model) for counter in self._bytes),
                    )
                    if status == "OK"
                    else ()
                ),
            )
        children[0].inc()
        if status != "OK":
            return
        for histogram, value in zip(children[1:5], observed, strict=True):
            histogram.observe(value)
        children[5].inc(received)
        children[6].inc(sent)


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
