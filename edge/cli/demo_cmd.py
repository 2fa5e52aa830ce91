"""``edge demo``: the whole story on the shipped digits model, with the server in-process."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from rich.progress import track
from rich.table import Table

from .. import models
from ..argtypes import positive_int
from ..cascade import Calibration, open_router
from ..console import output_console
from ..cooperative import CooperativeRunner
from ..errors import EdgeError
from ..graph import ModelGraph
from ..measure import candidate_cuts
from ..policy import make_policy
from ..preprocess import random_inputs
from ..runner import ModelRunner
from ..stats import summary
from ..transport import TailClient
from .common import load_graph

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the held-out digits through split inference against an in-process server",
        description="Start edge-server in-process on loopback, run the shipped held-out digits through the "
        "model split at a cut that sends at most half the raw input (or --split-at), and report accuracy, "
        "per-stage latency, bytes sent and fallbacks.",
    )
    p.add_argument(
        "--model", default=models.DEFAULT_MODEL, help="shipped model or .tflite (default: %(default)s)"
    )
    p.add_argument(
        "--split-at",
        default=None,
        metavar="K|TENSOR",
        help="the cut (default: the first that sends at most half the raw input)",
    )
    p.add_argument("-n", type=positive_int, default=None, help="how many samples (default: all)")
    p.add_argument(
        "--cascade",
        type=Path,
        metavar="CAL.json",
        help="answer on the device what the calibration's small model (or early exit) is sure of; its big model "
        "and cut replace --model and --split-at",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def showcase_cut(graph: ModelGraph) -> tuple[int, str]:
    """The cut the demo shows by default, and why: the first inner cut that sends at most half the
    raw input, so offloading saves bytes while the device runs as little of the model as it can."""
    n = graph.num_operators
    half = sum(t.nbytes for t in graph.inputs) / 2
    for k in candidate_cuts(graph):
        if 0 < k < n and graph.cut(k).nbytes <= half:
            return k, "the first cut that sends at most half the raw input"
    return n // 2, "no cut of this model sends less than half its input; the middle one"


def _samples(graph: ModelGraph, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The held-out digits as the model takes them (int8, or the float originals for a float model)
    with their labels; seeded random inputs and no labels for a model that takes something else."""
    tensor = graph.inputs[0]
    sample = models.digits_sample()
    if len(graph.inputs) == 1 and tensor.shape == (1, *sample.x.shape[1:]):
        if tensor.dtype == sample.x.dtype:
            return sample.x[:n], sample.y[:n]
        if tensor.dtype == np.float32:
            return sample.x_float[:n].astype(np.float32), sample.y[:n]
    if len(graph.inputs) != 1:
        raise EdgeError(f"edge demo feeds one input; {graph.source} has {len(graph.inputs)}")
    return np.concatenate([random_inputs(graph, seed)[tensor.name] for seed in range(n)]), None


def run(args: argparse.Namespace) -> int:
    from server.embedded import BackgroundServer

    calibration = Calibration.load(args.cascade) if args.cascade else None
    graph = calibration.big.load("big") if calibration is not None else load_graph(args.model)
    default_cut, why = showcase_cut(graph)
    if calibration is not None:
        default_cut, why = calibration.split_point, "the calibration's cut"
    name = graph.inputs[0].name
    x, y = _samples(graph, args.n)
    console = output_console(stderr=args.json)
    with BackgroundServer.from_files([Path(graph.source)]) as server, ModelRunner(graph) as local:
        client = TailClient(server.address, timeout_s=2.0)
        device = CooperativeRunner(
            ModelRunner(graph),
            client,
            model_name=Path(graph.source).stem,
            policy=make_policy(graph, args.split_at if args.split_at is not None else default_cut),
        )
        router = (
            open_router(calibration, device, backend=device.runner.backend, threads=device.runner.threads)
            if calibration is not None
            else None
        )
        small = (
            ModelRunner(calibration.small.load("small"))
            if calibration is not None and calibration.small is not None
            else None
        )
        console.print(
            f"edge-server on {server.address}; model {Path(graph.source).name}, {graph.num_operators} ops"
        )
        correct = identical = fallbacks = 0
        answered_by: Counter[str] = Counter()
        stages: dict[str, list[float]] = {"head_ms": [], "transfer_ms": [], "tail_ms": [], "e2e_ms": []}
        bytes_sent: list[int] = []
        split: int | None = default_cut if args.split_at is None else None
        for i in track(range(len(x)), description="split inference", console=console, transient=True):
            feeds = {name: x[i : i + 1]}
            if router is not None:
                routed = router.infer(feeds, request_id=str(i))
                result, outputs, answer = routed.inference, routed.outputs, routed.output_info[0].name
                answered_by[routed.answered_by] += 1
                reference = (
                    small.run({small.graph.inputs[0].name: feeds[name]})
                    if small is not None and routed.answered_by == "device-small"
                    else {k: v for k, v in local.run(feeds).items() if k in outputs}
                )
            else:
                result = device.infer(feeds, request_id=str(i))
                outputs, reference = result.outputs, local.run(feeds)
                answer = next(iter(outputs))
            correct += y is not None and int(np.argmax(outputs[answer])) == int(y[i])
            identical += set(outputs) == set(reference) and all(
                np.array_equal(outputs[k], v) for k, v in reference.items()
            )
            fallbacks += result.fallback
            if router is None or routed.escalated:  # a local answer says nothing of the cut
                split = result.split_point
            t = result.timings
            stages["head_ms"].append(t.head_ms)
            stages["transfer_ms"].append(t.transfer_ms + t.queue_ms)
            stages["tail_ms"].append(t.tail_ms)
            stages["e2e_ms"].append(t.e2e_ms)
            bytes_sent.append(result.bytes_sent)
        if router is not None:
            router.close()
        else:
            device.close()
        if small is not None:
            small.close()
    n = len(x)
    input_bytes = sum(t.nbytes for t in graph.inputs)
    latency = {k: summary(v) for k, v in stages.items()}
    sent = int(np.median(bytes_sent)) if bytes_sent else 0
    report: dict[str, object] = {
        "model": Path(graph.source).stem,
        "split_point": split,
        "num_operators": graph.num_operators,
        "samples": n,
        "accuracy": correct / n if n and y is not None else None,
        "identical_to_whole_model": identical,
        "fallbacks": fallbacks,
        "bytes_sent_per_request": sent,
        "input_bytes": input_bytes,
        "latency_ms": latency,
    }
    if calibration is not None:
        report["answered_by"] = dict(answered_by)
        report["local_share"] = (n - answered_by["server"] - answered_by["device-big"]) / n if n else 0.0
        report["mean_bytes_per_request"] = float(np.mean(bytes_sent)) if bytes_sent else 0.0
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cut = graph.cut(split if split is not None else 0)
    reason = (
        f" ({why}; --split-at picks another, edge inspect lists them all)" if args.split_at is None else ""
    )
    console.print(
        f"cut {split} of {graph.num_operators} sends {len(cut.tensors)} tensor(s), {cut.nbytes:,} bytes{reason}:"
    )
    for tensor in cut.tensors:
        console.print(f"  {tensor.name}  {tensor.dtype.name}{list(tensor.shape)}", soft_wrap=True)
    if y is not None:
        console.print(f"accuracy {correct}/{n} = {correct / max(n, 1):.1%}")
    else:
        console.print(f"{n} seeded random inputs (the model does not take the held-out digits: no accuracy)")
    if calibration is not None:
        stages_text = ", ".join(f"{stage} {count}" for stage, count in sorted(answered_by.items()))
        console.print(f"answered on the device: {report['local_share']:.1%} ({stages_text})")
        console.print(f"outputs identical to the answering model's: {identical}/{n}")
    else:
        console.print(f"outputs identical to the whole model's: {identical}/{n}")
    table = Table(title="latency per request (ms)")
    for column in ("stage", "p50", "p90", "p99"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    labels = {
        "head_ms": "head (device)",
        "transfer_ms": "transfer + queue",
        "tail_ms": "tail (server)",
        "e2e_ms": "end to end",
    }
    for key, label in labels.items():
        s = latency[key]
        table.add_row(label, f"{s['p50']:.3f}", f"{s['p90']:.3f}", f"{s['p99']:.3f}")
    console.print(table)
    if calibration is not None:
        # Most requests send nothing, so the median would say 0: the mean is the figure.
        mean = float(report["mean_bytes_per_request"])  # type: ignore[arg-type]
        console.print(
            f"bytes sent per request, on average: {mean:,.0f} (raw input {input_bytes:,}, {mean / input_bytes:.2f}x)"
        )
    else:
        console.print(
            f"bytes sent per request: {sent:,} (raw input {input_bytes:,}, {sent / input_bytes:.2f}x)"
        )
    console.print(f"fallbacks: {fallbacks}")
    return 0
