"""Fixtures for the server tests: a real in-process grpc.aio server on port 0."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from peers import unary_only_server  # noqa: F401 (a fixture for the tests here)

from edge import models
from helpers import SHIPPED
from server.embedded import BackgroundServer

SERVED = SHIPPED


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer.from_files([models.model_path(name) for name in SERVED]) as srv:
        yield srv
