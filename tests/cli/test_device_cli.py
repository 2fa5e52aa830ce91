"""edge infer, edge bench, edge demo and edge-server as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge import models
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from helpers import seeded_inputs


def run(*args: str, module: str = "edge", timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout
    )


def _one_error_line(proc: subprocess.CompletedProcess[str], prefix: str = r"edge( [a-z]+)?: error: ") -> str:
    # edge-server logs to stderr (timestamped lines); the error itself is the one other line.
    lines = [
        line
        for line in proc.stderr.splitlines()
        if not line.startswith("INFO: ") and not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", line)
    ]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and re.match(prefix, lines[0]), proc.stderr
    return lines[0]


def test_infer_writes_the_whole_models_outputs(
    server_process: tuple, graphs: dict[str, ModelGraph], tmp_path: Path
) -> None:
    _, address = server_process
    graph = graphs["digits_resnet"]
    feeds = seeded_inputs(graph, 11)
    np.save(tmp_path / "x.npy", next(iter(feeds.values())))
    expected = ModelRunner(graph).run(feeds)
    for split in ("0", "7", str(graph.num_operators)):
        out = tmp_path / f"y{split}.npz"
        proc = run(
            "infer",
            "--server",
            address,
            "--model",
            "digits_resnet",
            "--split-at",
            split,
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(out),
        )
        assert proc.returncode == 0, proc.stderr
        assert "fallback" not in proc.stderr
        with np.load(out) as got:
            assert sorted(got.files) == sorted(expected)
            for name, want in expected.items():
                assert np.array_equal(got[name], want)


def test_infer_named_input_float_quantized_and_local(graphs: dict[str, ModelGraph], tmp_path: Path) -> None:
    graph = graphs["digits_resnet"]
    sample = models.digits_sample()
    np.save(tmp_path / "x.npy", sample.x_float[0])  # [32, 32, 1] floats: batch added, quantized
    out = tmp_path / "y.npz"
    proc = run(
        "infer",
        "--local",
        "--model",
        str(models.model_path("digits_resnet")),
        "--input",
        f"{graph.inputs[0].name}={tmp_path / 'x.npy'}",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    expected = ModelRunner(graph).run({graph.inputs[0].name: sample.x[0:1]})
    with np.load(out) as got:
        assert np.array_equal(got[graph.outputs[0].name], expected[graph.outputs[0].name])


def test_infer_falls_back_when_no_server_answers(tmp_path: Path, graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_tiny"]
    feeds = seeded_inputs(graph, 1)
    np.save(tmp_path / "x.npy", next(iter(feeds.values())))
    proc = run(
        "infer",
        "--server",
        "127.0.0.1:9",
        "--timeout",
        "1",
        "--model",
        "digits_tiny",
        "--split-at",
        "2",
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "y.npz"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "fallback" in proc.stderr
    with np.load(tmp_path / "y.npz") as got:
        assert np.array_equal(
            got[graph.outputs[0].name], ModelRunner(graph).run(feeds)[graph.outputs[0].name]
        )


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", "-1 is below the minimum, 0"), ("2000000001", "0..2000000000 microseconds, not 2000000001")],
)
def test_a_bad_cpu_latency_is_one_error_line(value: str, message: str) -> None:
    line = _one_error_line(run("bench", "--model", "digits_tiny", "-n", "5", "--cpu-latency-us", value))
    assert message in line


def test_infer_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "junk.npy").write_text("not numpy")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 3), np.int8))
    cases = {
        str(tmp_path / "junk.npy"): "not a readable .npy",
        str(tmp_path / "wrong.npy"): "must have shape",
        str(tmp_path / "missing.npy"): "not a readable .npy",
        f"nope={tmp_path / 'wrong.npy'}": "has no input 'nope'",
    }
    for spec, message in cases.items():
        line = _one_error_line(run("infer", "--local", "--model", "digits_resnet", "--input", spec))
        assert message in line
    assert "no shipped model" in _one_error_line(
        run("infer", "--local", "--model", "nope", "--input", "x.npy")
    )


def test_bench_json(server_process: tuple) -> None:
    _, address = server_process
    proc = run(
        "bench", "--server", address, "--model", "digits_resnet", "--split-at", "5", "-n", "30", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for stage in ("e2e_ms", "head_ms", "tail_ms", "transfer_ms"):
        assert set(report[stage]) >= {"p50", "p99"}
        assert 0 <= report[stage]["p50"] <= report[stage]["p99"]
    assert report["n"] == 30 and report["fallbacks"] == 0 and report["split_point"] == 5
    graph = ModelGraph.from_file(models.model_path("digits_resnet"))
    assert report["bytes_sent"] == graph.cut(5).nbytes
    assert report["e2e_ms"]["p50"] >= report["head_ms"]["p50"]
    assert report["transport"] == "stream"


def test_bench_over_unary_calls(server_process: tuple) -> None:
    _, address = server_process
    proc = run(
        "bench", "--server", address, "--model", "digits_resnet", "--split-at", "5", "-n", "10", "--json",
        "--transport", "unary",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["transport"] == "unary" and report["fallbacks"] == 0 and report["n"] == 10


def test_bench_on_the_embedded_server_exits_cleanly() -> None:
    """Client and in-process server share gRPC's completion queue: neither may leave events for a closed loop."""
    for _ in range(3):
        proc = run("bench", "--model", "digits_tiny", "-n", "20", "--json")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        assert json.loads(proc.stdout)["fallbacks"] == 0


def test_demo_runs_on_the_embedded_default() -> None:
    proc = run("demo", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["samples"] == 200
    assert report["identical_to_whole_model"] == 200
    assert report["fallbacks"] == 0
    assert report["accuracy"] >= 0.95
    assert 0 < report["split_point"] < report["num_operators"]
    assert report["bytes_sent_per_request"] > 0 and report["input_bytes"] == 1024
    # The default cut makes the point: it sends at most half the raw input.
    assert report["bytes_sent_per_request"] <= report["input_bytes"] / 2
    assert "Traceback" not in proc.stderr
    human = run("demo", "-n", "20")
    assert human.returncode == 0, human.stderr
    for text in ("accuracy", "head (device)", "transfer", "tail (server)", "bytes sent", "fallbacks: 0"):
        assert text in human.stdout
    assert "at most half the raw input" in " ".join(human.stdout.split())


def test_edge_server_bad_model_directory(tmp_path: Path) -> None:
    proc = run("--models", str(tmp_path / "nowhere"), "--port", "0", module="server", timeout=60)
    assert "does not exist" in _one_error_line(proc, "edge-server: error: ")
    (tmp_path / "bad.tflite").write_bytes(b"garbage" * 10)
    proc = run("--models", str(tmp_path), "--port", "0", module="server", timeout=60)
    assert "not a TFLite flatbuffer" in _one_error_line(proc, "edge-server: error: ")
