"""What the server does with each kind of entry in its model directory.

Covered: a FIFO and a device are skipped without being opened for reading (no hang, no endless
read); a file over the size limit is skipped before it is read; a file without the TFLite
header is skipped after reading 8 bytes; a symlink inside the directory is served, one pointing
outside is skipped; the suffix is matched whatever its case; one bad file leaves the others
served; a directory with nothing servable is one error naming what was skipped and why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge import models
from edge.errors import ConfigError, ModelNotFoundError
from server.repository import ModelRepository

GOOD = models.model_path("digits_tiny").read_bytes()


def _served(root: Path, **options: int) -> list[str]:
    repository = ModelRepository.from_directory(root, **options)
    try:
        return sorted(m.name for m in repository)
    finally:
        repository.close()


def test_every_dangerous_entry_is_skipped_and_the_rest_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "good.tflite").write_bytes(GOOD)
    (root / "upper.TFLITE").write_bytes(GOOD)
    os.mkfifo(root / "fifo.tflite")
    (root / "zero.tflite").symlink_to("/dev/zero")
    with (root / "sparse.tflite").open("wb") as f:
        f.truncate(2 * 1024**3)  # 2 GiB, almost no disk
    (root / "garbage.tflite").write_bytes(b"not a model at all" * 10)
    outside = tmp_path / "elsewhere.tflite"
    outside.write_bytes(GOOD)
    (root / "outside.tflite").symlink_to(outside)
    (root / "inside.tflite").symlink_to(root / "good.tflite")
    (root / "notes.txt").write_text("ignored: not a model suffix")
    with caplog.at_level("WARNING", logger="server.repository"):
        served = _served(root, max_model_bytes=64 * 1024 * 1024)
    assert served == ["good", "inside", "upper"]
    reasons = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records}
    assert "not a regular file" in reasons["skipping fifo.tflite"]
    assert "not a regular file" in reasons["skipping zero.tflite"]
    assert "2,147,483,648 bytes; the limit is 67,108,864" in reasons["skipping sparse.tflite"]
    assert "no TFL3 identifier" in reasons["skipping garbage.tflite"]
    assert "outside the model directory" in reasons["skipping outside.tflite"]
    assert len(caplog.records) == 5


def test_nothing_servable_is_one_error_naming_why(tmp_path: Path) -> None:
    (tmp_path / "bad.tflite").write_bytes(b"x" * 100)
    with pytest.raises(
        ConfigError, match=r"holds no servable \.tflite file; skipped bad\.tflite \(not a TFLite"
    ):
        _served(tmp_path)


def test_a_refresh_serves_added_models_swaps_replaced_ones_and_drops_removed_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge.graph import ModelGraph
    from edge.preprocess import random_inputs

    resnet = models.model_path("digits_resnet").read_bytes()
    (tmp_path / "a.tflite").write_bytes(GOOD)
    repository = ModelRepository.from_directory(tmp_path)
    try:
        old = repository.get("a")
        assert repository.refresh() == []
        (tmp_path / "b.tflite").write_bytes(resnet)
        assert repository.refresh() == ["b"]
        assert repository.get("b").graph.sha256 == ModelGraph(resnet).sha256
        (tmp_path / "a.tflite").write_bytes(resnet)  # replaced: another model under the same name
        assert repository.refresh() == ["a"]
        assert repository.get("a").graph.sha256 == ModelGraph(resnet).sha256
        # A request that took the old model before the swap finishes on it.
        x = random_inputs(old.graph, seed=0)
        assert old.runner.run(x)
        (tmp_path / "b.tflite").unlink()
        (tmp_path / "c.tflite").write_bytes(b"garbage" * 20)
        assert repository.refresh() == ["b"]
        with pytest.raises(ModelNotFoundError):
            repository.get("b")
        # A bad replacement keeps the model that was there, and a bad file is said once, not at every look.
        (tmp_path / "a.tflite").write_bytes(b"not a model either" * 10)
        assert repository.refresh() == []
        assert repository.get("a").graph.sha256 == ModelGraph(resnet).sha256
        caplog.clear()
        with caplog.at_level("WARNING", logger="server.repository"):
            for _ in range(3):
                repository.refresh()
        assert not caplog.records
    finally:
        repository.close()


def test_edge_server_watches_its_directory(tmp_path: Path) -> None:
    import sys
    import time

    from edge.transport import TailClient
    from helpers import start_logged

    (tmp_path / "a.tflite").write_bytes(GOOD)
    proc, port = start_logged(
        [sys.executable, "-m", "server", "--models", str(tmp_path), "--host", "127.0.0.1", "--port", "0",
         "--watch", "0.2"],
        tmp_path.parent / f"{tmp_path.name}-server.log",
    )  # fmt: skip
    try:
        with TailClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:
            (tmp_path / "b.tflite").write_bytes(models.model_path("digits_resnet").read_bytes())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    client.model_metadata("b")
                    break
                except Exception:
                    time.sleep(0.1)
            assert client.model_metadata("b").name == "b"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
