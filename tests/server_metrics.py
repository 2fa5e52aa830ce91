"""A real edge-server process with metrics, for the tests that count what it did."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from edge import models


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def serve_with_metrics(
    tmp_path: Path, *extra: str, model: str = "digits_resnet"
) -> tuple[subprocess.Popen[str], str, int, Path]:
    """A real server process with metrics, both on port 0, the ports read back from its log (a port
    picked free beforehand can be taken meanwhile): (process, metrics URL, gRPC port, log path)."""
    (tmp_path / f"{model}.tflite").write_bytes(models.model_path(model).read_bytes())
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--models", str(tmp_path), "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", *extra],
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    url = port = None
    while (url is None or port is None) and time.monotonic() < deadline and proc.poll() is None:
        text = log_path.read_text()
        found = re.search(r"metrics on (http://\S+/metrics)", text)
        url = found.group(1) if found else None
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        port = int(listening.group(1)) if listening else None
        time.sleep(0.05)
    if url is None or port is None:
        proc.kill()
        raise AssertionError(f"the server did not say where it listens: {log_path.read_text()[-2000:]}")
    return proc, url, port, log_path
