"""The PM QoS hold behind --cpu-latency-us: the kernel sees the request while it is held, and bad
set-ups give one clear error. Holding needs root and /dev/cpu_dma_latency; CI runs as root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.cpu_latency import PM_QOS_PATH, CPULatencyHold, current_cpu_latency_us
from edge.errors import ConfigError

needs_pm_qos = pytest.mark.skipif(
    not PM_QOS_PATH.exists() or not os.access(PM_QOS_PATH, os.W_OK),
    reason="needs root and /dev/cpu_dma_latency",
)


@needs_pm_qos
def test_the_kernel_keeps_the_request_while_it_is_held() -> None:
    before = current_cpu_latency_us()
    wanted = 7 if before > 7 else max(before - 1, 0)
    with CPULatencyHold(wanted) as hold:
        assert hold.active
        assert current_cpu_latency_us() == min(before, wanted)
    assert not hold.active
    assert current_cpu_latency_us() == before


def test_a_missing_device_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        CPULatencyHold(0, path=tmp_path / "cpu_dma_latency")


def test_an_unwritable_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        CPULatencyHold(0, path=tmp_path)  # a directory


@pytest.mark.parametrize("value", [-1, 2_000_000_001])
def test_out_of_range_latency_is_refused(value: int) -> None:
    with pytest.raises(ConfigError, match=r"0\.\.2000000000"):
        CPULatencyHold(value)


def test_edge_server_reports_a_bad_value_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "m.tflite").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--models", str(tmp_path), "--cpu-latency-us", "-5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "edge-server: error: argument --cpu-latency-us: -5 is below the minimum, 0 (see edge-server --help)"
    ]
