#!/usr/bin/env python3
"""One device's split overhead on loopback against the bare grpc.aio stream floor, in the same run.

Each round:

1. starts ``edge-server`` pinned to ``--server-core`` and runs ``edge bench --split-at K -n N
   --json`` pinned to ``--device-core``: the figure is ``overhead_ms.p50``, what a request costs
   beyond the head and the tail (both gRPC stacks, the loopback, and this project's Python);
2. runs ``tools/grpc_floor.py`` with the same pinning, a payload of the cut's bytes, the client
   busy for the round's head p50 before each request and the handler for its tail p50: the
   median time a bare grpc.aio stream message takes outside the handler, with none of our code;
3. runs it again with ``--model M --cut K``: the same bare gRPC, around the real head and tail
   instead of busy-waits (what the interpreters do to the CPU's caches, paid by gRPC too).

It prints every round, the medians over the rounds and the ratios (overhead / floor, and overhead /
the compute floor).

    python bench/overhead_floor.py --rounds 5
    python bench/overhead_floor.py --model digits_resnet --cut 8 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import bench_against_server  # noqa: E402

from edge import models  # noqa: E402
from edge.graph import ModelGraph  # noqa: E402


def edge_round(model: Path, cut: int, n: int, server_core: int, device_core: int) -> dict[str, float]:
    """One edge-server (its defaults) and one ``edge bench``, each pinned; the p50s it reports, in ms."""
    out = bench_against_server(
        model, cut, n,
        server_prefix=["taskset", "-c", str(server_core), sys.executable],
        device_prefix=["taskset", "-c", str(device_core), sys.executable],
        cwd=REPO,
    )  # fmt: skip
    report = json.loads(out)
    if report.get("fallbacks"):
        raise SystemExit(
            f"{report['fallbacks']} requests fell back to the device: {report.get('fallback_reason')}"
        )
    return {
        key: float(value["p50"])
        for key, value in report.items()
        if isinstance(value, dict) and "p50" in value
    }


def floor_round(
    nbytes: int,
    head_ms: float,
    tail_ms: float,
    n: int,
    server_core: int,
    device_core: int,
    compute: tuple[Path, int] | None = None,
) -> float:
    """The bare floor: busy-waits of the head's and tail's p50, or (``compute``) the real halves."""
    work = (
        ["--model", str(compute[0]), "--cut", str(compute[1])]
        if compute
        else ["--gap-us", str(round(head_ms * 1000)), "--handler-us", str(round(tail_ms * 1000))]
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "grpc_floor.py"), "--modes", "stream", "-n", str(n),
         "--bytes", str(nbytes), *work,
         "--server-core", str(server_core), "--client-core", str(device_core), "--json"],
        check=True, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    return float(json.loads(out.stdout)["median_ms"]["stream"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035", help="a shipped model's name, or a .tflite path")
    p.add_argument("--cut", type=int, default=32)
    p.add_argument("-n", type=int, default=1000, help="requests per measurement (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--device-core", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    model = models.resolve(args.model)
    nbytes = sum(t.nbytes for t in ModelGraph.from_file(model).cut(args.cut).tensors)
    overheads, floors, computes = [], [], []
    for i in range(args.rounds):
        edge = edge_round(model, args.cut, args.n, args.server_core, args.device_core)
        cores = (args.n, args.server_core, args.device_core)
        floor = floor_round(nbytes, edge["head_ms"], edge["tail_ms"], *cores)
        compute = floor_round(nbytes, edge["head_ms"], edge["tail_ms"], *cores, compute=(model, args.cut))
        overheads.append(edge["overhead_ms"])
        floors.append(floor)
        computes.append(compute)
        print(
            f"round {i + 1}: overhead {edge['overhead_ms']:.3f} ms (head {edge['head_ms']:.3f}, tail "
            f"{edge['tail_ms']:.3f}), floor {floor:.3f} ms, compute floor {compute:.3f} ms",
            file=sys.stderr,
            flush=True,
        )
    overhead, floor = statistics.median(overheads), statistics.median(floors)
    compute = statistics.median(computes)
    result = {
        "model": model.stem,
        "cut": args.cut,
        "bytes": nbytes,
        "rounds": args.rounds,
        "overhead_ms": overheads,
        "floor_ms": floors,
        "overhead_median_ms": overhead,
        "floor_median_ms": floor,
        "ratio": round(overhead / floor, 3),
        "compute_floor_ms": computes,
        "compute_floor_median_ms": compute,
        "ratio_to_compute_floor": round(overhead / compute, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"overhead median {overhead:.3f} ms, floor median {floor:.3f} ms, ratio {overhead / floor:.3f}; "
            f"compute floor median {compute:.3f} ms, ratio {overhead / compute:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
