"""edge inspect / split from the command line, including every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from edge import models
from edge.graph import ModelGraph


def edge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: ")]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("edge: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_inspect_table_lists_every_cut(graphs: dict[str, ModelGraph]) -> None:
    proc = edge("inspect", str(models.model_path("digits_resnet")))
    assert proc.returncode == 0, proc.stderr
    graph = graphs["digits_resnet"]
    assert graph.sha256 in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│") and line.split("│")[1].strip()]
    assert [int(r.split("│")[1].strip(" *")) for r in rows] == list(range(graph.num_operators + 1))
    # Piped, there is no colour: the smallest inner cuts are starred, and the legend says so.
    smallest = min(graph.cut(k).nbytes for k in range(1, graph.num_operators))
    starred = [int(r.split("│")[1].strip(" *")) for r in rows if "*" in r.split("│")[1]]
    assert starred and all(graph.cut(k).nbytes == smallest for k in starred)
    assert "*: the inner cuts that send the fewest bytes" in proc.stdout and "green" not in proc.stdout


def test_inspect_json(graphs: dict[str, ModelGraph]) -> None:
    proc = edge("inspect", str(models.model_path("digits_resnet")), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    graph = graphs["digits_resnet"]
    assert data["sha256"] == graph.sha256
    assert len(data["operators"]) == graph.num_operators
    assert [c["index"] for c in data["cuts"]] == list(range(graph.num_operators + 1))
    for cut in data["cuts"]:
        assert cut["bytes"] == sum(t["bytes"] for t in cut["tensors"]) == graph.cut(cut["index"]).nbytes
        for t in cut["tensors"]:
            assert set(t) == {"name", "shape", "dtype", "bytes", "scale", "zero_point"}
    assert data["inputs"][0]["shape"] == [1, 32, 32, 1]


def test_split_by_index_and_by_tensor_name(graphs: dict[str, ModelGraph], tmp_path: Path) -> None:
    graph = graphs["digits_resnet"]
    tensor = graph.tensors[graph.operators[3].outputs[0]].name
    for spec, out in (("4", "a"), (tensor, "b")):
        proc = edge(
            "split", str(models.model_path("digits_resnet")), "--at", spec, "--out", str(tmp_path / out)
        )
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a" / "head.tflite").read_bytes() == (tmp_path / "b" / "head.tflite").read_bytes()
    assert json.loads((tmp_path / "b" / "split.json").read_text())["split_point"] == 4


def _with_control_flow(data: bytes) -> bytes:
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.WHILE
    code.deprecatedBuiltinCode = schema.BuiltinOperator.WHILE
    code.version = 1
    model.operatorCodes.append(code)
    model.subgraphs[0].operators[0].opcodeIndex = len(model.operatorCodes) - 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _with_binary_name(data: bytes) -> bytes:
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    model.subgraphs[0].tensors[3].name = b"bad\xff\xfename"
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


BAD_MODELS = {
    "not-a-flatbuffer": (lambda data: b"this is not a model\n" * 10, "not a TFLite flatbuffer"),
    "truncated": (lambda data: data[: len(data) // 3], "truncated"),
    "truncated-header": (lambda data: data[:6], "not a TFLite flatbuffer"),
    "control-flow-calling-nothing": (_with_control_flow, "names no subgraph to call"),
    "name-not-utf8": (_with_binary_name, "name is not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
@pytest.mark.parametrize("command", ["inspect", "split"])
def test_bad_model_files(case: str, command: str, tmp_path: Path) -> None:
    make, message = BAD_MODELS[case]
    path = tmp_path / "bad.tflite"
    path.write_bytes(make(models.model_path("digits_resnet").read_bytes()))
    args = [command, str(path)] + (
        ["--at", "2", "--out", str(tmp_path / "out")] if command == "split" else []
    )
    line = _error_line(edge(*args))
    assert message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [("999", "out of range"), ("-1", "out of range"), ("no_such_tensor", "no tensor named")],
)
def test_bad_cut_specs(spec: str, message: str, tmp_path: Path) -> None:
    line = _error_line(
        edge("split", str(models.model_path("digits_resnet")), "--at", spec, "--out", str(tmp_path / "o"))
    )
    assert message in line
    assert not (tmp_path / "o").exists()


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _error_line(edge("inspect", str(tmp_path / "nope.tflite")))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grpc-port", "70000"], "out of range"),
        (["--http-port", "0"], "fixed port"),
        (["--parallel-workers", "-1"], "below the minimum"),
        (["--max-batch-time-ms", "0"], "above 0"),
    ],
)
def test_export_refuses_bad_settings_and_writes_nothing(
    args: list[str], message: str, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    proc = edge("export", "mlserver", "digits_tiny", "--out", str(out), *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_export_onto_a_file_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert "is a file, not a directory" in _error_line(
        edge("export", "mlserver", "digits_tiny", "--out", str(target))
    )
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "command",
    [
        ["infer", "--model", "digits_resnet", "--input", "{npy}"],
        ["inspect", "digits_resnet", "--codec", "zstd", "--sample", "{npy}"],
        [
            "calibrate",
            "--model",
            "digits_resnet",
            "--small",
            "digits_tiny",
            "--data",
            "{npz}",
            "--out",
            "{out}",
        ],
        ["quantize", "digits_resnet_f32", "--data", "{npz}", "--out", "{out}"],
    ],
    ids=["infer", "inspect", "calibrate", "quantize"],
)
def test_an_empty_data_file_is_one_line(command: list[str], tmp_path: Path) -> None:
    """A zero-byte .npy or .npz (a copy that failed, a pipe that wrote nothing): one line, exit 2."""
    files = {"npy": tmp_path / "x.npy", "npz": tmp_path / "x.npz", "out": tmp_path / "out"}
    for path in (files["npy"], files["npz"]):
        path.write_bytes(b"")
    args = [part.format(**{k: str(v) for k, v in files.items()}) for part in command]
    assert "(empty)" in _error_line(edge(*args))
    assert not files["out"].exists()


@pytest.mark.parametrize(("model", "labelled"), [("digits_resnet_f32", True), ("mobilenetv2_035", False)])
def test_demo_runs_every_shipped_kind_of_model(model: str, labelled: bool) -> None:
    """The float model takes the float digits; MobileNet takes seeded inputs and reports no accuracy."""
    proc = edge("demo", "--model", model, "-n", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["identical_to_whole_model"] == 4 and report["fallbacks"] == 0
    assert (report["accuracy"] is not None) == labelled


def test_infer_refuses_quantized_data_for_a_float_model(tmp_path: Path) -> None:
    """int8 digits into the float model were cast without a word (logits of 6,860 against 9.6)."""
    np.save(tmp_path / "x.npy", models.digits_sample().x[:1])
    line = _error_line(edge("infer", "--model", "digits_resnet_f32", "--input", str(tmp_path / "x.npy")))
    assert "is float32, and this file holds int8 values" in line


def test_split_is_all_or_nothing_when_the_tail_cannot_be_written(tmp_path: Path) -> None:
    out = tmp_path / "split"
    (out / "tail.tflite").mkdir(parents=True)
    assert "tail.tflite is a directory" in _error_line(
        edge("split", "digits_resnet", "--at", "8", "--out", str(out))
    )
    assert sorted(p.name for p in out.iterdir()) == ["tail.tflite"]


def test_infer_says_where_the_tail_ran(tmp_path: Path) -> None:
    """A fallback's line does not look like an offload (it printed 'cut 8: ... transfer ...')."""
    np.save(tmp_path / "x.npy", models.digits_sample().x[:1])
    dead = edge("infer", "--model", "digits_resnet", "--input", str(tmp_path / "x.npy"), "--server",
                "127.0.0.1:9", "--split-at", "8")  # fmt: skip
    assert dead.returncode == 0, dead.stderr
    first = dead.stdout.splitlines()[0]
    assert first.startswith("on this device (fallback from cut 8)") and "transfer" not in first, dead.stdout
    assert "fallback: the tail ran locally" in dead.stderr


@pytest.mark.parametrize("command", ["infer", "bench"])
def test_strict_makes_a_fallback_an_error(command: str, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", models.digits_sample().x[:1])
    args = ["--model", "digits_resnet", "--server", "127.0.0.1:9", "--split-at", "8"]
    args += ["--input", str(tmp_path / "x.npy")] if command == "infer" else ["-n", "5", "--json"]
    lenient = edge(command, *args)
    assert lenient.returncode == 0, lenient.stderr
    if command == "bench":  # it says the server was never used
        assert "every request ran on the device" in lenient.stderr
    strict = edge(command, *args, "--strict")
    errors = [line for line in strict.stderr.splitlines() if line.startswith("edge: error:")]
    assert strict.returncode == 2 and len(errors) == 1 and "fell back to the device (--strict)" in errors[0]


def test_calibrate_refuses_labels_outside_the_classes(tmp_path: Path) -> None:
    sample = models.digits_sample()
    np.savez(tmp_path / "d.npz", x=sample.x[:20], y=np.full(20, 12))
    out = tmp_path / "cal.json"
    line = _error_line(edge("calibrate", "--model", "digits_resnet", "--small", "digits_tiny", "--split-at", "8",
                            "--data", str(tmp_path / "d.npz"), "--out", str(out)))  # fmt: skip
    assert "labels must be classes 0..9" in line and not out.exists()


def test_calibrate_plot_without_matplotlib_fails_before_writing(tmp_path: Path) -> None:
    """matplotlib made unimportable in the process (as on a device without the plot extra)."""
    out = tmp_path / "cal.json"
    code = (
        "import sys; sys.modules['matplotlib'] = None; from edge.cli import main; "
        f"sys.exit(main(['calibrate', '--model', 'digits_resnet', '--small', 'digits_tiny', '--split-at', '8', "
        f"'--data', {str(models.HERE / 'digits_test.npz')!r}, "
        f"'--out', {str(out)!r}, '--plot', {str(tmp_path / 'p.png')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--plot needs matplotlib" in proc.stderr, proc.stderr
    assert not out.exists()


def test_debug_and_verbose_work_after_the_subcommand(tmp_path: Path) -> None:
    after = edge("inspect", str(tmp_path / "nope.tflite"), "--debug")
    assert after.returncode != 0 and "Traceback" in after.stderr
    assert edge("inspect", "digits_tiny", "--json", "-v").returncode == 0
    assert (
        "usage: edge bench sweep [-h]" in edge("bench", "sweep", "--help").stdout
    )  # not the parent's two lines


def test_inspect_fits_80_columns_without_folding_names_to_pieces() -> None:
    """MobileNetV2's converter names run to 400 characters: folded whole they took 1,608 lines."""
    import os

    proc = subprocess.run([sys.executable, "-m", "edge", "inspect", "mobilenetv2_035"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert len(lines) < 4 * 66, len(lines)
    assert "--json has them whole" in proc.stdout


@pytest.mark.parametrize(("codec", "lossy"), [("raw", 0), ("int4", 12)])
def test_bench_json_records_the_codec_and_lossy_results(codec: str, lossy: int) -> None:
    proc = edge(
        "bench", "--model", "digits_resnet", "--split-at", "8", "-n", "12", "--codec", codec, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["codec"] == codec and report["lossy"] == lossy
