"""``edge bench``: per-stage latency of cooperative inference, after a warm-up."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from contextlib import ExitStack
from pathlib import Path

from rich.progress import track
from rich.table import Table

from ..argtypes import non_negative_int, positive_int
from ..preprocess import random_inputs
from ..stats import summary
from . import sweep
from .common import add_device_args, add_server_args, load_graph, open_runner
from .pipes import output_console

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
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=functools.partial(_run_one_cut, p))
    sweep.register(p.add_subparsers(dest="bench_mode", metavar="{sweep}", title="other modes"))


def _run_one_cut(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.model:
        parser.error("the following arguments are required: --model")
    return run(args)


def measure(device, feeds, n: int, warmup: int, *, progress: bool = False) -> dict[str, object]:
    """Run ``warmup`` then ``n`` requests; per-stage summaries in milliseconds."""
    for _ in range(warmup):
        device.infer(feeds)
    stages: dict[str, list[float]] = {
        "e2e_ms": [],
        "head_ms": [],
        "tail_ms": [],
        "transfer_ms": [],
        "queue_ms": [],
    }
    overhead: list[float] = []
    fallbacks = 0
    bytes_sent = 0
    split_points = []
    requests = track(range(n), description="measuring", transient=True) if progress else range(n)
    for _ in requests:
        result = device.infer(feeds)
        t = result.timings
        for key, value in t.as_dict().items():
            stages[key].append(value)
        overhead.append(t.e2e_ms - t.head_ms - t.tail_ms)
        fallbacks += result.fallback
        bytes_sent = result.bytes_sent
        split_points.append(result.split_point)
    report: dict[str, object] = {key: summary(values) for key, values in stages.items()}
    report["overhead_ms"] = summary(overhead)
    report["bytes_sent"] = bytes_sent
    report["n"] = n
    report["fallbacks"] = fallbacks
    report["split_point"] = statistics.mode(split_points) if split_points else None
    return report


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.model)
    feeds = random_inputs(graph, args.seed)
    with ExitStack() as stack:
        if not args.server:
            from server.embedded import BackgroundServer

            server = stack.enter_context(BackgroundServer.from_files([Path(graph.source)]))
            args.server = server.address
        device = open_runner(args, graph)
        stack.callback(device.close)
        report = measure(device, feeds, args.n, args.warmup, progress=not args.json)
    client = device.client
    report.update(
        model=Path(graph.source).stem,
        server=args.server,
        transport="stream" if getattr(client, "streaming", False) else "unary",
        backend=args.backend,
        threads=args.threads,
        cpu_latency_us=args.cpu_latency_us,
        input_bytes=sum(t.nbytes for t in graph.inputs),
    )
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
        "overhead = e2e - head - tail"
    )
    return 0
