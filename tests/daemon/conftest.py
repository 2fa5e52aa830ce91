"""Fixtures for the daemon tests; the machinery is in daemon_harness.py. Processes are stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon.daemon_harness import GENERIC, Broker, DaemonProcess, Probe, ServerProcess


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture()
def edge_server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path / "server")
    s.start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture()
def probe(broker: Broker) -> Iterator[Probe]:
    p = Probe(broker, "generic-x86")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture()
def daemon_factory(tmp_path: Path, broker: Broker) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(servers: list[str], profile: Path = GENERIC) -> DaemonProcess:
        d = DaemonProcess(tmp_path, profile, broker.address, servers)
        started.append(d)
        return d

    try:
        yield make
    finally:
        for d in started:
            d.kill()
