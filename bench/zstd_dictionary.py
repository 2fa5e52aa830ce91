#!/usr/bin/env python3
"""Does a zstd dictionary trained on calibration activations beat plain zstd on the raw cut?

For each shipped model and each inner cut: train a zstd dictionary (8 kB) on the cut tensors of
the first half of the samples, then compress the other half's with and without it, at the level
the raw path uses (1). Prints, per model, the median compression ratio over its cuts, with and
without the dictionary, and the best cut's gain. The digits models run on the shipped held-out
digits, shapes_cnn on shapes drawn from its held-out seed, mobilenetv2_035 (random weights) on
seeded random images, at every 4th cut.

    python bench/zstd_dictionary.py [--samples 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import zstandard

from edge import models
from edge.graph import ModelGraph
from edge.preprocess import random_inputs
from edge.runner import ModelRunner

REPO = Path(__file__).resolve().parents[1]
DICTIONARY_BYTES = 8192
LEVEL = 1


def _feeds(graph: ModelGraph, name: str, count: int) -> list[dict[str, np.ndarray]]:
    tensor = graph.inputs[0]
    if name.startswith("digits"):
        sample = models.digits_sample()
        x = sample.x if tensor.dtype == np.int8 else sample.x_float
    elif name == "shapes_cnn":
        sys.path.insert(0, str(REPO / "tools"))
        import shapes_data

        images, _ = shapes_data.make(count, 20240614)
        x = np.clip(np.round(images * 255) - 128, -128, 127).astype(np.int8)
    else:
        return [random_inputs(graph, seed) for seed in range(count)]
    return [{tensor.name: x[i : i + 1]} for i in range(min(count, len(x)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    plain = zstandard.ZstdCompressor(level=LEVEL)
    print(f"{'model':<20} {'cuts':>4} {'zstd':>6} {'+dict':>6} {'best cut, dict/zstd':>20}")
    for name in ("digits_resnet", "digits_resnet_f32", "digits_tiny", "shapes_cnn", "mobilenetv2_035"):
        graph = ModelGraph.from_file(models.model_path(name))
        count = args.samples if name != "mobilenetv2_035" else 40
        step = 4 if name == "mobilenetv2_035" else 1
        with ModelRunner(graph) as runner:
            activations = [runner.activations(feed) for feed in _feeds(graph, name, count)]
        half = len(activations) // 2
        with_dict, without, gains = [], [], []
        for cut in graph.cuts()[1:-1:step]:
            train = [a[t.name].tobytes() for a in activations[:half] for t in cut.tensors]
            test = [a[t.name].tobytes() for a in activations[half:] for t in cut.tensors]
            raw = sum(map(len, test))
            dictionary = zstandard.train_dictionary(DICTIONARY_BYTES, train)
            trained = zstandard.ZstdCompressor(level=LEVEL, dict_data=dictionary)
            # What the raw path sends: a tensor compressed only when that makes it smaller.
            sent_plain = sum(min(len(b), len(plain.compress(b))) for b in test)
            sent_dict = sum(min(len(b), len(trained.compress(b))) for b in test)
            without.append(raw / sent_plain)
            with_dict.append(raw / sent_dict)
            gains.append(sent_plain / sent_dict)
        print(
            f"{name:<20} {len(gains):>4} {statistics.median(without):>6.2f} {statistics.median(with_dict):>6.2f} "
            f"{max(gains):>20.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
