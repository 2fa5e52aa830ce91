#!/usr/bin/env python3
"""Where one device's request spends its time, step by step, on both sides, in microseconds.

Starts ``edge-server`` pinned to ``--server-core`` and runs ``edge bench --split-at K -n N`` pinned
to ``--device-core``, each with a few of its functions wrapped to note the time as a request passes
(``time.perf_counter_ns``: CLOCK_MONOTONIC on Linux, one clock for both processes). A wrapper costs
about a microsecond, and nothing else is changed. Each step's figure is its median over the requests:

    device  head done -> request built -> admitted to the session -> written to gRPC
    gRPC    written -> the server's handler has it            (both gRPC stacks and the loopback)
    server  handler -> tail starts -> tail done -> answer built
    gRPC    answer built -> the device reads it
    device  read -> settled -> returned to the caller

    python tools/request_timeline.py
    python tools/request_timeline.py --model digits_resnet --cut 8 --json

``tools/grpc_floor.py`` gives what the two gRPC steps cost with none of this project's code.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

STEPS = (
    ("device: head done -> request built", "head", "built"),
    ("device: request built -> admitted", "built", "admitted"),
    ("device: admitted -> written to gRPC", "admitted", "written"),
    ("gRPC: device writes -> server handler has it", "written", "received"),
    ("server: handler -> tail starts", "received", "tail"),
    ("server: the tail (interpreter, tensors in and out)", "tail", "tail_done"),
    ("server: tail done -> answer built", "tail_done", "answered"),
    ("gRPC: answer built -> device reads it", "answered", "read"),
    ("device: read -> settled", "read", "settled"),
    ("device: settled -> returned to the caller", "settled", "returned"),
)


def _noting(marks: dict[str, list[int]], out: str) -> Any:
    """A decorator factory noting the time before (``at="call"``) or after (``"return"``) a call."""
    now = time.perf_counter_ns
    atexit.register(lambda: Path(out).write_text(json.dumps(marks)))

    def note(owner: Any, name: str, mark: str, at: str = "return", coroutine: bool = False) -> None:
        marks[mark] = []
        original = getattr(owner, name)
        stamps = marks[mark]
        if coroutine:

            async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
                stamps.append(now())
                return await original(*args, **kwargs)

            setattr(owner, name, wrapped_async)
        elif at == "call":

            def wrapped_call(*args: Any, **kwargs: Any) -> Any:
                stamps.append(now())
                return original(*args, **kwargs)

            setattr(owner, name, wrapped_call)
        else:

            def wrapped_return(*args: Any, **kwargs: Any) -> Any:
                result = original(*args, **kwargs)
                stamps.append(now())
                return result

            setattr(owner, name, wrapped_return)

    return note


def _server(out: str, argv: list[str]) -> int:
    import server.grpc_service as service
    from edge import runner
    from edge.protocol import converters
    from server.cli import main

    note = _noting({}, out)
    note(service.InferenceServicer, "_run", "received", coroutine=True)
    note(runner.ModelRunner, "run_tail", "tail", at="call")
    note(runner.ModelRunner, "run_tail", "tail_done")
    note(converters, "stream_response_to_pb", "answered")
    return main(argv)


def _device(out: str, argv: list[str]) -> int:
    import grpc.aio._call as grpc_call

    from edge import cooperative, runner
    from edge.cli import main
    from edge.transport import client, session

    note = _noting({}, out)
    note(runner.ModelRunner, "run_head", "head")
    note(client.TailClient, "_request", "built")
    note(session.Session, "_admit", "admitted", at="call")
    note(grpc_call._StreamRequestMixin, "_write", "written", coroutine=True)
    note(session, "read_answer", "read", at="call")
    note(session.Session, "_settle", "settled")
    note(cooperative.CooperativeRunner, "infer", "returned")
    return main(argv)


def main() -> int:
    if sys.argv[1:2] == ["--role"]:  # this script, as one of the two processes: ROLE MARKS ARGS...
        role, out, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
        return _server(out, rest) if role == "server" else _device(out, rest)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035", help="a shipped model's name, or a .tflite path")
    p.add_argument("--cut", type=int, default=32)
    p.add_argument("-n", type=int, default=3000, help="requests (default: %(default)s)")
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--device-core", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()

    from benchlib import free_port, wait_listening

    from edge import models

    model = models.resolve(args.model)
    work = Path(tempfile.mkdtemp())
    shutil.copy(model, work / model.name)
    port = free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    server = subprocess.Popen(
        ["taskset", "-c", str(args.server_core), *me, "--role", "server", str(work / "server.json"),
         "--models", str(work), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        wait_listening(port, server)
        print(f"{args.n} requests, {model.stem} at cut {args.cut} ...", file=sys.stderr, flush=True)
        subprocess.run(
            ["taskset", "-c", str(args.device_core), *me, "--role", "device", str(work / "device.json"),
             "bench", "--model", str(model), "--server", f"127.0.0.1:{port}", "--split-at", str(args.cut),
             "-n", str(args.n), "--json"],
            check=True, stdout=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    marks = {
        **json.loads((work / "server.json").read_text()),
        **json.loads((work / "device.json").read_text()),
    }
    shutil.rmtree(work, ignore_errors=True)
    counts = {len(stamps) for stamps in marks.values()}
    if len(counts) != 1:
        raise SystemExit(f"the steps were not noted once per request: {sorted(counts)}")
    count = counts.pop()
    timed = range(count // 10, count)  # the first tenth (edge bench's warm-up among it) is left out
    steps = {
        label: round(statistics.median((marks[b][i] - marks[a][i]) / 1000 for i in timed), 1)
        for label, a, b in STEPS
    }
    total = round(statistics.median((marks["returned"][i] - marks["head"][i]) / 1000 for i in timed), 1)
    result = {
        "model": model.stem,
        "cut": args.cut,
        "requests": len(timed),
        "steps_us": steps,
        "total_us": total,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    width = max(map(len, steps))
    for label, us in steps.items():
        print(f"{label:<{width}}  {us:8.1f} us")
    print(f"{'head done -> returned (the steps add up to about this)':<{width}}  {total:8.1f} us")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
