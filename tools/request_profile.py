#!/usr/bin/env python3
"""Where each answer's server time goes, from a cProfile of edge-server under the fleet benchmark.

    python bench/fleet.py --devices 8 --seconds 10 --profile /tmp/server.pstats -- --workers 0
    python tools/request_profile.py /tmp/server.pstats [--json]

Answers are counted as the calls of ``DataPlane.execute``. Each step's figure is its cumulative time
over the answers, in microseconds: the steps nest (``scheduler`` holds ``compute``, which holds
``interpreter``), so the table says each step's own share as its time less its children's. What no
step holds (grpcio reading and writing messages, the event loop) is the profile's total less the
request path, and the time the loop waited in epoll (idle) is said apart. cProfile adds its own cost to every Python call, so the absolute figures are larger
than without it; the shares are what to read.
"""

from __future__ import annotations

import argparse
import json
import pstats
import sys

# (label, file suffix, function names, parent label): each step of one request, on the server.
STEPS: tuple[tuple[str, str, tuple[str, ...], str | None], ...] = (
    ("answer one request (servicer)", "server/grpc_service.py", ("reply_to", "_unary_infer"), None),
    ("parse the request (converters)", "edge/protocol/converters.py", ("infer_request_from_pb",), "answer one request (servicer)"),
    ("validate against the model (prepare)", "server/dataplane.py", ("prepare",), "answer one request (servicer)"),
    ("scheduler (admission, turns)", "server/scheduler.py", ("run",), "answer one request (servicer)"),
    ("compute (decode, invoke, outputs)", "server/dataplane.py", ("execute",), "scheduler (admission, turns)"),
    ("backend run (set, invoke, get)", "edge/backends/base.py", ("run",), "compute (decode, invoke, outputs)"),
    ("interpreter invoke", "~", ("Invoke", "invoke"), "backend run (set, invoke, get)"),
    ("build the response (converters)", "edge/protocol/converters.py", ("stream_response_to_pb", "infer_response_to_pb"), "answer one request (servicer)"),
    ("metrics", "server/metrics.py", ("answered",), "answer one request (servicer)"),
)  # fmt: skip


def _find(stats: pstats.Stats, suffix: str, names: tuple[str, ...]) -> tuple[int, float, float]:
    """(calls, total time, cumulative time) of the functions ``names`` in files ending ``suffix``; with
    ``~``, of C functions whose name ends so (``<built-in method ….Invoke>``, ``<method 'invoke' …>``)."""
    calls, tt, ct = 0, 0.0, 0.0
    for (filename, _, function), (_, nc, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if suffix == "~":
            found = filename == "~" and any(
                function.endswith(f".{n}>") or f"'{n}'" in function for n in names
            )
        else:
            found = function in names and filename.replace("\\", "/").endswith(suffix)
        if found:
            calls, tt, ct = calls + nc, tt + own, ct + cum
    return calls, tt, ct


def breakdown(path: str) -> dict[str, object]:
    stats = pstats.Stats(path)
    answers = _find(stats, "server/dataplane.py", ("execute",))[0]
    if answers == 0:
        raise SystemExit(
            f"{path}: no DataPlane.execute calls; was it edge-server under load with --workers 0?"
        )
    total_s = stats.total_tt  # type: ignore[attr-defined]
    us = {label: _find(stats, suffix, names)[2] / answers * 1e6 for label, suffix, names, _ in STEPS}
    children: dict[str, float] = {}
    for label, _, _, parent in STEPS:
        if parent is not None:
            children[parent] = children.get(parent, 0.0) + us[label]
    rows = [
        {
            "step": label,
            "cumulative_us": round(us[label], 1),
            "own_us": round(us[label] - children.get(label, 0.0), 1),
        }
        for label, *_ in STEPS
    ]
    per_answer = total_s / answers * 1e6
    idle = _find(stats, "~", ("poll",))[1] / answers * 1e6  # the loop waiting in epoll: no CPU
    return {
        "answers": answers,
        "profile_us_per_answer": round(per_answer, 1),
        "idle_us": round(idle, 1),
        "outside_request_path_us": round(per_answer - idle - us[STEPS[0][0]], 1),
        "steps": rows,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stats", help="a cProfile stats file (bench/fleet.py --profile OUT)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    try:
        result = breakdown(args.stats)
    except (OSError, TypeError, ValueError, EOFError) as err:
        print(f"request_profile: {args.stats}: not a cProfile stats file: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['answers']:,} answers; {result['profile_us_per_answer']} µs of profiled time each")
    print(f"{'step':<40} {'cumulative µs':>14} {'own µs':>8}")
    for row in result["steps"]:  # type: ignore[attr-defined]
        print(f"{row['step']:<40} {row['cumulative_us']:>14} {row['own_us']:>8}")
    print(f"{'outside the request path (grpcio, loop)':<40} {'':>14} {result['outside_request_path_us']:>8}")
    print(f"{'waiting in epoll (idle, no CPU)':<40} {'':>14} {result['idle_us']:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
