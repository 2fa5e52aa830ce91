"""``edge quantize FLOAT.tflite --data CAL.npz --out INT8.tflite``: static int8, and what it changed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..argtypes import positive_float
from ..errors import ConfigError, TensorFormatError
from ..fileio import load_arrays, write_atomic
from ..graph import ModelGraph
from ..preprocess import check_finite
from ..quantize import QuantizeReport, agreement, quantize_static
from .common import MODEL_HELP, load_graph

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a float model to static int8 (needs the quantize extra)",
        description="Quantize MODEL (float) to static int8 weights and activations with ai-edge-quantizer, "
        "calibrated on CAL.npz, then report its agreement with the float model on the samples held out of "
        "calibration: top-1 agreement, the largest and mean error of each output, and both sizes.",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="CAL.npz",
        help="float samples: x for a one-input model, else one array per input named after it; the leading "
        "dimension counts samples",
    )
    p.add_argument("--out", required=True, type=Path, metavar="INT8.tflite", help="where to write the model")
    p.add_argument(
        "--held-out",
        type=_share,
        default=0.25,
        metavar="SHARE",
        help="the share of the samples kept out of calibration to measure agreement on (default 0.25)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _share(text: str) -> float:
    value = positive_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"a share is between 0 and 1, not {text}")
    return value


def load_samples(path: Path, graph: ModelGraph) -> list[dict[str, np.ndarray]]:
    """One float feed per sample, by input tensor name, from an .npz."""
    arrays = load_arrays(path)
    if len(graph.inputs) == 1 and "x" in arrays:
        arrays = {graph.inputs[0].name: arrays["x"]}
    missing = [t.name for t in graph.inputs if t.name not in arrays]
    if missing:
        raise TensorFormatError(
            f"{path}: no array for input(s) {', '.join(missing)} (has {', '.join(arrays)})"
        )
    count = {len(arrays[t.name]) for t in graph.inputs}
    if len(count) != 1 or 0 in count:
        raise TensorFormatError(f"{path}: the inputs must hold one same, non-zero number of samples")
    samples = []
    for i in range(count.pop()):
        feeds = {}
        for t in graph.inputs:
            array = np.asarray(arrays[t.name][i : i + 1])
            if array.dtype.kind != "f" or array.shape[1:] != t.shape[1:]:
                raise TensorFormatError(
                    f"{path}: {t.name} must be float samples of shape {list(t.shape[1:])}, "
                    f"got {array.dtype.name}{list(array.shape[1:])}"
                )
            check_finite(array, t)
            feeds[t.name] = array.astype(t.dtype)
        samples.append(feeds)
    return samples


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.model)
    if args.out.exists() and args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; name the .tflite file to write")
    samples = load_samples(args.data, graph)
    held = max(1, round(len(samples) * args.held_out))
    if len(samples) - held < 1:
        raise TensorFormatError(f"{args.data}: {len(samples)} sample(s) leave none to calibrate on")
    calibration, held_out = samples[:-held], samples[-held:]
    data = quantize_static(graph, calibration)
    int8 = ModelGraph(data, source=str(args.out))
    top1, outputs = agreement(graph, int8, held_out)
    write_atomic(args.out, data)
    report = QuantizeReport(len(graph.data), len(data), len(calibration), len(held_out), top1, outputs)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print(
        f"wrote {args.out}: {len(data):,} bytes ({len(data) / len(graph.data):.2f}x the float "
        f"{len(graph.data):,}), calibrated on {len(calibration)} samples"
    )
    if top1 is not None:
        print(f"top-1 agreement with the float model on {len(held_out)} held-out samples: {top1:.1%}")
    for name, err in outputs.items():
        print(f"  {name}: max |error| {err['max_abs_error']:.4g}, mean {err['mean_abs_error']:.4g}")
    return 0
