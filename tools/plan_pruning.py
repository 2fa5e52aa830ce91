#!/usr/bin/env python3
"""Does profiling only the candidate cuts change the planner's choice?

Profiles every head and tail of MODEL once, then plans over a grid of links, device slowdowns
and objectives twice: with the full profiles, and with only the candidate cuts' values kept
(the rest spread by per-operator weights, as ``edge plan`` does) and the choice limited to the
candidates. Prints how often the choice is the same, and the worst cost of the pruned choice
under the full profile relative to the full profile's best.

    python tools/plan_pruning.py edge/models/mobilenetv2_035.tflite
"""

from __future__ import annotations

import argparse
import itertools

from edge.graph import ModelGraph
from edge.link import LinkEstimate
from edge.measure import candidate_cuts, interpolate, operator_costs, profile_heads, profile_tails
from edge.planner import OBJECTIVES, cut_costs, plan
from edge.preprocess import random_inputs
from edge.runner import ModelRunner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    graph = ModelGraph.from_file(args.model)
    n = graph.num_operators
    runner = ModelRunner(graph, cache_size=64)
    full_head = profile_heads(runner, cuts=range(n + 1), progress=False, runs=args.runs, passes=1)
    full_tail = profile_tails(runner, cuts=range(n + 1), runs=args.runs, passes=1)
    candidates = candidate_cuts(graph)
    weights = operator_costs(runner, runner.activations(random_inputs(graph)))
    head = interpolate({k: full_head[k] for k in candidates}, weights)
    tail = interpolate({k: full_tail[k] for k in candidates if k < n} | {n: 0.0}, weights)
    same = total = 0
    worst = 1.0
    for mbit, rtt, slowdown, objective in itertools.product(
        [1, 10, 100, 1000], [1, 5, 40], [1, 4, 16, 64], OBJECTIVES
    ):
        link = LinkEstimate(rtt, mbit * 1000 / 8, 10, "fit")
        full = plan(cut_costs(graph, [h * slowdown for h in full_head], full_tail), link, objective=objective)
        pruned = plan(
            cut_costs(graph, [h * slowdown for h in head], tail),
            link,
            objective=objective,
            allowed=set(candidates),
        )
        total += 1
        same += full.choice == pruned.choice
        worst = max(
            worst, full.prediction(pruned.choice).score(objective) / max(full.chosen.score(objective), 1e-9)
        )
    print(
        f"{graph.source}: {len(candidates)} of {n + 1} cuts are candidates; same choice in {same}/{total} "
        f"scenarios; worst full-profile cost of the pruned choice {worst:.3f}x the best"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
