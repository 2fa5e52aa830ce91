#!/usr/bin/env python3
"""Held-out accuracy through the lossy codecs, against lossless, at every inner cut.

The 200 shipped held-out digits go head -> codec -> tail on this machine (the codec's own
encode and decode, as the wire does): fp16 on digits_resnet_f32's cuts, int4 on digits_resnet's.
For each cut: the accuracy, the share of answers that changed class, and the bytes against raw.

    python bench/lossy_accuracy.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge import models
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.wire import decode, encode, encodings


def measure(name: str, codec: str) -> list[dict[str, float]]:
    graph = ModelGraph.from_file(models.model_path(name))
    sample = models.digits_sample()
    x = sample.x_float if graph.inputs[0].dtype == np.float32 else sample.x
    rows = []
    with ModelRunner(graph) as runner:
        output = graph.outputs[0].name
        lossless = [
            int(np.argmax(runner.run({graph.inputs[0].name: x[i : i + 1]})[output])) for i in range(len(x))
        ]
        for k in range(1, graph.num_operators):
            correct = changed = sent = raw = 0
            for i in range(len(x)):
                head = runner.run_head(k, {graph.inputs[0].name: x[i : i + 1]})
                packed = {t: encodings.compress(encode(t, a), codec) for t, a in head.cut.items()}
                sent += sum(p.nbytes for p in packed.values())
                raw += sum(a.nbytes for a in head.cut.values())
                label = int(np.argmax(runner.run_tail(k, {t: decode(p) for t, p in packed.items()})[output]))
                correct += label == int(sample.y[i])
                changed += label != lossless[i]
            n = len(x)
            rows.append(
                {"cut": k, "accuracy": correct / n, "changed": changed / n, "bytes_ratio": sent / raw}
            )
        reference = float(np.mean(np.array(lossless) == sample.y))
    for row in rows:
        row["lossless_accuracy"] = reference
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    report = {
        "fp16 on digits_resnet_f32": measure("digits_resnet_f32", "fp16"),
        "int4 on digits_resnet": measure("digits_resnet", "int4"),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for title, rows in report.items():
        worst = min(rows, key=lambda r: r["accuracy"])
        changed = max(r["changed"] for r in rows)
        ratios = [r["bytes_ratio"] for r in rows]
        print(
            f"{title}: lossless {rows[0]['lossless_accuracy']:.1%}; through the codec {min(r['accuracy'] for r in rows):.1%}"
            f"-{max(r['accuracy'] for r in rows):.1%} over {len(rows)} cuts (worst at cut {worst['cut']}), "
            f"at most {changed:.1%} of answers changed; bytes {min(ratios):.2f}-{max(ratios):.2f}x raw"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
