"""bench/ab.py's interval of the rounds' own ratios: what an A/B can resolve on this machine.

Covered: equal ratios give a point; the interval holds the rounds' median and lies within their
range; the same rounds give the same interval; rounds that spread more give a wider one.
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ab() -> object:
    spec = importlib.util.spec_from_file_location("ab", ROOT / "bench" / "ab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_interval_holds_the_median_and_widens_with_the_spread() -> None:
    interval = _ab().interval  # type: ignore[attr-defined]
    assert interval([1.1] * 7) == (1.1, 1.1)
    noisy = [1.0, 1.07, 1.11, 1.19, 1.33, 1.2, 1.11, 1.23, 1.11, 0.93, 1.07]
    low, high = interval(noisy)
    assert min(noisy) <= low <= statistics.median(noisy) <= high <= max(noisy)
    assert interval(noisy) == (low, high)
    tight = [1.1 + (r - 1.1) / 10 for r in noisy]
    t_low, t_high = interval(tight)
    assert t_high - t_low < high - low
