"""tools/grpc_floor.py, the bare gRPC floor the overhead is compared with, in both of its forms.

Covered: busy-waits of a given length, and ``--model M --cut K``, where the client runs the real head
and the server the real tail (a model the tool loads in its own server process). Each gives a
positive median per mode, and the report names the work it was measured around.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge import models

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "grpc_floor.py"


@pytest.mark.parametrize("real", [False, True], ids=["busy-waits", "head-and-tail"])
def test_the_floor_is_measured_around_busy_waits_or_the_real_halves(real: bool) -> None:
    work = ["--model", str(models.model_path("digits_resnet")), "--cut", "6"] if real else ["--gap-us", "100"]
    done = subprocess.run(
        [sys.executable, str(TOOL), "-n", "20", "--modes", "unary,stream", *work, "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["median_ms"]) == {"unary", "stream"}
    assert all(ms > 0 for ms in report["median_ms"].values())
    assert report["model"] == (str(models.model_path("digits_resnet")) if real else None)
    assert report["cut"] == (6 if real else None)
