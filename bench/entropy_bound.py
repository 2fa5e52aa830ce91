#!/usr/bin/env python3
"""Would a static-prior range coder beat zstd on a calibrated codec's codes? Its bound, measured.

For each cut, a codec is calibrated on the first half of the shipped digits (``--max-loss``, as
``edge codec calibrate`` does). On the other half, each request's frame is what a device sends once
the server holds the codec's table (its id, not the table), and it is set against the least any
coder with a static prior could send: the header and table id, plus the codes' cross-entropy under
per-channel code frequencies counted on the calibration half (add-one smoothed). A range coder
gets within a few bytes of that bound; it cannot go below it.

    python bench/entropy_bound.py                 # digits_resnet at cuts 12, 13 and 14
    python bench/entropy_bound.py --cuts 8 12 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge import models  # noqa: E402
from edge.codec import calibrate  # noqa: E402
from edge.graph import ModelGraph  # noqa: E402
from edge.runner import ModelRunner  # noqa: E402
from edge.wire.calibrated import ID_BYTES, ChannelCodec  # noqa: E402

HEADER = 4
"""A frame's format, flags and channel count, ahead of the table id."""


def codes(codec: ChannelCodec, values: np.ndarray) -> np.ndarray:
    """The codes a frame carries for ``values``: one row per kept channel (as ``ChannelCodec.encode``)."""
    kept = np.flatnonzero(np.array(codec.kept, dtype=bool))
    lo = np.array(codec.lo, dtype=np.float64)[kept]
    span = np.array(codec.hi, dtype=np.float64)[kept] - lo
    top = (1 << codec.bits) - 1
    x = values.reshape(-1, codec.channels)[:, kept].astype(np.float64)
    scale = np.divide(top, span, out=np.zeros_like(span), where=span > 0)
    return np.clip(np.rint((x - lo) * scale), 0, top).astype(np.int64).T


def prior(codec: ChannelCodec, samples: list[np.ndarray]) -> np.ndarray:
    """Per kept channel, the log2 probability of each code, counted on ``samples`` (add-one)."""
    levels = 1 << codec.bits
    counts = np.ones((int(np.count_nonzero(codec.kept)), levels))
    for values in samples:
        rows = codes(codec, values)
        for channel, row in enumerate(rows):
            counts[channel] += np.bincount(row, minlength=levels)
    return np.log2(counts / counts.sum(axis=1, keepdims=True))


def bound(codec: ChannelCodec, logp: np.ndarray, values: np.ndarray) -> float:
    """The fewest bytes a static-prior coder could send ``values`` in."""
    rows = codes(codec, values)
    bits = -sum(float(logp[channel, row].sum()) for channel, row in enumerate(rows))
    return HEADER + ID_BYTES + bits / 8


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits_resnet")
    p.add_argument("--cuts", type=int, nargs="+", default=[12, 13, 14])
    p.add_argument("--max-loss", type=float, default=1.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    graph = ModelGraph.from_file(models.model_path(args.model))
    sample = models.digits_sample()
    half = len(sample.x) // 2
    name = graph.inputs[0].name
    feeds = [{name: sample.x[i : i + 1]} for i in range(len(sample.x))]
    rows = []
    with ModelRunner(graph) as runner:
        for k in args.cuts:
            print(f"calibrating cut {k} ...", file=sys.stderr, flush=True)
            found = calibrate(runner, feeds[:half], sample.y[:half], [k], max_loss_pp=args.max_loss)
            cut = found.cuts[k]
            if cut.chosen is None:
                rows.append({"cut": k, "codec": None})
                continue
            heads = [runner.run_head(k, feed).cut for feed in feeds]
            for tensor, codec in cut.tensors.items():
                logp = prior(codec, [h[tensor] for h in heads[:half]])
                held = [h[tensor] for h in heads[half:]]
                zstd = statistics.mean(len(codec.encode(v, inline=False)) for v in held)
                least = statistics.mean(bound(codec, logp, v) for v in held)
                rows.append({
                    "cut": k, "tensor": tensor, "bits": codec.bits, "raw_bytes": int(held[0].nbytes),
                    "zstd_bytes": round(zstd, 1), "bound_bytes": round(least, 1),
                    "bound_over_zstd": round(least / zstd, 3),
                })  # fmt: skip
    if args.json:
        print(json.dumps({"model": args.model, "max_loss_pp": args.max_loss, "rows": rows}))
        return 0
    print(
        f"{args.model}, calibrated on {half} digits within {args.max_loss:g} pp, mean over the other {half}"
    )
    print(f"{'cut':>4} {'tensors':>7} {'raw B':>7} {'zstd B':>7} {'bound B':>8} {'bound/zstd':>10}")
    for k in args.cuts:
        mine = [row for row in rows if row["cut"] == k and "tensor" in row]
        if not mine:
            print(f"{k:>4}  no codec within the loss")
            continue
        raw, zstd, least = (
            sum(float(row[key]) for row in mine) for key in ("raw_bytes", "zstd_bytes", "bound_bytes")
        )
        print(f"{k:>4} {len(mine):>7} {raw:>7.0f} {zstd:>7.1f} {least:>8.1f} {least / zstd:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
