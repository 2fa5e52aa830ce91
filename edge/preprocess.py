"""Turn user data into the exact tensor a model input takes: batch dimension, dtype, quantization."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from .errors import TensorFormatError
from .graph import ModelGraph, TensorInfo

__all__ = ["check_finite", "coerce_input", "quantize", "random_inputs", "random_tensors"]

logger = logging.getLogger(__name__)

# The inputs already warned about clipping; bounded, so a stream of new names cannot grow it.
_CLIPPED: set[str] = set()


def quantize(values: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """Real values to ``tensor``'s integer type: round(x / scale) + zero_point, saturated.

    NaN and infinite values are refused. Values outside the range the input can represent are
    clipped to it, and a warning says how many, once per input tensor.
    """
    quant = tensor.quantization
    if quant is None or quant[0] == 0.0:
        raise TensorFormatError(f"input {tensor.name!r} is {tensor.dtype.name} with no quantization to apply")
    reals = np.asarray(values, dtype=np.float64)
    check_finite(reals, tensor)
    scale, zero_point = quant
    info = np.iinfo(tensor.dtype)
    q = np.round(reals / scale) + zero_point
    outside = int(np.count_nonzero((q < info.min) | (q > info.max)))
    if outside and tensor.name not in _CLIPPED:
        if len(_CLIPPED) < 1024:
            _CLIPPED.add(tensor.name)
        low, high = (info.min - zero_point) * scale, (info.max - zero_point) * scale
        logger.warning(
            "input %r: %d of %d values lie outside %.4g..%.4g, the range it can represent, and were clipped "
            "(said once per input)",
            tensor.name,
            outside,
            q.size,
            low,
            high,
        )
    return np.clip(q, info.min, info.max).astype(tensor.dtype)


def check_finite(values: np.ndarray, tensor: TensorInfo) -> None:
    """Refuse NaN and infinite values: no model input means anything by them."""
    if values.dtype.kind != "f" or values.size == 0:
        return
    bad = ~np.isfinite(values)
    if bad.any():
        raise TensorFormatError(
            f"input {tensor.name!r}: {int(np.count_nonzero(bad))} of {values.size} values are NaN or infinite"
        )


def coerce_input(array: np.ndarray, tensor: TensorInfo, *, integers_as_reals: bool = True) -> np.ndarray:
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
        check_finite(array, tensor)
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
    if (
        np.issubdtype(tensor.dtype, np.floating)
        and np.issubdtype(array.dtype, np.integer)
        and not integers_as_reals
    ):
        # A typed integer array for a float model is most often quantized data for another model
        # (int8 digits into the float one gave logits of 6,860 against 9.6): not cast without a word.
        raise TensorFormatError(
            f"input {tensor.name!r} is {tensor.dtype.name}, and this file holds {array.dtype.name} values: "
            f"give the real values the model takes (save them as {tensor.dtype.name})"
        )
    if np.issubdtype(tensor.dtype, np.floating) and np.issubdtype(array.dtype, np.number):
        check_finite(array, tensor)
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
