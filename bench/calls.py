#!/usr/bin/env python3
"""Python function calls a split request costs each side: ``edge bench`` and ``edge-server``, under cProfile.

Each side's per-request Python runs on a CPU the head's (or the tail's) interpreter has just left
cold, where a call costs about a microsecond, not the tens of nanoseconds it takes warm in a loop. So
the count of calls per request tracks the request path's own cost, and unlike wall clock it does not
move with the machine's noise: a change to the request path that adds calls shows here at once.

It runs ``edge-server`` (its defaults) and ``edge bench --split-at K`` in separate processes, each
under ``python -m cProfile``, twice: with ``-n N`` and ``-n 2N`` requests. The difference, over N,
is what one request costs: Python-level calls (functions, methods, comprehensions: each a frame)
and built-in calls (C functions called from Python). It prints both sides and, as the last line,
the figure asked for, for ``../shared/ab.sh``. Both processes run from the working directory, so
from another checkout this script counts that checkout's request path:

    python bench/calls.py --model /tmp/zoo/mobilenetv2_224.tflite
    ../shared/ab.sh HEAD~1 --rounds 3 -- python "$PWD/bench/calls.py" --figure server
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import bench_against_server

from edge import models

FIGURES = ("device", "server", "both")


def counts(profile: Path) -> tuple[int, int]:
    """Python-level calls and built-in calls recorded in a cProfile file."""
    python = builtin = 0
    for (filename, _, _), (_, calls, *_) in pstats.Stats(str(profile)).stats.items():  # type: ignore[attr-defined]
        if filename == "~":
            builtin += calls
        else:
            python += calls
    return python, builtin


def profiled_run(model: Path, cut: int, n: int, work: Path) -> dict[str, tuple[int, int]]:
    """One edge-server and one ``edge bench -n n`` against it, each under cProfile: both sides' counts."""
    server_profile, device_profile = work / f"server-{n}.prof", work / f"device-{n}.prof"
    profile = [sys.executable, "-m", "cProfile", "-o"]
    bench_against_server(
        model,
        cut,
        n,
        server_prefix=[*profile, str(server_profile)],
        device_prefix=[*profile, str(device_profile)],
    )
    return {"device": counts(device_profile), "server": counts(server_profile)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035", help="a shipped model's name, or a .tflite path")
    p.add_argument("--cut", type=int, default=32)
    p.add_argument("-n", type=int, default=300, help="requests in the shorter run (default: %(default)s)")
    p.add_argument(
        "--figure",
        choices=FIGURES,
        default="both",
        help="the Python-level calls a request printed last: one side's, or both (default: %(default)s)",
    )
    args = p.parse_args()
    model = models.resolve(args.model)
    work = Path(tempfile.mkdtemp())
    try:
        short = profiled_run(model, args.cut, args.n, work)
        long = profiled_run(model, args.cut, 2 * args.n, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_request = {
        side: tuple((b - a) / args.n for a, b in zip(short[side], long[side], strict=True)) for side in short
    }
    for side, (python, builtin) in per_request.items():
        print(f"{side}: {python:.1f} Python-level calls, {builtin:.1f} built-in calls a request")
    if args.figure == "both":
        print(f"{per_request['device'][0] + per_request['server'][0]:.1f}")
    else:
        print(f"{per_request[args.figure][0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
