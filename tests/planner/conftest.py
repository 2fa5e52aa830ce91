"""Fixtures for the planner tests: a real in-process edge server on loopback, and a cache of their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge import models
from edge.link import LinkProber
from edge.transport import TailClient
from server.embedded import BackgroundServer

SERVED = ["digits_resnet", "digits_tiny"]


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Profiles go to a fresh directory, never to the user's cache."""
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer.from_files([models.model_path(name) for name in SERVED]) as srv:
        yield srv


@pytest.fixture()
def client(server: BackgroundServer) -> Iterator[TailClient]:
    with TailClient(server.address, timeout_s=30.0) as c:
        yield c


@pytest.fixture()
def prober(client: TailClient, graphs: dict) -> LinkProber:
    return LinkProber(client, "digits_resnet", graphs["digits_resnet"])
