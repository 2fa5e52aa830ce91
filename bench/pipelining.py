#!/usr/bin/env python3
"""Burst throughput of cooperative inference with W requests in flight, against its bound.

Starts ``edge-server`` pinned to ``--server-core`` and runs ``edge bench --json`` pinned to
``--device-core``, for each model at the cut ``edge plan`` chooses against that server, with
``--inflight`` 1, 2 and 4, and on the device alone (``--split-at N``). Rounds alternate the
settings, and each figure is the median over ``--rounds``.

The bound is 1 / max(head, transfer, tail + queue), from the W = 1 run's medians: the pace of
the slowest stage once the stages overlap. Each side's CPU per request is reported too (the
device's from ``edge bench``, the server's from /proc): with one core each, the busier side bounds
the rate at 1 / max(device CPU, server CPU), which counts what the stage times leave out (both
gRPC stacks, the device's encoding and its pipe thread).

    python bench/pipelining.py
    python bench/pipelining.py --models digits_resnet --rounds 5 -n 2000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import free_port  # noqa: E402

from edge import models  # noqa: E402
from edge.graph import ModelGraph  # noqa: E402


def edge_json(core: int, *args: str) -> dict[str, object]:
    out = subprocess.run(
        ["taskset", "-c", str(core), "edge", *args, "--json"], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def planned_cut(core: int, model: str, server: str) -> int:
    plan = edge_json(core, "plan", model, "--server", server)
    return int(plan["choice"])  # type: ignore[call-overload]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits_resnet,mobilenetv2_035")
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--device-core", type=int, default=0)
    p.add_argument("-n", type=int, default=1000, help="timed requests per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inflight", default="1,2,4")
    p.add_argument(
        "--cut",
        action="append",
        default=["digits_resnet=8", "mobilenetv2_035=10"],
        metavar="MODEL=K",
        help="the cut to measure when the planner keeps MODEL on the device (or sends it all): "
        "pipelining has nothing to overlap there",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    windows = [int(w) for w in args.inflight.split(",")]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    port = free_port()
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            shutil.copy(models.resolve(name), Path(tmp) / f"{name}.tflite")
        server = subprocess.Popen(
            ["taskset", "-c", str(args.server_core), "edge-server", "--models", tmp, "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("edge-server did not start")
                time.sleep(0.1)
            rows = [measure(name, address, windows, args, server.pid) for name in names]
        finally:
            server.terminate()
            server.wait(10)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        "| model | cut (planner's) | W | requests/s | of stage bound | device CPU ms | server CPU ms "
        "| of CPU bound | device alone |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for w, rps in row["rps"].items():
            device_cpu, server_cpu = row["device_cpu_ms"][w], row["server_cpu_ms"][w]
            cpu_bound = 1000.0 / max(device_cpu, server_cpu)
            print(
                f"| {row['model']} | {row['cut']} ({row['planned_cut']}) | {w} | {rps:,.0f} | "
                f"{rps / row['bound_rps']:.2f} ({row['slowest']}) | {device_cpu:.3f} | {server_cpu:.3f} | "
                f"{rps / cpu_bound:.2f} | {row['device_rps']:,.0f} |"
            )
    return 0


def measure(
    name: str, address: str, windows: list[int], args: argparse.Namespace, server_pid: int
) -> dict[str, object]:
    n_ops = ModelGraph.from_file(models.resolve(name)).num_operators
    planned = cut = planned_cut(args.device_core, name, address)
    if cut in (0, n_ops):
        fixed = dict(c.split("=", 1) for c in args.cut)
        if name not in fixed:
            raise SystemExit(
                f"the planner chose cut {cut} of {name}: give a cooperative one with --cut {name}=K"
            )
        cut = int(fixed[name])
    common = ["bench", "--model", name, "--server", address, "-n", str(args.n), "--warmup", "100"]
    runs: dict[str, list[dict[str, object]]] = {}
    settings = [(f"W{w}", ["--split-at", str(cut), "--inflight", str(w)]) for w in windows]
    settings.append(("device", ["--split-at", str(n_ops)]))
    for _ in range(args.rounds):
        for key, extra in settings:
            before = cpu_s(server_pid)
            run = edge_json(args.device_core, *common, *extra)
            # The warm-up's share included: an overestimate of at most warm-up / n.
            run["server_cpu_ms"] = (cpu_s(server_pid) - before) * 1000.0 / (args.n + 100)
            runs.setdefault(key, []).append(run)

    def median(key: str, field: str, stat: str | None = None) -> float:
        values = [r[field][stat] if stat else r[field] for r in runs[key]]  # type: ignore[index]
        return float(statistics.median(values))  # type: ignore[arg-type]

    first = f"W{windows[0]}"
    stages = {
        "head": median(first, "head_ms", "p50"),
        "transfer": median(first, "transfer_ms", "p50"),
        "tail + queue": median(first, "tail_ms", "p50") + median(first, "queue_ms", "p50"),
    }
    slowest = max(stages, key=stages.__getitem__)
    return {
        "model": name,
        "cut": cut,
        "planned_cut": planned,
        "stages_ms": stages,
        "slowest": slowest,
        "bound_rps": 1000.0 / stages[slowest],
        "rps": {w: median(f"W{w}", "throughput_rps") for w in windows},
        "device_cpu_ms": {w: median(f"W{w}", "device_cpu_ms") for w in windows},
        "server_cpu_ms": {w: median(f"W{w}", "server_cpu_ms") for w in windows},
        "e2e_p50_ms": {w: median(f"W{w}", "e2e_ms", "p50") for w in windows},
        "device_rps": median("device", "throughput_rps"),
        "fallbacks": sum(int(r["fallbacks"]) for k, rs in runs.items() for r in rs),  # type: ignore[call-overload]
    }


if __name__ == "__main__":
    raise SystemExit(main())
