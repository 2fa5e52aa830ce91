#!/usr/bin/env python3
"""Requests per second edge-server answers for a fleet of devices, against the raw interpreter.

Starts ``edge-server`` pinned to ``--server-cores`` (with the flags given after ``--``) serving
MODEL. D devices, each a tritonclient asyncio client with one open stream, run in a process
pinned to ``--device-cores``; each sends the tail of cut K, and the next request as soon as the
previous one is answered, for ``--seconds``. Reported, from one run:

- ``server_rps``: answers per second over the timed window;
- ``raw_rps``: the same tail run in a loop by the raw interpreter, one thread per server core,
  pinned to the same cores, just before;
- ``ratio``: server_rps / raw_rps;
- ``per_cpu_ratio``: answers per server CPU-second (user + system time of the server process, from
  /proc) over the raw interpreter's runs per CPU-second: what the server makes of the CPU it uses,
  even when devices share its cores.

    python bench/fleet.py --devices 8 --server-cores 1 --device-cores 0 -- --workers 0
    python bench/fleet.py --devices 8 --server-cores 0,1 --device-cores 0,1 --json
    python bench/fleet.py --devices 8 --echo     # grpcio's floor: a server that computes nothing
    python bench/fleet.py --devices 8 --window 4 -- --workers 0   # edge devices, 4 requests in flight each
    python bench/fleet.py --devices 8 --profile /tmp/server.pstats -- --workers 0   # then
    python tools/request_profile.py /tmp/server.pstats   # where each answer's server time goes

``--profile`` runs the server under cProfile (its main thread: all of it with ``--workers 0``), which
slows it; its ratio is not a figure to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge import models  # noqa: E402
from edge.graph import ModelGraph  # noqa: E402
from edge.preprocess import random_inputs  # noqa: E402
from edge.runner import ModelRunner  # noqa: E402


def cores(text: str) -> set[int]:
    return {int(c) for c in text.split(",") if c.strip()}


def cut_tensors(model: str, k: int) -> dict[str, np.ndarray]:
    graph = ModelGraph.from_file(models.resolve(model))
    with ModelRunner(graph) as runner:
        return dict(runner.run_head(k, random_inputs(graph)).cut)


def raw_rate(model: str, k: int, on: set[int], seconds: float) -> tuple[float, float]:
    """(runs/s, runs per CPU-second) of the tail, one interpreter and thread per core in ``on``."""
    os.sched_setaffinity(0, on)
    graph = ModelGraph.from_file(models.resolve(model))
    feeds = cut_tensors(model, k)
    runners = [ModelRunner(graph) for _ in on]
    for r in runners:
        r.run_tail(k, feeds)
    counts = [0] * len(runners)
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            runners[i].run_tail(k, feeds)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(runners))]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for r in runners:
        r.close()
    return sum(counts) / wall, sum(counts) / cpu


def cpu_seconds(pid: int) -> float:
    """User and system time of ``pid`` and of its children (``edge-server --processes``'s server
    processes), as /proc says now."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def devices(address: str, model: str, k: int, count: int, warmup: float, seconds: float) -> int:
    """Answers received by ``count`` devices in the timed window, each on its own stream."""
    import tritonclient.grpc as triton
    import tritonclient.grpc.aio as aio

    feeds = cut_tensors(model, k)
    inputs = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    counted = [0]
    timing = [False]

    async def device(i: int) -> None:
        client = aio.InferenceServerClient(address)
        queue: asyncio.Queue[dict[str, object] | None] = asyncio.Queue()

        async def requests():  # type: ignore[no-untyped-def]
            while (item := await queue.get()) is not None:
                yield item

        name = models.resolve(model).stem  # the server serves it under its file stem
        request = {"model_name": name, "inputs": inputs, "parameters": {"split_point": k}}
        queue.put_nowait(request)
        try:
            async for _result, error in client.stream_infer(requests()):
                if error is not None:
                    raise SystemExit(f"device {i}: {error}")
                if timing[0]:
                    counted[0] += 1
                queue.put_nowait(request)
        finally:
            await client.close()

    tasks = [asyncio.create_task(device(i)) for i in range(count)]
    await asyncio.sleep(warmup)
    timing[0] = True
    print("start", flush=True)  # the parent samples the server's CPU time at each mark
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    timing[0] = False
    elapsed = time.perf_counter() - started
    print("end", flush=True)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"answers": counted[0], "elapsed": elapsed}), flush=True)
    return counted[0]


async def pipelined(
    address: str, model: str, k: int, count: int, window: int, warmup: float, seconds: float
) -> int:
    """:func:`devices`, each device an edge TailClient keeping ``window`` requests in flight (submit):
    requests that queue for one cut go stacked to a server that takes them."""
    from edge.transport import TailClient

    feeds = cut_tensors(model, k)
    name = models.resolve(model).stem
    params = {"split_point": k}
    counted = [0]
    timing = [False]
    stop = threading.Event()
    errors: list[BaseException] = []

    def device() -> None:
        with TailClient(address, timeout_s=30.0) as client:
            client.infer(name, feeds, parameters=params)
            places = threading.Semaphore(window)

            def done(future) -> None:  # type: ignore[no-untyped-def]
                if future.exception() is not None:
                    errors.append(future.exception())
                elif timing[0]:
                    counted[0] += 1
                places.release()

            while not stop.is_set() and not errors:
                if places.acquire(timeout=0.5):
                    client.submit(name, feeds, parameters=params).add_done_callback(done)
            for _ in range(window):
                places.acquire(timeout=30)

    threads = [threading.Thread(target=device, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    await asyncio.sleep(warmup)
    timing[0] = True
    print("start", flush=True)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    timing[0] = False
    elapsed = time.perf_counter() - started
    print("end", flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise SystemExit(f"a device failed: {errors[0]}")
    print(json.dumps({"answers": counted[0], "elapsed": elapsed}), flush=True)
    return counted[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035")
    p.add_argument("--cut", type=int, default=32)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--server-cores", type=cores, default={1})
    p.add_argument("--device-cores", type=cores, default={0})
    p.add_argument("--port", type=int, default=0, help="0: a free one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--echo",
        action="store_true",
        help="drive bench/grpc_echo.py instead: grpcio's own floor, nothing computed",
    )
    p.add_argument(
        "--window",
        type=int,
        default=0,
        metavar="W",
        help="devices are edge TailClients keeping W requests in flight each (0: tritonclient streams, "
        "one request at a time)",
    )
    p.add_argument("--devices-only", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--profile", metavar="OUT", help="run the server under cProfile, writing its stats to OUT")
    p.add_argument("server_args", nargs="*", help="edge-server flags, after --")
    args = p.parse_args()
    if args.devices_only:
        os.sched_setaffinity(0, args.device_cores)
        if args.window > 0:
            run = pipelined(
                args.devices_only, args.model, args.cut, args.devices, args.window, args.warmup, args.seconds
            )
        else:
            run = devices(args.devices_only, args.model, args.cut, args.devices, args.warmup, args.seconds)
        asyncio.run(run)
        return 0

    raw, raw_per_cpu = raw_rate(args.model, args.cut, args.server_cores, min(args.seconds, 5.0))
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    port = args.port
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp())
    path = models.resolve(args.model)
    shutil.copy(path, work / f"{path.stem}.tflite")
    pin = ",".join(str(c) for c in sorted(args.server_cores))
    command = (
        [sys.executable, str(REPO / "bench" / "grpc_echo.py"), "--port", str(port), "--model", str(path)]
        if args.echo
        else [sys.executable, *(["-m", "cProfile", "-o", args.profile] if args.profile else []),
              "-m", "server", "--models", str(work), "--host", "127.0.0.1", "--port", str(port),
              *args.server_args]
    )  # fmt: skip
    server = subprocess.Popen(
        ["taskset", "-c", pin, *command],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        import socket

        while True:
            if server.poll() is not None:
                raise SystemExit(
                    f"edge-server exited: {server.stderr.read().decode() if server.stderr else ''}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("edge-server did not start") from None
                time.sleep(0.1)
        fleet = subprocess.Popen(
            [sys.executable, __file__, "--devices-only", address, "--model", args.model, "--cut", str(args.cut),
             "--devices", str(args.devices), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
             "--window", str(args.window),
             "--device-cores", ",".join(str(c) for c in sorted(args.device_cores))],
            stdout=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        assert fleet.stdout is not None
        marks = iter(fleet.stdout.readline, b"")
        if next(marks, b"").strip() != b"start":
            raise SystemExit("the devices failed before the timed window")
        cpu0 = cpu_seconds(server.pid)
        if next(marks, b"").strip() != b"end":
            raise SystemExit("the devices failed in the timed window")
        cpu = cpu_seconds(server.pid) - cpu0
        out = fleet.stdout.read()  # through the same buffer the marks were read from
        if fleet.wait(timeout=60) != 0:
            raise SystemExit(f"the devices failed ({fleet.returncode})")
        measured = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    rps = measured["answers"] / measured["elapsed"]
    result: dict[str, object] = {
        "model": models.resolve(args.model).stem,
        "cut": args.cut,
        "devices": args.devices,
        "window": args.window,
        "server_cores": sorted(args.server_cores),
        "device_cores": sorted(args.device_cores),
        "server": "grpc_echo" if args.echo else "edge-server",
        "server_args": args.server_args,
        "server_rps": round(rps, 1),
        "raw_rps": round(raw, 1),
        "ratio": round(rps / raw, 3),
        "server_cpu_s": round(cpu, 2),
        "per_cpu_ratio": round((measured["answers"] / cpu) / raw_per_cpu, 3) if cpu > 0 else None,
    }
    if args.profile:
        result["profiled"] = args.profile
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
