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
    [("edge-device.service", " run --config "), ("edge-server.service", "edge-server --models ")],
)
def test_unit_is_notify_with_watchdog_and_restart(unit: str, command: str) -> None:
    service = read(UNITS / unit)["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert command in service["ExecStart"]
    assert service["RestartPreventExitStatus"] == "2"  # a bad profile or flag is not retried
