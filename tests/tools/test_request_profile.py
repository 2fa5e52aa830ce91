"""tools/request_profile.py on a real cProfile of edge-server: every answer counted, its steps nested,
and a file that is not a profile one line.

Covered: an edge-server process under cProfile (``--workers 0``, all on its main thread) answering
20 tail requests over a stream, stopped with SIGTERM so the profile is written; the tool's JSON then
counts 20 answers and gives each step a time no larger than the step holding it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from edge import models
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import seeded_inputs, start_logged

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "request_profile.py"


def test_each_answer_is_broken_into_nested_steps(tmp_path: Path) -> None:
    model = models.model_path("digits_resnet")
    (tmp_path / "models").mkdir()
    shutil.copy(model, tmp_path / "models" / model.name)
    stats = tmp_path / "server.pstats"
    server, port = start_logged(
        [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "server", "--models", str(tmp_path / "models"),
         "--host", "127.0.0.1", "--port", "0", "--workers", "0"],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        graph = ModelGraph.from_file(model)
        with ModelRunner(graph) as runner, TailClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
            cut = runner.run_head(8, seeded_inputs(graph, 0)).cut
            for _ in range(20):
                client.infer(
                    "digits_resnet", cut, parameters={"split_point": 8, "model_sha256": graph.sha256}
                )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    done = subprocess.run(
        [sys.executable, str(TOOL), str(stats), "--json"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["answers"] == 20
    steps = {row["step"]: row["cumulative_us"] for row in report["steps"]}
    assert 0 < steps["interpreter invoke"] <= steps["backend run (set, invoke, get)"]
    assert steps["backend run (set, invoke, get)"] <= steps["compute (decode, invoke, outputs)"]
    assert steps["compute (decode, invoke, outputs)"] <= steps["answer one request (servicer)"]
    assert steps["parse the request (converters)"] > 0 and steps["build the response (converters)"] > 0


def test_a_file_that_is_not_a_profile_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pstats"
    bad.write_text("not a profile")
    done = subprocess.run([sys.executable, str(TOOL), str(bad)], capture_output=True, text=True, timeout=60)
    assert (
        done.returncode == 2 and done.stderr.count("\n") == 1 and "not a cProfile stats file" in done.stderr
    )
