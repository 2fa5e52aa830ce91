#!/usr/bin/env python3
"""Does a lossy codec pay on a slow link? The planner's lossy choice against the best lossless plan.

Reads the JSON of ``edge bench sweep`` runs over the same scenarios: one or more lossless ones
(``--codec raw``, ``--codec zstd``) and one with a lossy codec (a calibrated CODEC.json). For each
scenario it takes the best measured end-to-end latency over every cut of every lossless run (the
device alone included), and the measured latency of the cut the planner chose under the lossy
codec, and prints their ratio. ``lossless offloads`` says whether the best lossless plan sends
anything at all.

    sudo edge bench sweep --model shapes128 --bandwidths 1 --rtts 20 --slowdowns 64,256,1024 --name raw
    sudo edge bench sweep ... --codec zstd --name zstd
    sudo edge bench sweep ... --codec shapes128.json --name lossy
    python bench/slow_link.py --lossless sweep-results/raw.json sweep-results/zstd.json \\
        --lossy sweep-results/lossy.json [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _scenarios(path: Path) -> dict[str, dict[str, Any]]:
    report = json.loads(path.read_text())
    return {s["key"]: {**s, "model": report["model"]} for s in report["scenarios"]}


def _measured(result: dict[str, Any]) -> dict[int, float]:
    """Each fully measured cut's median end-to-end ms (pruned and fallen-back cuts left out)."""
    return {
        int(c["index"]): float(c["median_ms"])
        for c in result["cuts"]
        if not c["pruned"] and not c["fallbacks"]
    }


def compare(lossless: list[Path], lossy: Path) -> list[dict[str, Any]]:
    runs = {path.stem: _scenarios(path) for path in lossless}
    coded = _scenarios(lossy)
    rows = []
    for key, scenario in coded.items():
        result = scenario["result"]
        n = int(result["num_operators"])
        best: tuple[float, int, str] | None = None
        for name, run in runs.items():
            if key not in run:
                raise SystemExit(f"{key}: not in the lossless run {name}")
            if run[key]["model"] != scenario["model"]:
                raise SystemExit(f"{name} measured {run[key]['model']}, the lossy run {scenario['model']}")
            for cut, ms in _measured(run[key]["result"]).items():
                if best is None or ms < best[0]:
                    best = (ms, cut, name)
        assert best is not None
        choice = int(result["choice"])
        chosen_ms = _measured(result).get(choice)
        if chosen_ms is None:
            raise SystemExit(f"{key}: the lossy run's chosen cut {choice} was not measured fully")
        rows.append({
            "scenario": key,
            "lossless_best_ms": round(best[0], 2),
            "lossless_best_cut": best[1],
            "lossless_best_run": best[2],
            "lossless_offloads": best[1] != n,
            "lossy_choice": choice,
            "lossy_choice_coded": bool(result.get("choice_coded")),
            "lossy_choice_ms": round(chosen_ms, 2),
            "speedup": round(best[0] / chosen_ms, 3),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lossless", type=Path, nargs="+", required=True, help="sweep JSON of lossless runs")
    parser.add_argument(
        "--lossy", type=Path, required=True, help="sweep JSON of the run with the lossy codec"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    rows = compare(args.lossless, args.lossy)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'scenario':<20} {'best lossless':>22} {'lossy plan':>20} {'speedup':>8}")
    for r in rows:
        lossless = f"K={r['lossless_best_cut']} {r['lossless_best_run']} {r['lossless_best_ms']:.1f} ms"
        lossy = f"K={r['lossy_choice']} {'coded' if r['lossy_choice_coded'] else 'raw'} {r['lossy_choice_ms']:.1f} ms"
        print(f"{r['scenario']:<20} {lossless:>22} {lossy:>20} {r['speedup']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
