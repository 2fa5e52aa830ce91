"""Build the split policy a user asked for: a fixed cut, or ``auto``."""

from __future__ import annotations

from typing import Literal

from .cooperative import FixedSplit, SplitPolicy
from .errors import CutError
from .graph import ModelGraph
from .runner import ModelRunner
from .transport import TailClient

__all__ = ["Objective", "make_policy"]

Objective = Literal["latency", "energy", "bytes"]


def make_policy(
    graph: ModelGraph,
    spec: str | int | None,
    *,
    runner: ModelRunner | None = None,
    client: TailClient | None = None,
    model_name: str | None = None,
    objective: Objective = "latency",
    deadline_ms: float | None = None,
    max_bytes: int | None = None,
) -> SplitPolicy:
    """``spec``: a cut index, a tensor name (cut right after it), ``"auto"``, or None for the middle cut."""
    if spec is None:
        return FixedSplit(graph.num_operators // 2)
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        raise CutError("--split-at auto needs the planner, which this build does not have")
    return FixedSplit(graph.resolve_cut(spec))
