"""What travels: tensors, requests and responses, independent of the transport.

A :class:`WireTensor` is an Open Inference Protocol datatype string, a shape, little-endian
row-major bytes, and per-tensor parameters. :func:`encode` makes one from an array; how its bytes
are then encoded, and how they are read back, is :mod:`edge.wire.encodings`. This module imports
neither protobuf nor grpc; ``edge.protocol.converters`` maps these objects to messages.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias

import numpy as np

from edge.errors import TensorFormatError

__all__ = [
    "DATATYPES",
    "MAX_ENTRIES",
    "MAX_NDIM",
    "MAX_TENSORS",
    "Deferred",
    "InferRequest",
    "InferResponse",
    "ModelMetadata",
    "ParameterValue",
    "TensorMetadata",
    "WireTensor",
    "datatype_of",
    "dtype_of",
    "element_count",
    "encode",
]


ParameterValue: TypeAlias = bool | int | float | str

# Explicitly little-endian: the wire order, whatever the host's.
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPES_BY_DTYPE: dict[np.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}

#: The OIP datatypes this codec carries. BYTES and BF16 are not among them.
DATATYPES: tuple[str, ...] = tuple(_DTYPES)

#: More dimensions than any model has; numpy itself stops at 64.
MAX_ENTRIES = 64
"""The most parameters a request or a tensor carries, and outputs a request names."""
MAX_TENSORS = 1024
"""The most inputs (or outputs) one message carries."""
MAX_NDIM = 32

_NO_PARAMETERS: Mapping[str, ParameterValue] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Deferred:
    """Tensor bytes not made yet: typed contents (one protobuf value per element) are converted
    only when the tensor is decoded, after the request has been checked against the model, so a
    request for an input that does not exist costs nothing to refuse."""

    nbytes: int
    """What the bytes will measure: the declared element count times the datatype's size."""
    load: Callable[[], bytes]


# WireTensor, InferRequest and InferResponse are built for every request, so they are plain
# slotted dataclasses: a frozen one's __init__ costs several times more. Treat them as read-only.
@dataclass(slots=True)
class WireTensor:
    """One named tensor as it travels: OIP datatype, shape and raw little-endian row-major bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | Deferred
    parameters: Mapping[str, ParameterValue] = field(default_factory=lambda: _NO_PARAMETERS)
    """Per-tensor parameters; ``edge_encoding`` says how ``data`` is encoded (absent: raw)."""

    @property
    def nbytes(self) -> int:
        """The size of ``data`` in bytes."""
        data = self.data
        if isinstance(data, bytes):
            return len(data)
        return data.nbytes


@dataclass(slots=True)
class InferRequest:
    """An inference request: the model to run, its input tensors and the outputs wanted.

    ``outputs`` names the outputs to return; empty means every output.
    """

    model_name: str
    inputs: tuple[WireTensor, ...]
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    model_version: str = ""
    id: str = ""
    outputs: tuple[str, ...] = ()


@dataclass(slots=True)
class InferResponse:
    """An inference response: the model that ran and its output tensors."""

    model_name: str
    outputs: tuple[WireTensor, ...]
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    model_version: str = ""
    id: str = ""


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """A model input's or output's name, OIP datatype and shape (-1 marks a variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What a server says about one model: its versions, platform, inputs and outputs."""

    name: str
    versions: tuple[str, ...] = ()
    platform: str = ""
    inputs: tuple[TensorMetadata, ...] = ()
    outputs: tuple[TensorMetadata, ...] = ()


def _supported() -> str:
    return ", ".join(DATATYPES)


def datatype_of(dtype: np.dtype | type) -> str:
    """Return the OIP datatype string for a numpy dtype; raise TensorFormatError if it has none."""
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TensorFormatError(f"{dtype!r} is not a numpy dtype") from err
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _DATATYPES_BY_DTYPE[dt]
    except KeyError:
        raise TensorFormatError(
            f"dtype {dt} has no supported wire datatype; supported: {_supported()}"
        ) from None


def dtype_of(datatype: str, tensor: str | None = None) -> np.dtype:
    """Return the little-endian numpy dtype for an OIP datatype string (errors name ``tensor``)."""
    try:
        return _DTYPES[datatype]
    except (KeyError, TypeError):
        where = f"tensor {tensor!r}: " if tensor is not None else ""
        raise TensorFormatError(f"{where}unknown datatype {datatype!r}; supported: {_supported()}") from None


def element_count(name: str, shape: Sequence[int]) -> int:
    """Return the number of elements of a shape, after checking every dimension is an int >= 0.

    The product is a Python int, so an absurd shape cannot overflow into a plausible one.
    """
    if len(shape) > MAX_NDIM:
        raise TensorFormatError(f"tensor {name!r}: {len(shape)} dimensions, more than {MAX_NDIM}")
    count = 1
    for dim in shape:
        try:
            size = operator.index(dim)
        except TypeError:
            raise TensorFormatError(
                f"tensor {name!r}: dimension {dim!r} in shape {list(shape)} is not an integer"
            ) from None
        if size < 0:
            raise TensorFormatError(f"tensor {name!r}: negative dimension {size} in shape {list(shape)}")
        count *= size
    return count


def encode(name: str, array: np.ndarray) -> WireTensor:
    """Pack an array into a WireTensor of little-endian, row-major bytes.

    The bytes are a snapshot: later writes to ``array`` (an interpreter reusing its
    buffers, for one) do not reach the tensor.
    """
    arr = np.asarray(array)
    datatype = _DATATYPES_BY_DTYPE.get(arr.dtype) or _encode_datatype(name, arr.dtype)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # protobuf's bytes fields accept only bytes, so one copy is unavoidable on the gRPC
    # path; tobytes() makes it straight from any memory layout, with no second copy for
    # non-contiguous views.
    return WireTensor(name=name, datatype=datatype, shape=tuple(arr.shape), data=arr.tobytes())


def _encode_datatype(name: str, dtype: np.dtype) -> str:
    try:
        return datatype_of(dtype)
    except TensorFormatError as err:
        raise TensorFormatError(f"tensor {name!r}: {err}") from err
