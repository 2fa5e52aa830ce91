"""The A/B figure scripts print one positive number as their last line, as ``../shared/ab.sh`` reads.

Covered: ``bench/separate.py`` (``edge-server`` with its defaults and ``edge bench`` in separate
processes, each of two figures), ``bench/pool_policy.py`` (each pool policy) and ``bench/calls.py``
(each side's calls a request, and their sum).
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


def test_calls_counts_each_sides_python_calls_a_request() -> None:
    done = subprocess.run(
        [sys.executable, "bench/calls.py", "--model", "digits_resnet", "--cut", "6", "-n", "30"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    sides = {line.split(":")[0]: float(line.split()[1]) for line in lines[:-1]}
    assert set(sides) == {"device", "server"}
    # Each side's request path is tens of calls at least (converters, transport or data plane, runner):
    # a count near 0 would mean the runs were not told apart, or a side was not profiled.
    assert sides["device"] > 30 and sides["server"] > 30, sides
    # Each of the three is printed rounded to 0.1, so within 0.05 of its exact value: the printed sum
    # and the sum of the printed sides differ by at most 0.15 (0.1 did not hold: 282.3 against 182.0 + 100.2).
    assert abs(float(lines[-1]) - (sides["device"] + sides["server"])) <= 0.15 + 1e-9
