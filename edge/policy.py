"""Build the split policy a user asked for: a fixed cut, or ``auto``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .autosplit import AutoSplit
from .cooperative import FixedSplit, SplitPolicy
from .errors import CutError
from .graph import ModelGraph
from .planner import Objective
from .runner import ModelRunner
from .transport import TailTransport

__all__ = ["Objective", "make_policy"]


def make_policy(
    graph: ModelGraph,
    spec: str | int | None,
    *,
    runner: ModelRunner | None = None,
    client: TailTransport | None = None,
    model_name: str | None = None,
    objective: Objective = "latency",
    deadline_ms: float | None = None,
    max_bytes: int | None = None,
    **auto_options: Any,
) -> SplitPolicy:
    """``spec``: a cut index, a tensor name (cut right after it), ``"auto"``, or None for the middle cut.

    ``auto`` returns an :class:`~edge.planner.AutoSplit`; ``auto_options`` go to it (for example
    ``compute_watts``, ``radio_watts``, ``margin``, ``patience``, ``profile_label``, ``progress``).
    """
    if spec is None:
        return FixedSplit(graph.num_operators // 2)
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        if runner is None:
            raise CutError("--split-at auto needs the device's runner to profile the model")
        return AutoSplit.connect(
            runner,
            client,
            model_name=model_name or Path(graph.source).stem,
            objective=objective,
            deadline_ms=deadline_ms,
            max_bytes=max_bytes,
            **auto_options,
        )
    return FixedSplit(graph.resolve_cut(spec))
