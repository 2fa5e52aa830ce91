"""Quantize a float .tflite to static int8 (weights and activations) and measure what it changed.

The quantization itself is ai-edge-quantizer's (the ``quantize`` extra): it reads and writes
.tflite without TensorFlow. Calibration runs the float model on the user's samples; agreement is
then measured on samples held out of calibration, against the float model: top-1 agreement, and
the largest and mean absolute error of each output (the int8 outputs dequantized).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .backends import create_backend
from .errors import BackendUnavailableError, EdgeError, TensorFormatError
from .graph import ModelGraph
from .outputs import dequantize
from .preprocess import coerce_input

__all__ = ["QuantizeReport", "agreement", "quantize_static"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class QuantizeReport:
    """What quantizing changed, measured on held-out samples."""

    float_bytes: int
    int8_bytes: int
    calibration_samples: int
    held_out_samples: int
    top1_agreement: float | None
    """Share of held-out samples whose top-1 class is the float model's (None: no classifier output)."""
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per output: max_abs_error and mean_abs_error against the float model."""

    def as_dict(self) -> dict[str, object]:
        return {
            "float_bytes": self.float_bytes,
            "int8_bytes": self.int8_bytes,
            "size_ratio": self.int8_bytes / self.float_bytes if self.float_bytes else None,
            "calibration_samples": self.calibration_samples,
            "held_out_samples": self.held_out_samples,
            "top1_agreement": self.top1_agreement,
            "outputs": self.outputs,
        }


def quantize_static(graph: ModelGraph, calibration: Sequence[dict[str, np.ndarray]]) -> bytes:
    """``graph`` (float) as a static int8 model, calibrated on ``calibration`` (feeds by tensor name)."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as err:
        raise BackendUnavailableError(
            "edge quantize needs ai-edge-quantizer: pip install 'edge-coop[quantize]'"
        ) from err
    if not any(t.dtype.kind == "f" for t in graph.tensors if not t.is_constant):
        raise TensorFormatError(f"{graph.source} has no float activations: it is quantized already")
    signature, names = _signature(graph)
    q = quantizer.Quantizer(bytearray(graph.data), recipe.static_wi8_ai8())
    samples = [{names[name]: array for name, array in feeds.items()} for feeds in calibration]
    try:
        with warnings.catch_warnings():
            # Calibration keeps every tensor on purpose; the interpreter warns that this is for debugging.
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            result = q.calibrate({signature: samples}, num_threads=1)
        quantized = q.quantize(result, enable_progress_report=False).quantized_model
    except (ValueError, RuntimeError, KeyError) as err:
        raise EdgeError(f"ai-edge-quantizer could not quantize {graph.source}: {err}") from err
    if quantized is None:
        raise EdgeError(f"ai-edge-quantizer returned no model for {graph.source}")
    return bytes(quantized)


def agreement(
    float_graph: ModelGraph, int8_graph: ModelGraph, samples: Sequence[dict[str, np.ndarray]]
) -> tuple[float | None, dict[str, dict[str, float]]]:
    """Top-1 agreement over ``samples`` (float feeds by tensor name), and each output's errors."""
    by_name = {t.name: t for t in int8_graph.inputs}
    outs = {t.name: t for t in int8_graph.outputs}
    errors: dict[str, list[float]] = {name: [] for name in outs}
    maxima: dict[str, float] = dict.fromkeys(outs, 0.0)
    agree = 0
    classifier = [t.name for t in float_graph.outputs if int(np.prod(t.shape)) > 1]
    with create_backend("litert", float_graph.data) as f32, create_backend("litert", int8_graph.data) as i8:
        for feeds in samples:
            want = f32.run(feeds)
            got = i8.run({name: coerce_input(array, by_name[name]) for name, array in feeds.items()})
            for name, tensor in outs.items():
                if name not in want:
                    raise TensorFormatError(f"the quantized model's output {name!r} is not the float model's")
                diff = np.abs(
                    dequantize(got[name], tensor).astype(np.float64) - want[name].astype(np.float64)
                )
                errors[name].append(float(diff.mean()))
                maxima[name] = max(maxima[name], float(diff.max()))
            if classifier:
                first = classifier[0]
                agree += int(np.argmax(want[first]) == np.argmax(dequantize(got[first], outs[first])))
    report = {
        name: {
            "max_abs_error": maxima[name],
            "mean_abs_error": float(np.mean(errors[name])) if errors[name] else 0.0,
        }
        for name in outs
    }
    return (agree / len(samples) if classifier and samples else None), report


def _signature(graph: ModelGraph) -> tuple[str, dict[str, str]]:
    """The model's signature key, and its input names by tensor name (the quantizer feeds signatures)."""
    for sig in graph.model.signatureDefs or []:
        key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
        sub = graph.model.subgraphs[0]
        names = {}
        for entry in sig.inputs or []:
            tensor = sub.tensors[entry.tensorIndex].name
            names[tensor.decode() if isinstance(tensor, bytes) else tensor] = (
                entry.name.decode() if isinstance(entry.name, bytes) else entry.name
            )
        if set(names) == {t.name for t in graph.inputs}:
            return key or "serving_default", names
    raise TensorFormatError(f"{graph.source} has no signature naming its inputs; ai-edge-quantizer needs one")
