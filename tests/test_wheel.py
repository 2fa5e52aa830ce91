"""The package as a user installs it: a wheel, in a fresh virtual environment, run from elsewhere.

Covered: the wheel holds the shipped models, the device profiles and the systemd units; the
installed ``edge`` finds a shipped profile by name and checks it; the units are where the
README says. The venv sees this environment's packages, so nothing is downloaded.
"""

from __future__ import annotations

import json
import site
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


def _venv_seeing_this_environment(env_dir: Path) -> Path:
    """A fresh venv whose path ends with this interpreter's site-packages (so nothing is downloaded).

    ``system_site_packages`` would give it the *base* interpreter's packages, which inside a venv are
    not this environment's: the venv's own directories are listed in a .pth file instead. Paths a .pth
    names are plain entries: this environment's editable install of edge does not shadow the wheel."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    (site_dir,) = (env_dir / "lib").glob("python*/site-packages")
    (site_dir / "_this_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return env_dir / "bin" / "python"


def _installed(wheel: Path, env_dir: Path) -> Path:
    """The wheel installed in a fresh venv that sees this environment; its python."""
    python = _venv_seeing_this_environment(env_dir)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return python


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
    python = _installed(wheel, env_dir)
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


def test_an_installed_wheel_exports_for_mlserver(wheel: Path, tmp_path: Path) -> None:
    """The export copies requirements.txt from the package (edge/firmware_config in the wheel)."""
    env_dir = tmp_path / "venv"
    _installed(wheel, env_dir)
    out = tmp_path / "export"
    proc = subprocess.run(
        [str(env_dir / "bin" / "edge"), "export", "mlserver", "digits_tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mlserver" in (out / "requirements.txt").read_text()
    assert json.loads((out / "settings.json").read_text())["parallel_workers"] == 0
