"""What the device CLI writes and prints: pipes, shipped names, file modes, bad values, output paths.

Covered: a reader that closes the pipe early ends every printing command with status 0 and no
traceback (inspect --json and the table, split); every command taking a model accepts a shipped
name; ``edge split`` writes files with the umask's mode, not 0600; NaN and infinite inputs are
refused in one line; reals outside an input's range are clipped with one warning; ``--output``
reports the path it really wrote.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge import models

EDGE = [sys.executable, "-m", "edge"]


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE, *argv], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "mobilenetv2_035", "--json"],
        ["inspect", "mobilenetv2_035"],
        ["inspect", "digits_resnet"],
    ],
    ids=["inspect-json", "inspect-table", "inspect-table-small"],
)
def test_a_closed_pipe_is_the_normal_end_of_output(argv: list[str]) -> None:
    proc = subprocess.Popen([*EDGE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.parametrize("name", ["digits_tiny", "digits_resnet"])
def test_every_command_takes_a_shipped_name(name: str, tmp_path: Path) -> None:
    assert _run("inspect", name, "--json").returncode == 0
    split = _run("split", name, "--at", "2", "--out", str(tmp_path / "out"))
    assert split.returncode == 0, split.stderr
    assert (tmp_path / "out" / "head.tflite").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_split_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "split"
    proc = subprocess.run(
        [*EDGE, "split", "digits_tiny", "--at", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("head.tflite", "tail.tflite", "split.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused(tmp_path: Path, value: float) -> None:
    x = np.zeros((1, 32, 32, 1), np.float32)
    x[0, 3, 4, 0] = value
    np.save(tmp_path / "x.npy", x)
    proc = _run("infer", "--local", "--model", "digits_resnet", "--input", str(tmp_path / "x.npy"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["edge: error: input 'serving_default_image:0': 1 of 1024 values are NaN or infinite"]


def test_clipped_reals_are_said_once(tmp_path: Path) -> None:
    x = np.full((1, 32, 32, 1), 0.5, np.float32)
    x[0, 0, :3, 0] = 7.0
    np.save(tmp_path / "x.npy", x)
    proc = _run("infer", "--local", "--model", "digits_resnet", "--input", str(tmp_path / "x.npy"))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "clipped" in line]
    assert len(warnings) == 1 and "3 of 1024 values" in warnings[0]


@pytest.mark.parametrize("given", ["result", "result.npz", "deep/result"])
def test_output_reports_the_path_it_wrote(tmp_path: Path, given: str) -> None:
    (tmp_path / "deep").mkdir()
    np.save(tmp_path / "x.npy", models.digits_sample().x[:1])
    proc = _run(
        "infer", "--local", "--model", "digits_resnet", "--input", "x.npy", "--output", given, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    written = given if given.endswith(".npz") else given + ".npz"
    assert proc.stdout.strip().splitlines()[-1] == f"wrote {written}"
    with np.load(tmp_path / written) as data:
        assert list(data.keys()) == ["StatefulPartitionedCall_1:0"]


def test_output_to_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.npz").mkdir()
    np.save(tmp_path / "x.npy", models.digits_sample().x[:1])
    proc = _run(
        "infer", "--local", "--model", "digits_resnet", "--input", "x.npy", "--output", "d.npz", cwd=tmp_path
    )
    assert proc.returncode == 2 and "is a directory" in proc.stderr
