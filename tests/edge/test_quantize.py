"""`edge quantize` on the zoo's float classifier: a static int8 model that agrees with the float one on
held-out inputs, and that splits bit-exactly at every cut.

Covered: top-1 agreement >= 99 % on 100 held-out seeded inputs; the report's fields (JSON); int8
weights and activations in the result; every cut 1 <= K < N of the result compared with
np.array_equal against its whole model; bad data refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.backends import create_backend
from edge.graph import ModelGraph
from edge.partition import split_model
from helpers import REPO, seeded_inputs

FLOAT = REPO / "tests" / "zoo" / "float_classifier.tflite"


def _edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("quantize")
    rng = np.random.default_rng(11)
    np.savez(tmp / "cal.npz", x=rng.random((400, 16, 16, 3), dtype=np.float32))
    out = tmp / "int8.tflite"
    proc = _edge("quantize", str(FLOAT), "--data", str(tmp / "cal.npz"), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_the_report_agrees_with_the_float_model(quantized: tuple[Path, dict]) -> None:
    out, report = quantized
    assert report["calibration_samples"] == 300 and report["held_out_samples"] == 100
    assert report["top1_agreement"] >= 0.99
    assert report["float_bytes"] == FLOAT.stat().st_size and report["int8_bytes"] == out.stat().st_size
    assert report["int8_bytes"] < 0.5 * report["float_bytes"]
    (errors,) = report["outputs"].values()
    assert 0 < errors["mean_abs_error"] <= errors["max_abs_error"] < 1.0


def test_the_result_is_int8_throughout(quantized: tuple[Path, dict]) -> None:
    graph = ModelGraph.from_file(quantized[0])
    activations = [t for t in graph.tensors if not graph.is_weight(t.index)]
    assert activations and all(t.dtype in (np.int8, np.int32) for t in activations)
    assert any(t.is_constant and t.dtype == np.int8 for t in graph.tensors)


def test_every_cut_of_the_result_is_bit_exact(quantized: tuple[Path, dict]) -> None:
    graph = ModelGraph.from_file(quantized[0])
    feeds = [seeded_inputs(graph, seed) for seed in (1, 2)]
    with create_backend("litert", graph.data) as whole:
        want = [whole.run(f) for f in feeds]
    assert not np.array_equal(*[next(iter(w.values())) for w in want])
    for k in range(1, graph.num_operators):
        part = split_model(graph, k)
        with create_backend("litert", part.head) as head, create_backend("litert", part.tail) as tail:
            for f, expected in zip(feeds, want, strict=True):
                produced = head.run(f)
                got = {**{t.name: produced[t.name] for t in part.cut.head_outputs},
                       **tail.run({t.name: produced[t.name] for t in part.cut.tensors})}  # fmt: skip
                for name, array in expected.items():
                    assert np.array_equal(got[name], array), f"cut {k}: {name} differs"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: {"x": np.zeros((4, 16, 16, 3), np.int8)}, "must be float samples"),
        (lambda: {"x": np.zeros((4, 8, 8, 3), np.float32)}, "must be float samples of shape"),
        (lambda: {"y": np.zeros((4,), np.int64)}, "no array for input"),
        (lambda: {"x": np.zeros((1, 16, 16, 3), np.float32)}, "leave none to calibrate on"),
        (lambda: {"x": np.full((4, 16, 16, 3), np.nan, np.float32)}, "NaN"),
    ],
)
def test_bad_data_is_one_line(make, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    np.savez(tmp_path / "bad.npz", **make())
    out = tmp_path / "int8.tflite"
    proc = _edge("quantize", str(FLOAT), "--data", str(tmp_path / "bad.npz"), "--out", str(out))
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("INFO:")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()
