"""The device side of one sweep scenario; ``edge bench sweep`` runs it inside the device namespace.

1. Plan as a device would: ``--split-at auto`` (its own head profile, the server's tail
   profile, link probes), then ``--adapt`` requests through :class:`CooperativeRunner` so
   the policy learns from live traffic. Its cut at the end is the choice.
2. Measure end-to-end latency at every cut with a fixed split. The planner sees none of this.
   Every request, in both phases, follows ``--gap-ms`` of idle time, as frames from a camera
   would; back-to-back requests would keep caches warm and flatter the device.
   Each cut gets ``--pilots`` requests first; a cut whose fastest pilot is slower than
   ``--prune`` times the best median so far keeps just those samples. K = 0, K = N and the
   choice always get the full ``--requests``.

Prints JSON lines on stdout: ``{"event": "progress", ...}`` while it works, then one
``{"event": "result", "result": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..autosplit import AutoSplit
from ..codec import add_max_loss_arg, bound_codec, codec_arg
from ..cooperative import CooperativeRunner, FixedSplit, InferenceResult
from ..graph import ModelGraph
from ..policy import make_policy
from ..preprocess import random_tensors
from ..runner import ModelRunner
from ..transport import TailClient
from .dilation import DilatedRunner

__all__ = ["main", "measure_cut"]

logger = logging.getLogger(__name__)


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _infer(device: CooperativeRunner, feeds: dict, gap_s: float) -> InferenceResult:
    time.sleep(gap_s)  # frames arrive at a rate, not back to back
    return device.infer(feeds)


def measure_cut(
    device: CooperativeRunner,
    feeds: dict,
    *,
    pilots: int,
    requests: int,
    prune_above_ms: float | None,
    gap_s: float = 0.0,
) -> dict[str, object]:
    """Run requests at the device's fixed cut; stop after the pilots if they are all slower than ``prune_above_ms``."""
    results = [_infer(device, feeds, gap_s) for _ in range(pilots)]
    pruned = prune_above_ms is not None and min(r.timings.e2e_ms for r in results) > prune_above_ms
    if not pruned:
        results += [_infer(device, feeds, gap_s) for _ in range(requests - pilots)]

    def median(key: str) -> float:
        return round(statistics.median(getattr(r.timings, key) for r in results), 4)

    return {
        "samples_ms": [round(r.timings.e2e_ms, 4) for r in results],
        "median_ms": median("e2e_ms"),
        "head_ms": median("head_ms"),
        "transfer_ms": median("transfer_ms"),
        "queue_ms": median("queue_ms"),
        "tail_ms": median("tail_ms"),
        "bytes_sent": results[-1].bytes_sent,
        "fallbacks": sum(r.fallback for r in results),
        "pruned": pruned,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    graph = ModelGraph.from_file(args.model)
    name = args.model_name or Path(graph.source).stem
    n = graph.num_operators
    cache_size = 2 * (n + 1) + 4  # every head and every local tail stays built
    runner: ModelRunner
    if args.slowdown > 1.0:
        runner = DilatedRunner(graph, factor=args.slowdown, threads=args.threads, cache_size=cache_size)
        label = runner.profile_label
    else:
        runner = ModelRunner(graph, threads=args.threads, cache_size=cache_size)
        label = ""
    client = TailClient(args.server, timeout_s=args.timeout, codec=args.codec)
    client.wait_ready(timeout_s=30.0)
    feeds = random_tensors(graph.inputs, seed=args.seed)
    gap_s = args.gap_ms / 1000.0

    _emit("progress", stage="plan", done=0, total=1)
    started = time.perf_counter()
    policy = make_policy(
        graph, "auto", runner=runner, client=client, model_name=name, progress=False, profile_label=label
    )
    assert isinstance(policy, AutoSplit)
    connect_s = time.perf_counter() - started
    first_choice = policy.hysteresis.current
    device = CooperativeRunner(runner, client, model_name=name, policy=policy, timeout_s=args.timeout)
    trajectory = []
    for i in range(args.adapt):
        trajectory.append(_infer(device, feeds, gap_s).split_point)
        _emit("progress", stage="adapt", done=i + 1, total=args.adapt)
    plan = policy.last_plan
    assert plan is not None
    choice = policy.hysteresis.current if policy.hysteresis.current is not None else n
    estimate = policy.estimator.estimate()

    subset = sorted(set(args.cuts) | {0, n, choice}) if args.cuts else list(range(n + 1))
    always = {0, n, choice}
    # Cheap, planner-agnostic order: device-only first, then the fewest bytes first.
    order = [n, *sorted((k for k in subset if k != n), key=lambda k: (graph.cut(k).nbytes, -k))]
    measured: dict[int, dict[str, object]] = {}
    best = math.inf
    for i, k in enumerate(order):
        if k < n:
            runner.run_head(k, feeds)  # build the head now: building is not what is measured
        # Each cut as the plan sends it: through the codec, or raw where the codec does not pay there.
        as_planned = FixedSplit(k, coded=policy.coded(k))
        fixed = CooperativeRunner(runner, client, model_name=name, policy=as_planned, timeout_s=args.timeout)
        prune = None if k in always or not math.isfinite(best) else best * args.prune
        row = measure_cut(
            fixed, feeds, pilots=args.pilots, requests=args.requests, prune_above_ms=prune, gap_s=gap_s
        )
        measured[k] = {**row, "coded": policy.coded(k)}
        if not row["pruned"]:
            best = min(best, float(row["median_ms"]))  # type: ignore[arg-type]
        _emit("progress", stage="measure", done=i + 1, total=len(order), cut=k)

    costs = policy.costs()
    return {
        "model": name,
        "model_sha256": graph.sha256,
        "num_operators": n,
        "slowdown": args.slowdown,
        "device_emulation": f"time dilation x{args.slowdown:g}" if args.slowdown > 1.0 else "none",
        "threads": args.threads,
        "codec": str(args.codec),
        "connect_s": round(connect_s, 3),
        "first_choice": first_choice,
        "trajectory": trajectory,
        "choice": choice,
        "choice_coded": policy.coded(choice),
        "plan_note": plan.note,
        "link": estimate.as_dict(),
        "probe_rtt_ms": [round(x, 4) for x in policy.estimator.probe_rtts],
        "explored": list(policy.explored),
        "predicted": [p.as_dict() for p in plan.predictions],
        "profile": {
            "head_ms": [round(c.head_ms, 4) for c in costs],
            "tail_ms": [round(c.tail_ms, 4) for c in costs],
        },
        "cuts": [{"index": k, **measured[k]} for k in sorted(measured)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.emulation.device", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the .tflite file")
    p.add_argument("--model-name", help="its name on the server (default: the file's stem)")
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--slowdown", type=float, default=1.0, help="time-dilation factor of the device's compute")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--adapt", type=int, default=60, help="requests under --split-at auto before measuring")
    p.add_argument(
        "--gap-ms", type=float, default=10.0, help="idle time before each request, as between frames"
    )
    p.add_argument("--requests", type=int, default=10, help="requests per measured cut")
    p.add_argument("--pilots", type=int, default=2, help="requests per cut before deciding to prune it")
    p.add_argument(
        "--prune", type=float, default=1.5, help="prune a cut whose pilots exceed this x best median"
    )
    p.add_argument(
        "--cuts", type=int, nargs="*", default=[], help="measure only these cuts (plus 0, N, choice)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--codec", type=codec_arg, default="raw", help="codec of the tensors sent: a name, or a CODEC.json"
    )
    add_max_loss_arg(p)
    args = p.parse_args(argv)
    bound_codec(args)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    _emit("result", result=run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
