"""The A/B figure scripts print one positive number as their last line, as ``../shared/ab.sh`` reads.

Covered: ``bench/separate.py`` (``edge-server`` with its defaults and ``edge bench`` in separate
processes, each of two figures) and ``bench/pool_policy.py`` (each pool policy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.transport.failover import POLICIES

ROOT = Path(__file__).resolve().parents[2]


def _figure(*argv: str) -> float:
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("figure", ["e2e_ms", "queue_ms"])
def test_separate_prints_the_p50_of_the_figure_asked_for(figure: str) -> None:
    value = _figure(
        "bench/separate.py", "--model", "digits_resnet", "--cut", "6", "-n", "30", "--figure", figure
    )
    assert value > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_pool_policy_prints_microseconds_a_request(policy: str) -> None:
    assert _figure("bench/pool_policy.py", "--policy", policy, "-n", "500") > 0
