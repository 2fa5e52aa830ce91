"""The sweep's verdict per scenario (pure arithmetic) and its figure (matplotlib)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Summary", "plot", "summarize"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Summary:
    """How the planner's cut fared against the best measured one, and against either extreme."""

    scenario: str
    chosen: int
    chosen_ms: float
    best: int
    best_ms: float
    ratio: float
    """chosen_ms / best_ms: 1.0 means the planner found the best cut."""
    device_only_ms: float
    server_only_ms: float
    speedup_vs_device: float
    speedup_vs_server: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(scenario: str, result: Mapping[str, Any]) -> Summary:
    """Compare the choice with the best fully measured cut (pruned cuts were slower than the best by design)."""
    cuts = {int(c["index"]): c for c in result["cuts"]}
    n = int(result["num_operators"])
    full = [c for c in cuts.values() if not c["pruned"] and not c["fallbacks"]]
    if not full:
        raise ValueError(f"{scenario}: no cut was measured fully")
    best = min(full, key=lambda c: float(c["median_ms"]))
    choice = int(result["choice"])
    chosen_ms = float(cuts[choice]["median_ms"])
    best_ms = float(best["median_ms"])
    device_ms = float(cuts[n]["median_ms"])
    server_ms = float(cuts[0]["median_ms"])
    return Summary(
        scenario=scenario,
        chosen=choice,
        chosen_ms=chosen_ms,
        best=int(best["index"]),
        best_ms=best_ms,
        ratio=chosen_ms / best_ms,
        device_only_ms=device_ms,
        server_only_ms=server_ms,
        speedup_vs_device=device_ms / chosen_ms,
        speedup_vs_server=server_ms / chosen_ms,
    )


def plot(scenarios: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> None:
    """One panel per scenario: measured median vs cut, the planner's prediction, the choice, both extremes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    count = len(scenarios)
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False, sharex=True)
    for ax, scenario in zip(axes.flat[:count], scenarios, strict=True):
        result = scenario["result"]
        n = int(result["num_operators"])
        cuts = result["cuts"]
        full = [c for c in cuts if not c["pruned"]]
        pruned = [c for c in cuts if c["pruned"]]
        predicted = result["predicted"]
        ax.plot(
            [p["index"] for p in predicted],
            [p["predicted_ms"] for p in predicted],
            color="tab:blue", lw=1.2, label="predicted",
        )  # fmt: skip
        ax.plot(
            [c["index"] for c in full], [c["median_ms"] for c in full],
            "o", ms=3.5, color="tab:orange", label="measured median",
        )  # fmt: skip
        if pruned:
            ax.plot(
                [c["index"] for c in pruned], [c["median_ms"] for c in pruned],
                "o", ms=3.5, mfc="none", color="tab:orange", alpha=0.7, label="measured (pilots only)",
            )  # fmt: skip
        summary = scenario["summary"]
        ax.axvline(summary["chosen"], color="tab:green", lw=1.5, ls="--", label="chosen")
        ax.plot([summary["best"]], [summary["best_ms"]], "*", ms=11, color="tab:red", label="best measured")
        ax.annotate("device only", (n, summary["device_only_ms"]), fontsize=7, ha="right", va="bottom")
        ax.annotate("server only", (0, summary["server_only_ms"]), fontsize=7, ha="left", va="bottom")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(scenario["label"], fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
        ax.text(
            0.98, 0.97, f"chosen K={summary['chosen']}, best K={summary['best']}, ratio {summary['ratio']:.2f}",
            transform=ax.transAxes, ha="right", va="top", fontsize=7,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.8", "alpha": 0.9},
        )  # fmt: skip
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("cut K (operators on the device)")
    for ax in axes[:, 0]:
        ax.set_ylabel("latency, ms (log)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(title, fontsize=10, y=1.03)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    logger.info("wrote %s", path)
