"""Shared fixtures: the shipped models, the backends under test, real servers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import unary_only_server  # noqa: F401 (a fixture for the transport and server tests)

from edge import models
from edge.graph import ModelGraph
from helpers import SHIPPED, RefusedAddress, start_logged
from server.embedded import BackgroundServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=os.environ.get("EDGE_TEST_BACKENDS", "litert"),
        help="comma-separated backends the equivalence tests run on (litert, tflite-runtime)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", metafunc.config.getoption("--backends").split(","), scope="module")


@pytest.fixture(scope="session")
def graphs() -> dict[str, ModelGraph]:
    return {name: ModelGraph.from_file(models.model_path(name)) for name in SHIPPED}


@pytest.fixture()
def server_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real ``edge-server`` subprocess serving the digits models, on a free loopback port."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    for name in ("digits_resnet", "digits_resnet_exit", "digits_tiny"):
        (model_dir / f"{name}.tflite").write_bytes(models.model_path(name).read_bytes())
    log = tmp_path / "server.log"
    args = [sys.executable, "-m", "server", "--models", str(model_dir), "--host", "127.0.0.1", "--port", "0"]
    proc, port = start_logged(args, log)
    try:
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture()
def refused() -> Iterator[RefusedAddress]:
    """A loopback address where nothing listens, held for the test (no other server can take it)."""
    with RefusedAddress() as address:
        yield address


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    """A real in-process grpc.aio edge server of every shipped model, on port 0."""
    with BackgroundServer.from_files([models.model_path(name) for name in SHIPPED]) as srv:
        yield srv
