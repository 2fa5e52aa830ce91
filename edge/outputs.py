"""A model's outputs as real values, and a classifier's outputs as probabilities."""

from __future__ import annotations

import numpy as np

from .graph import TensorInfo

__all__ = ["dequantize", "is_distribution", "probabilities"]


def dequantize(array: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """Integer outputs to real values with the tensor's scale and zero point; others unchanged."""
    quant = tensor.quantization
    if quant is None or quant[0] == 0.0 or not np.issubdtype(array.dtype, np.integer):
        return np.asarray(array, dtype=np.float64)
    scale, zero_point = quant
    return (array.astype(np.float64) - zero_point) * scale


def is_distribution(values: np.ndarray) -> bool:
    """Whether ``values`` already form a distribution (a softmax output): every value in [0, 1],
    summing to 1 within an output's quantization."""
    return bool(
        values.size > 0 and values.min() >= 0.0 and values.max() <= 1.0 and abs(values.sum() - 1.0) <= 0.02
    )


def probabilities(values: np.ndarray) -> np.ndarray:
    """``values`` when they form a distribution, else their softmax (they are logits)."""
    if is_distribution(values):
        return values
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()
