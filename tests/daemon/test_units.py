"""The shipped systemd units: notify services with a watchdog, restarted on failure."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from helpers import REPO

UNITS = REPO / "firmware_config" / "systemd"


def read(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


@pytest.mark.parametrize(
    ("unit", "command"),
    [
        ("edge-device.service", " run --config "),
        ("edge-server.service", "edge-server --config /etc/edge/edge-server.toml"),
    ],
)
def test_unit_is_notify_with_watchdog_and_restart(unit: str, command: str) -> None:
    service = read(UNITS / unit)["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert command in service["ExecStart"]
    assert service["RestartPreventExitStatus"] == "2"  # a bad profile or flag is not retried


def test_the_shipped_server_settings_validate(tmp_path: Path) -> None:
    """firmware_config/server/edge-server.toml, with its models directory pointed here, passes --check."""
    import subprocess
    import sys

    text = (REPO / "firmware_config" / "server" / "edge-server.toml").read_text()
    assert 'models = "/var/lib/edge/models"' in text
    config = tmp_path / "edge-server.toml"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "digits_tiny.tflite").write_bytes(
        (REPO / "edge" / "models" / "digits_tiny.tflite").read_bytes()
    )
    config.write_text(text.replace("/var/lib/edge/models", str(tmp_path / "models")))
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"max_inflight": 64' in proc.stdout
    server = read(UNITS / "edge-server.service")["Service"]
    assert "--check" in server["ExecStartPre"] and server["ExecReload"].endswith("-HUP $MAINPID")
    assert int(server["LimitNOFILE"]) >= 4096
    bad = tmp_path / "bad.toml"
    bad.write_text(text + "\ncolour = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--config", str(bad), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "colour" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_units_verify_with_systemd(tmp_path: Path) -> None:
    """systemd-analyze verify on each shipped unit, its commands pointed at this environment's
    executables (the units expect the venv the README makes at /opt/edge)."""
    import shutil
    import subprocess
    import sys

    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (Debian's systemd package)"
    bindir = Path(sys.executable).parent
    for unit in sorted(UNITS.glob("*.service")):
        text = unit.read_text()
        assert "/opt/edge/bin/" in text and "/usr/local/bin" not in text
        copy = tmp_path / unit.name
        copy.write_text(text.replace("/opt/edge/bin/", f"{bindir}/"))
        proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and unit.name not in proc.stderr, proc.stderr  # warnings name the file
