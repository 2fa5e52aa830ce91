#!/usr/bin/env python3
"""The daemon's peak memory decoding the largest sensor messages its limits let in (8 MiB), one kind per
process: a JSON document of 2 million numbers, one 8 MiB JSON string, raw bytes. Run:
``python bench/daemon_payload_rss.py``; prints each peak RSS against the process's own before it."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import resource, sys
from pathlib import Path
from edge.daemon.device import resolve
from edge.daemon.payloads import decode
from edge.errors import EdgeError
path = Path("firmware_config/generic-x86.toml")
resolved = resolve(__import__("edge.daemon.profiles", fromlist=["load"]).load(path), path)
limits, inputs = resolved.profile.limits, resolved.graph.inputs
size = limits.max_payload_bytes - 100
kind = sys.argv[1]
if kind == "json-numbers":
    sensor, payload = resolved.profile.sensors[0], b'{"id": "a", "data": [' + b"1.5," * (size // 4 - 1) + b"1.5]}"
elif kind == "json-string":
    sensor, payload = resolved.profile.sensors[0], b'{"id": "a", "data": [[1]], "note": "' + b"x" * size + b'"}'
else:
    sensor, payload = resolved.profile.sensors[1], b"\\0" * size
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
try:
    decode(payload, sensor, inputs, limits=limits)
    outcome = "decoded"
except EdgeError as err:
    outcome = f"refused ({type(err).__name__})"
print(f"{kind}: {len(payload) / 2**20:.1f} MiB, {outcome}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB (before {before} MiB)")
"""


def main() -> int:
    for kind in ("json-numbers", "json-string", "raw"):
        subprocess.run([sys.executable, "-c", CODE, kind], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
