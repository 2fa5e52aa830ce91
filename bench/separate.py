#!/usr/bin/env python3
"""One figure of ``edge bench`` against ``edge-server`` in separate processes, each pinned to a core.

``edge-server`` runs with its defaults (so, pinned to one core, one compute thread), as an operator
starts it; ``edge bench --split-at K -n N --json`` runs on the other core. It prints the p50 of the
figure asked for, as the last line, for ``../shared/ab.sh``:

    python bench/separate.py --model /tmp/zoo/mobilenetv2_224.tflite --figure e2e_ms
    ../shared/ab.sh HEAD~1 --rounds 8 --extras server -- python bench/separate.py --figure queue_ms
"""

from __future__ import annotations

import argparse

from overhead_floor import edge_round

from edge import models

FIGURES = ("e2e_ms", "overhead_ms", "queue_ms", "transfer_ms", "tail_ms", "head_ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035", help="a shipped model's name, or a .tflite path")
    p.add_argument("--cut", type=int, default=32)
    p.add_argument("-n", type=int, default=1000, help="requests (default: %(default)s)")
    p.add_argument(
        "--figure", choices=FIGURES, default="e2e_ms", help="the p50 printed (default: %(default)s)"
    )
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--device-core", type=int, default=0)
    args = p.parse_args()
    figures = edge_round(models.resolve(args.model), args.cut, args.n, args.server_core, args.device_core)
    print(figures[args.figure])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
