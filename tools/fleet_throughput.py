#!/usr/bin/env python3
"""Requests per second an edge-server answers for several devices at once, against the raw interpreter.

Starts ``edge-server`` (with the flags given after ``--``) serving MODEL, then D device threads,
each with its own stream, send the tail of cut K as fast as the server answers, for S seconds.
Prints the server's rate beside the rate of the tail's raw interpreter run in a loop on one
thread, on this machine.

    python tools/fleet_throughput.py --devices 4 -- --workers 0
    python tools/fleet_throughput.py --devices 4 -- --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge import models
from edge.graph import ModelGraph
from edge.preprocess import random_inputs
from edge.runner import ModelRunner
from edge.transport import TailClient


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035")
    p.add_argument("--cut", type=int, default=32)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--port", type=int, default=50341)
    p.add_argument("server_args", nargs="*")
    args = p.parse_args()
    path = models.resolve(args.model)
    graph = ModelGraph.from_file(path)
    with ModelRunner(graph) as runner:
        cut = runner.run_head(args.cut, random_inputs(graph)).cut
        runner.run_tail(args.cut, cut)
        started, n = time.perf_counter(), 0
        while time.perf_counter() - started < 2.0:
            runner.run_tail(args.cut, cut)
            n += 1
        raw = n / (time.perf_counter() - started)
    work = Path(tempfile.mkdtemp())
    shutil.copy(path, work / path.name)
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "--models", str(work), "--host", "127.0.0.1", "--port", str(args.port),
         *args.server_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{args.port}"
        with TailClient(address, timeout_s=30.0) as probe:
            probe.wait_ready(30.0)
        counts = [0] * args.devices
        stop = threading.Event()
        params = {"split_point": args.cut, "model_sha256": graph.sha256}

        def device(i: int) -> None:
            with TailClient(address, timeout_s=30.0) as client:
                client.infer(path.stem, cut, parameters=params)
                while not stop.is_set():
                    client.infer(path.stem, cut, parameters=params)
                    counts[i] += 1

        threads = [threading.Thread(target=device, args=(i,)) for i in range(args.devices)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        before, t0 = sum(counts), time.perf_counter()
        time.sleep(args.seconds)
        rate = (sum(counts) - before) / (time.perf_counter() - t0)
        stop.set()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work)
    print(
        f"{args.model} cut {args.cut}, {args.devices} devices, server {' '.join(args.server_args) or '(defaults)'}: "
        f"{rate:.0f} requests/s; raw interpreter, one thread: {raw:.0f}/s; ratio {rate / raw:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
