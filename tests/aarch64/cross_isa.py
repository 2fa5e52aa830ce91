"""An aarch64 device against an x86 server: how the offloaded result compares with the device's own
whole model, at every cut of the shipped int8 models (run by tests/aarch64/run.sh, inside the arm64
root under qemu).

Within one ISA and backend, head then tail equals the whole model bit for bit (the equivalence
tests). Across ISAs XNNPACK's int8 kernels requantize differently, so the tail computed on x86
may differ by a few quantization steps from the aarch64 whole model. This measures by how much:
the largest difference in int8 steps, and the share of outputs that agree exactly, with the top-1
class agreement for the classifiers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from edge import models
from edge.cooperative import CooperativeRunner, FixedSplit
from edge.graph import ModelGraph
from edge.preprocess import random_inputs
from edge.runner import ModelRunner
from edge.transport import TailClient

MODELS = ("digits_resnet", "mobilenetv2_035")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    p.add_argument("--json", type=Path)
    p.add_argument("--inputs", type=int, default=3)
    args = p.parse_args()
    report: dict[str, object] = {"device": platform.machine(), "models": {}}
    failed = False
    for name in MODELS:
        graph = ModelGraph.from_file(models.model_path(name))
        feeds = [random_inputs(graph, seed) for seed in range(args.inputs)]
        if name.startswith("digits"):
            sample = models.digits_sample()
            feeds += [{graph.inputs[0].name: sample.x[i : i + 1]} for i in range(args.inputs)]
        with ModelRunner(graph) as local:
            whole = [local.run(f) for f in feeds]
        rows = []
        client = TailClient(args.server, timeout_s=30)
        with CooperativeRunner(ModelRunner(graph), client, model_name=name, policy=1) as device:
            for k in range(1, graph.num_operators):
                device.policy = FixedSplit(k)
                steps, equal, total, top1 = 0, 0, 0, 0
                for f, want in zip(feeds, whole, strict=True):
                    result = device.infer(f)
                    if not result.offloaded:
                        print(f"{name} cut {k}: not offloaded: {result.fallback_reason}", file=sys.stderr)
                        failed = True
                        continue
                    for out, array in want.items():
                        got = result.outputs[out].astype(np.int64)
                        diff = np.abs(got - array.astype(np.int64))
                        steps = max(steps, int(diff.max()))
                        equal += int((diff == 0).sum())
                        total += diff.size
                        top1 += int(np.argmax(got) == np.argmax(array))
                rows.append({"cut": k, "max_steps": steps, "equal_share": equal / total if total else None,
                             "top1_agree": top1 / len(feeds)})  # fmt: skip
        whole_by_cut = max(r["max_steps"] for r in rows)
        report["models"][name] = {  # type: ignore[index]
            "cuts": len(rows),
            "max_steps": whole_by_cut,
            "exact_cuts": sum(r["max_steps"] == 0 for r in rows),
            "min_top1_agree": min(r["top1_agree"] for r in rows),
            "per_cut": rows,
        }
        print(
            f"{name}: {len(rows)} cuts offloaded from {platform.machine()}; largest difference from the "
            f"device's whole model {whole_by_cut} int8 steps; {sum(r['max_steps'] == 0 for r in rows)} cuts "
            f"exact; top-1 agreement at least {min(r['top1_agree'] for r in rows):.0%}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
