"""Summaries of timing samples: medians and tail percentiles."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["summary"]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """p50, p90 and p99 (and the mean) of ``samples``, rounded to microseconds."""
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    values = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(values.mean()), 3),
    }
