"""``edge bench``: per-stage latency of cooperative inference, after a warm-up."""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track
from rich.table import Table

from ..argtypes import non_negative_int, positive_int
from ..cascade import Calibration, Router, open_router
from ..console import output_console
from ..cooperative import CooperativeRunner, InferenceResult
from ..pipeline import effective_window, pipelined
from ..preprocess import random_inputs
from ..stats import summary
from . import sweep
from .cascade_cmd import load_dataset
from .common import add_device_args, add_server_args, check_strict, load_graph, open_runner

__all__ = ["measure", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure per-stage latency (head, transfer, tail) at one cut",
        description="Measure cooperative inference at one cut: head on this device, tail on the server, after a "
        "warm-up. Without --server an edge server is started in-process on loopback. --model is required "
        "(edge bench sweep has its own default).",
        usage="%(prog)s --model MODEL [options]\n       %(prog)s sweep [options]",
    )
    # Not required by argparse, which would demand it of `edge bench sweep` too: _run_one_cut checks it.
    add_device_args(p, model_required=False)
    add_server_args(p)
    p.add_argument("-n", type=positive_int, default=200, help="measured requests (default: %(default)s)")
    p.add_argument(
        "--warmup", type=non_negative_int, default=20, help="unmeasured requests first (default: %(default)s)"
    )
    p.add_argument(
        "--inflight",
        type=positive_int,
        default=1,
        metavar="W",
        help="keep up to W requests in flight on one stream, so that the device runs the next head while "
        "the server runs a tail; results stay in order (default: %(default)s, one at a time)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--cascade",
        type=Path,
        metavar="CAL.json",
        help="measure through a calibrated cascade or early exit (its big model and cut replace --model and "
        "--split-at); the report adds the stage that answered",
    )
    p.add_argument(
        "--data",
        type=Path,
        metavar="FILE.npz",
        help="with --cascade: requests from this labelled data (x), in turn, instead of one random input",
    )
    p.set_defaults(func=functools.partial(_run_one_cut, p))
    # prog given: argparse would otherwise build the subcommand's usage from this parser's two-line usage.
    sweep.register(p.add_subparsers(dest="bench_mode", metavar="{sweep}", title="other modes", prog=p.prog))


def _run_one_cut(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.model and not args.cascade:
        parser.error("the following arguments are required: --model")
    if args.data and not args.cascade:
        parser.error("--data goes with --cascade")
    if args.inflight > 1 and args.cascade:
        parser.error("--inflight goes without --cascade: a cascade answers one request at a time")
    return run(args)


class _Routed:
    """A router that looks like a cooperative runner to :func:`measure`, counting who answered."""

    def __init__(self, router: Router, device: CooperativeRunner) -> None:
        self.router, self.client = router, device.client
        self.answered_by: Counter[str] = Counter()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> InferenceResult:
        routed = self.router.infer(feeds)
        self.answered_by[routed.answered_by] += 1
        return routed.inference

    def close(self) -> None:
        self.router.close()


def measure(
    device, feeds, n: int, warmup: int, *, progress: bool = False, inflight: int = 1
) -> dict[str, object]:
    """Run ``warmup`` then ``n`` requests (``feeds``, or each of a list of feeds in turn); per-stage
    summaries in milliseconds, and ``throughput_rps`` over the ``n`` timed requests. With
    ``inflight`` above 1 (a CooperativeRunner), up to that many are in flight at once."""
    inputs = itertools.cycle(feeds if isinstance(feeds, list) else [feeds])

    def results(count: int) -> Iterator[InferenceResult]:
        if inflight > 1:
            return pipelined(device, (next(inputs) for _ in range(count)), inflight)
        return (device.infer(next(inputs)) for _ in range(count))

    for _ in results(warmup):
        pass
    if hasattr(device, "answered_by"):
        device.answered_by.clear()  # the warm-up's answers are not the measurement's
    stages: dict[str, list[float]] = {
        "e2e_ms": [],
        "head_ms": [],
        "tail_ms": [],
        "transfer_ms": [],
        "queue_ms": [],
    }
    overhead: list[float] = []
    fallbacks = lossy = 0
    last_reason: str | None = None
    bytes_sent = 0
    split_points = []
    timed = results(n)
    started, cpu_started = time.perf_counter(), time.process_time()
    for result in track(timed, total=n, description="measuring", transient=True) if progress else timed:
        t = result.timings
        for key, value in t.as_dict().items():
            stages[key].append(value)
        overhead.append(t.e2e_ms - t.head_ms - t.tail_ms)
        fallbacks += result.fallback
        lossy += result.lossy
        if result.fallback and last_reason is None:
            last_reason = result.fallback_reason
        bytes_sent += result.bytes_sent
        split_points.append(result.split_point)
    elapsed = time.perf_counter() - started
    cpu_ms = (time.process_time() - cpu_started) * 1000.0
    report: dict[str, object] = {key: summary(values) for key, values in stages.items()}
    report["overhead_ms"] = summary(overhead)
    report["bytes_sent"] = round(bytes_sent / n, 1)  # per request, on average
    report["n"] = n
    # The window used: a server that lets a device keep fewer in flight caps it.
    report["inflight"] = effective_window(device, inflight) if inflight > 1 else 1
    report["throughput_rps"] = round(n / elapsed, 1) if elapsed > 0 else None
    # This process's CPU per request, every thread (the head, gRPC, an in-process server if any).
    report["device_cpu_ms"] = round(cpu_ms / n, 4)
    report["fallbacks"] = fallbacks
    report["lossy"] = lossy  # results whose cut went through a lossy codec
    report["fallback_reason"] = last_reason
    report["split_point"] = statistics.mode(split_points) if split_points else None
    return report


def run(args: argparse.Namespace) -> int:
    calibration = Calibration.load(args.cascade) if args.cascade else None
    graph = calibration.big.load("big") if calibration is not None else load_graph(args.model)
    if calibration is not None and args.split_at is None:
        args.split_at = str(calibration.split_point)
    feeds: object = random_inputs(graph, args.seed)
    if args.data:
        feeds = load_dataset(args.data, graph)[0]
    routed = None
    with ExitStack() as stack:
        if not args.server:
            from server.embedded import BackgroundServer

            server = stack.enter_context(BackgroundServer.from_files([Path(graph.source)]))
            args.server = server.address
        device = open_runner(args, graph)
        runner: Any = device
        if calibration is not None:
            router = open_router(calibration, device, backend=args.backend, threads=args.threads)
            runner = routed = _Routed(router, device)
        stack.callback(runner.close)
        report = measure(runner, feeds, args.n, args.warmup, progress=not args.json, inflight=args.inflight)
    if routed is not None:
        report["answered_by"] = dict(routed.answered_by)
        report["split_point"] = graph.resolve_cut(args.split_at)  # local answers ran another model
    client = device.client
    report.update(
        model=Path(graph.source).stem,
        server=args.server,
        transport="stream" if getattr(client, "streaming", False) else "unary",
        backend=args.backend,
        codec=str(args.codec),
        threads=args.threads,
        cpu_latency_us=args.cpu_latency_us,
        input_bytes=sum(t.nbytes for t in graph.inputs),
    )
    fallbacks, n = int(report["fallbacks"]), int(report["n"])  # type: ignore[call-overload]
    if fallbacks == n and n:
        print(
            f"edge bench: every request ran on the device; the server was not used: {report['fallback_reason']}",
            file=sys.stderr,
        )
    check_strict(args, fallbacks, n, report["fallback_reason"])  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = output_console()
    table = Table(
        title=f"{report['model']} at cut {report['split_point']} of {graph.num_operators}, n={args.n}"
    )
    for column in ("stage", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for key in ("head_ms", "transfer_ms", "queue_ms", "tail_ms", "overhead_ms", "e2e_ms"):
        s = report[key]
        assert isinstance(s, dict)
        table.add_row(key.removesuffix("_ms"), f"{s['p50']:.3f}", f"{s['p90']:.3f}", f"{s['p99']:.3f}")
    console.print(table)
    console.print(
        f"bytes sent {report['bytes_sent']:,} (input {report['input_bytes']:,}); fallbacks {report['fallbacks']}; "
        f"{report['throughput_rps']} requests/s with {report['inflight']} in flight; overhead = e2e - head - tail"
    )
    return 0
