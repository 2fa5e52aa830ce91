"""The package as a user installs it: a wheel, in a fresh virtual environment, run from elsewhere.

Covered: the wheel holds the shipped models, the device profiles and the systemd units; the
installed ``edge`` finds a shipped profile by name and checks it; the units are where the
README says. The venv sees this environment's packages, so nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("edge_coop-*.whl")
    return path


def test_the_wheel_ships_profiles_units_and_models(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for profile in (REPO / "firmware_config").glob("*.toml"):
        assert f"edge/firmware_config/{profile.name}" in names
    for unit in (REPO / "firmware_config" / "systemd").glob("*.service"):
        assert f"edge/firmware_config/systemd/{unit.name}" in names
    assert "edge/firmware_config/mosquitto/edge.conf" in names
    assert "edge/models/digits_resnet.tflite" in names and "edge/models/digits_test.npz" in names


def test_an_installed_wheel_finds_and_checks_a_shipped_profile(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    where = subprocess.run(
        [str(python), "-c", "import edge; print(edge.__file__)"], capture_output=True, text=True, cwd=tmp_path
    )
    assert str(env_dir) in where.stdout, where.stdout + where.stderr
    proc = subprocess.run(
        [str(env_dir / "bin" / "edge"), "run", "--config", "generic-x86", "--check"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["profile"].startswith(str(env_dir)) and shown["resolved"]["cut"] == 8
