"""Turn user data into the exact tensor a model input takes: batch dimension, dtype, quantization."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .errors import TensorFormatError
from .graph import ModelGraph, TensorInfo

__all__ = ["coerce_input", "quantize", "random_inputs", "random_tensors"]


def quantize(values: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """Real values to ``tensor``'s integer type: round(x / scale) + zero_point, saturated."""
    quant = tensor.quantization
    if quant is None or quant[0] == 0.0:
        raise TensorFormatError(f"input {tensor.name!r} is {tensor.dtype.name} with no quantization to apply")
    scale, zero_point = quant
    info = np.iinfo(tensor.dtype)
    q = np.round(np.asarray(values, dtype=np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(tensor.dtype)


def coerce_input(array: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """``array`` shaped and typed as ``tensor``.

    A missing leading batch dimension of 1 is added; real values given to an integer
    (quantized) input are quantized with the input's scale and zero point. Anything else
    that does not match is an error naming the tensor.
    """
    array = np.asarray(array)
    shape = tensor.shape
    if tuple(array.shape) != shape:
        if array.size == int(np.prod(shape)) and (array.ndim == len(shape) - 1 and shape[0] == 1):
            array = array.reshape(shape)
        else:
            raise TensorFormatError(
                f"input {tensor.name!r} must have shape {list(shape)}, got {list(array.shape)}"
            )
    if array.dtype == tensor.dtype:
        return array
    if np.issubdtype(array.dtype, np.floating) and np.issubdtype(tensor.dtype, np.integer):
        return quantize(array, tensor)
    if np.issubdtype(array.dtype, np.integer) and np.issubdtype(tensor.dtype, np.integer):
        info = np.iinfo(tensor.dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise TensorFormatError(
                f"input {tensor.name!r} is {tensor.dtype.name}: values {array.min()}..{array.max()} do not fit"
            )
        return array.astype(tensor.dtype)
    if np.issubdtype(tensor.dtype, np.floating) and np.issubdtype(array.dtype, np.number):
        return array.astype(tensor.dtype)
    raise TensorFormatError(f"input {tensor.name!r} must be {tensor.dtype.name}, got {array.dtype.name}")


def random_tensors(tensors: Iterable[TensorInfo], seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random array for each tensor, in its dtype and shape: integers over the dtype's whole range."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in tensors:
        if np.issubdtype(t.dtype, np.integer):
            info = np.iinfo(t.dtype)
            out[t.name] = rng.integers(info.min, info.max, size=t.shape, endpoint=True).astype(t.dtype)
        elif t.dtype == np.bool_:
            out[t.name] = rng.integers(0, 1, size=t.shape, endpoint=True).astype(np.bool_)
        else:
            out[t.name] = rng.random(t.shape).astype(t.dtype)
    return out


def random_inputs(graph: ModelGraph, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random tensor for every model input."""
    return random_tensors(graph.inputs, seed)
