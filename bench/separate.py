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
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import free_port, wait_listening  # noqa: E402

from edge import models  # noqa: E402

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
    model = models.resolve(args.model)
    work = Path(tempfile.mkdtemp())
    shutil.copy(model, work / model.name)
    port = free_port()
    server = subprocess.Popen(
        ["taskset", "-c", str(args.server_core), sys.executable, "-m", "server", "--models", str(work),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        wait_listening(port, server)
        out = subprocess.run(
            ["taskset", "-c", str(args.device_core), sys.executable, "-m", "edge", "bench", "--model", str(model),
             "--server", f"127.0.0.1:{port}", "--split-at", str(args.cut), "-n", str(args.n), "--json"],
            check=True, capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    report = json.loads(out.stdout)
    if report.get("fallbacks"):
        raise SystemExit(f"{report['fallbacks']} requests fell back: {report.get('fallback_reason')}")
    print(report[args.figure]["p50"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
