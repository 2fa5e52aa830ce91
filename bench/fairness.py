#!/usr/bin/env python3
"""A well-behaved device's latency on an idle server, and beside a device flooding at 10x its share.

Starts ``edge-server`` pinned to ``--server-cores`` with a token per device, serving MODEL. The
calm device sends ``-n`` requests one after another (cut K), first alone, then while the flooding
device keeps ``--flood`` requests in flight (one stream per thread, in another process), and the
medians and p99 of its round trips are compared, in one run, with the server's queue time of its
requests (``queue_us``: what it waited there for a compute turn; the rest of a round trip is both
devices' and the server's gRPC and Python, on shared cores). With two devices, one request in
flight each is a device's share; ``--flood 10`` is ten times that.

    python bench/fairness.py --model mobilenetv2_035 --cut 0 --flood 10
    python bench/fairness.py --flood 10 -- --max-inflight-per-device 64   # a looser bound
    python bench/fairness.py --cut 32 --flood 10 --pipelined   # the flood on one pipe: it goes stacked
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import free_port, wait_listening  # noqa: E402

from edge import models  # noqa: E402
from edge.graph import ModelGraph  # noqa: E402
from edge.preprocess import random_inputs  # noqa: E402
from edge.runner import ModelRunner  # noqa: E402
from edge.transport import TailClient  # noqa: E402

TOKENS = {"calm": "calm-device-token-0123456789", "flood": "flood-device-token-0123456789"}


def cut_tensors(model: str, k: int) -> dict:
    graph = ModelGraph.from_file(models.resolve(model))
    with ModelRunner(graph) as runner:
        return dict(runner.run_head(k, random_inputs(graph)).cut) if k else random_inputs(graph)


def flood(address: str, model: str, k: int, threads: int, seconds: float, pipelined: bool = False) -> None:
    feeds = cut_tensors(model, k)
    name = models.resolve(model).stem
    stop = time.monotonic() + seconds
    refused = [0]
    if pipelined:
        flood_pipelined(address, name, feeds, k, threads, stop, refused)
        print(json.dumps({"refused": refused[0]}), flush=True)
        return

    def one() -> None:
        with TailClient(address, timeout_s=30.0, token=TOKENS["flood"]) as client:
            while time.monotonic() < stop:
                try:
                    client.infer(name, feeds, parameters={"split_point": k} if k else None)
                except Exception:
                    refused[0] += 1

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    print(json.dumps({"refused": refused[0]}), flush=True)


def flood_pipelined(
    address: str, name: str, feeds: dict, k: int, window: int, stop: float, refused: list[int]
) -> None:
    """One client keeping ``window`` requests in flight on its pipe: what queues goes stacked."""
    places = threading.Semaphore(window)

    def done(future) -> None:  # type: ignore[no-untyped-def]
        if future.exception() is not None:
            refused[0] += 1
        places.release()

    with TailClient(address, timeout_s=30.0, token=TOKENS["flood"]) as client:
        while time.monotonic() < stop:
            if places.acquire(timeout=0.5):
                client.submit(name, feeds, parameters={"split_point": k} if k else None).add_done_callback(
                    done
                )
        for _ in range(window):
            places.acquire(timeout=30)


def calm(address: str, model: str, k: int, n: int) -> tuple[list[float], list[float]]:
    """The calm device's round trips, and the server's queue time of each (``queue_us``), in ms."""
    feeds = cut_tensors(model, k)
    name = models.resolve(model).stem
    times, queued = [], []
    with TailClient(address, timeout_s=30.0, token=TOKENS["calm"]) as client:
        for _ in range(20):
            client.infer(name, feeds, parameters={"split_point": k} if k else None)
        for _ in range(n):
            started = time.perf_counter()
            result = client.infer(name, feeds, parameters={"split_point": k} if k else None)
            times.append((time.perf_counter() - started) * 1000)
            queued.append(result.queue_ms)
            time.sleep(0.002)
    return times, queued


def summary(times: list[float], queued: list[float]) -> dict[str, float]:
    """Round trip and server queue time, p50 and p99."""

    def p99(values: list[float]) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)

    return {
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": p99(times),
        "queue_p50_ms": round(statistics.median(queued), 3),
        "queue_p99_ms": p99(queued),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035")
    p.add_argument("--cut", type=int, default=0)
    p.add_argument("--flood", type=int, default=10, help="requests the flooding device keeps in flight")
    p.add_argument("-n", type=int, default=500, help="the calm device's timed requests, each phase")
    p.add_argument("--server-cores", default="1")
    p.add_argument("--device-cores", default="0")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--pipelined",
        action="store_true",
        help="the flooding device is one client keeping --flood requests in flight on its pipe (they go "
        "stacked to a server that takes stacks), not one thread per request",
    )
    p.add_argument("--flood-only", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("server_args", nargs="*", help="edge-server flags, after --")
    args = p.parse_args()
    os.sched_setaffinity(0, {int(c) for c in args.device_cores.split(",")})
    if args.flood_only:
        flood(args.flood_only, args.model, args.cut, args.flood, args.seconds, args.pipelined)
        return 0
    work = Path(tempfile.mkdtemp())
    path = models.resolve(args.model)
    shutil.copy(path, work / f"{path.stem}.tflite")
    (work / "tokens").write_text("".join(f"{d} {t}\n" for d, t in TOKENS.items()))
    port = free_port()
    server = subprocess.Popen(
        ["taskset", "-c", args.server_cores, sys.executable, "-m", "server", "--models", str(work), "--host",
         "127.0.0.1", "--port", str(port), "--auth-tokens", str(work / "tokens"), *args.server_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        wait_listening(port, server)
        idle = calm(address, args.model, args.cut, args.n)
        flooding = subprocess.Popen(
            [sys.executable, __file__, "--flood-only", address, "--model", args.model, "--cut", str(args.cut),
             "--flood", str(args.flood), "--seconds", "3600", "--device-cores", args.device_cores,
             *(["--pipelined"] if args.pipelined else [])],
            stdout=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        time.sleep(2.0)
        loaded = calm(address, args.model, args.cut, args.n)
        flooding.kill()
        flooding.wait()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": path.stem,
        "cut": args.cut,
        "flood_inflight": args.flood,
        "server_args": args.server_args,
        "idle": summary(*idle),
        "flooded": summary(*loaded),
    }
    result["p99_ratio"] = round(result["flooded"]["p99_ms"] / result["idle"]["p99_ms"], 2)
    result["p50_ratio"] = round(result["flooded"]["p50_ms"] / result["idle"]["p50_ms"], 2)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
