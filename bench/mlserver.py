#!/usr/bin/env python3
"""One tail, one client, the same cores: edge-server against MLServer with our runtime and with a stock one.

The tail of ``--model`` at ``--cut``, served in turn by:
- ``edge-server``, unary calls and the stream, with and without stacked requests;
- MLServer 1.7.1 with ``server.mlserver.EdgeRuntime`` (``edge export mlserver``), at
  ``parallel_workers`` 1 (on the server core) and 2 (on both cores);
- MLServer with ``bench/mlserver_stock.py``, the runtime a user would write with MLServer's
  ``NumpyCodec``, serving the tail file ``edge split`` writes.

The client is edge's own (``TailClient``, which packs tensors for our runtime and sends them plain to
the others), pinned to ``--client-core``, keeping ``--inflight`` requests in flight for
``--seconds`` after a warm-up. Rounds alternate the servers; the figures are medians over rounds.

    python bench/mlserver.py                       # mobilenetv2_035 at cut 10 (25 KB)
    python bench/mlserver.py --cut 4 --rounds 3    # 602 KB: where per-element conversion shows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import free_port  # noqa: E402

from edge import models, wire  # noqa: E402
from edge.graph import ModelGraph  # noqa: E402
from edge.partition import split_model, write_split  # noqa: E402
from edge.preprocess import random_inputs  # noqa: E402
from edge.runner import ModelRunner  # noqa: E402
from edge.transport import TailClient  # noqa: E402
from edge.transport.base import RemoteResult  # noqa: E402
from server.export import write_mlserver  # noqa: E402

MLSERVER = Path(os.environ.get("EDGE_MLSERVER", REPO / ".venv-mlserver" / "bin" / "mlserver"))


def wait_ready(address: str, proc: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    with TailClient(address, timeout_s=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            if client.ready(1.0):
                return
            time.sleep(0.2)
    raise SystemExit(f"server at {address} not ready in {timeout_s}s")


def load(
    address: str,
    model: str,
    cut: int,
    feeds: dict[str, np.ndarray],
    sha: str,
    args: argparse.Namespace,
    streaming: bool,
) -> dict[str, float]:
    """Requests/s and call latency (p50, p99 ms) with ``inflight`` in flight for ``seconds``."""
    params = {wire.SPLIT_POINT: cut, wire.MODEL_SHA256: sha}
    with TailClient(address, timeout_s=30.0, streaming=streaming) as client:
        for _ in range(20):
            client.infer(model, feeds, parameters=params)
        latencies: list[float] = []
        pending: list[tuple[float, Future[RemoteResult]]] = []
        done = 0
        started = time.perf_counter()
        end = started + args.seconds
        while time.perf_counter() < end or pending:
            while len(pending) < args.inflight and time.perf_counter() < end:
                pending.append((time.perf_counter(), client.submit(model, feeds, parameters=params)))
            sent_at, future = pending.pop(0)
            future.result(60)
            latencies.append((time.perf_counter() - sent_at) * 1000.0)
            done += 1
        elapsed = time.perf_counter() - started
    return {
        "rps": done / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035")
    p.add_argument("--cut", type=int, default=10)
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--inflight", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    os.sched_setaffinity(0, {args.client_core})
    graph = ModelGraph.from_file(models.resolve(args.model))
    name = Path(graph.source).stem
    with ModelRunner(graph) as runner:
        feeds = dict(runner.run_head(args.cut, random_inputs(graph)).cut)
    both = f"{args.server_core},{args.client_core}"
    work = Path(tempfile.mkdtemp(prefix="edge-mlserver-bench-"))
    (work / "edge").mkdir()
    shutil.copy(graph.source, work / "edge" / f"{name}.tflite")
    for workers in (0, 1, 2):
        write_mlserver(graph, work / f"ours-{workers}", cuts=[args.cut], parallel_workers=workers)
    stock = work / "stock" / name
    stock.mkdir(parents=True)
    write_split(split_model(graph, args.cut), stock)
    shutil.copy(REPO / "bench" / "mlserver_stock.py", stock / "mlserver_stock.py")
    (stock / "model-settings.json").write_text(
        json.dumps(
            {
                "name": name,
                "implementation": "mlserver_stock.StockTail",
                "parameters": {"uri": "./tail.tflite"},
            }
        )
    )
    (work / "stock" / "settings.json").write_text(json.dumps({"debug": False, "parallel_workers": 1}))

    def mlserver(folder: Path, cores: str) -> tuple[list[str], Path]:
        settings = json.loads((folder / "settings.json").read_text())
        port = free_port()
        settings.update(grpc_port=port, http_port=free_port(), metrics_port=free_port())
        (folder / "settings.json").write_text(json.dumps(settings))
        return ["taskset", "-c", cores, str(MLSERVER), "start", str(folder)], Path(f"127.0.0.1:{port}")

    setups: dict[str, tuple[str, int | str, bool, tuple[str, ...]]] = {
        "edge-server, unary": ("edge", args.server_core, False, ()),
        "edge-server, stream, one message a request (--max-stack 1)": (
            "edge", args.server_core, True, ("--max-stack", "1")
        ),
        "edge-server, stream (stacks what queues)": ("edge", args.server_core, True, ()),
        "MLServer + EdgeRuntime, in-process (parallel_workers 0)": ("ours-0", args.server_core, False, ()),
        "MLServer + EdgeRuntime, 1 worker": ("ours-1", args.server_core, False, ()),
        "MLServer + EdgeRuntime, 2 workers (both cores)": ("ours-2", both, False, ()),
        "MLServer + stock NumpyCodec runtime, 1 worker": ("stock", args.server_core, False, ()),
    }  # fmt: skip
    figures: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for label, (folder, cores, streaming, flags) in setups.items():
            if folder == "edge":
                port = free_port()
                command = [
                    "taskset",
                    "-c",
                    str(cores),
                    "edge-server",
                    "--models",
                    str(work / "edge"),
                    "--port",
                    str(port),
                    *flags,
                ]
                address = f"127.0.0.1:{port}"
            else:
                command, target = mlserver(work / folder, str(cores))
                address = str(target)
            log = (work / f"{folder}.log").open("wb")
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_ready(address, proc)
                time.sleep(1.0 if folder == "edge" else 3.0)  # MLServer loads its models after it is ready
                figures.setdefault(label, []).append(
                    load(address, name, args.cut, feeds, graph.sha256, args, streaming)
                )
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(30)
                log.close()
    rows = {
        label: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for label, runs in figures.items()
    }
    if args.json:
        print(
            json.dumps(
                {"model": name, "cut": args.cut, "bytes": graph.cut(args.cut).nbytes, "rows": rows}, indent=2
            )
        )
        return 0
    unary = rows["edge-server, unary"]["rps"]
    print(
        f"{name} cut {args.cut} ({graph.cut(args.cut).nbytes:,} bytes), {args.inflight} in flight, "
        f"median of {args.rounds} rounds of {args.seconds:g} s"
    )
    print("| server | requests/s | of edge-server unary | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for label, row in rows.items():
        print(
            f"| {label} | {row['rps']:,.0f} | {row['rps'] / unary:.2f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
