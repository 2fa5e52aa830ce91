"""Tensors packed as one BYTES element, for servers that convert raw contents element by element.

MLServer turns every numeric tensor in ``raw_input_contents`` into a Python list (``struct.unpack``
per element: about 25 ms for 600 KB of INT8) before a runtime sees it, and packs outputs back
the same way. A BYTES tensor of one element passes through as one ``bytes`` object. So, to a
server that lists the extension :data:`EXTENSION` in its metadata, the device sends each tensor
as BYTES, shape [1], whose element is::

    b"EDG1" | header length (uint16, little-endian) | header (JSON) | the tensor's bytes

The header names the real datatype and shape, and the encoding when the bytes are compressed
(``{"datatype": "INT8", "shape": [1, 14, 14, 32], "encoding": "zstd"}``). The element describes
itself, so nothing rides in tensor parameters, which MLServer's adaptive batching merges and
splits as lists. Outputs come back the same way.
"""

from __future__ import annotations

import json
import struct

from edge.errors import TensorFormatError

from .names import ENCODING
from .tensors import ParameterValue, WireTensor

__all__ = [
    "EXTENSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "is_packed",
    "pack",
    "pack_element",
    "unpack",
    "unpack_element",
]

EXTENSION = "edge_packed_tensors"
"""ServerMetadata lists it when the server takes (and answers with) packed tensors."""

MAGIC = b"EDG1"
MAX_HEADER_BYTES = 4096
_LENGTH = struct.Struct("<I")
_HEADER_LENGTH = struct.Struct("<H")


def pack_element(t: WireTensor) -> bytes:
    """``t`` as one self-describing element (without the BYTES length prefix)."""
    header: dict[str, object] = {"datatype": t.datatype, "shape": list(t.shape)}
    encoding = t.parameters.get(ENCODING)
    if isinstance(encoding, str) and encoding != "raw":
        header["encoding"] = encoding
    text = json.dumps(header, separators=(",", ":")).encode()
    data = t.data
    if not isinstance(data, (bytes, memoryview)):
        data = data.load()
    return b"".join((MAGIC, _HEADER_LENGTH.pack(len(text)), text, data))


def unpack_element(name: str, element: bytes | memoryview) -> WireTensor:
    """The tensor an element of :func:`pack_element` holds; TensorFormatError if it is not one."""
    view = memoryview(element)
    if len(view) < len(MAGIC) + _HEADER_LENGTH.size or bytes(view[: len(MAGIC)]) != MAGIC:
        raise TensorFormatError(f"tensor {name!r}: a BYTES tensor that is not a packed tensor")
    (size,) = _HEADER_LENGTH.unpack_from(view, len(MAGIC))
    start = len(MAGIC) + _HEADER_LENGTH.size
    if size > MAX_HEADER_BYTES or start + size > len(view):
        raise TensorFormatError(f"tensor {name!r}: a packed tensor's header of {size} bytes does not fit")
    try:
        header = json.loads(bytes(view[start : start + size]))
        datatype, shape = header["datatype"], header["shape"]
        encoding = header.get("encoding")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        # RecursionError: a header nested thousands deep (it is one flat object).
        raise TensorFormatError(f"tensor {name!r}: a packed tensor's header cannot be read") from err
    if (
        not isinstance(datatype, str)
        or not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or (encoding is not None and not isinstance(encoding, str))
    ):
        raise TensorFormatError(f"tensor {name!r}: a packed tensor's header is not datatype, shape, encoding")
    parameters: dict[str, ParameterValue] = {ENCODING: encoding} if encoding else {}
    return WireTensor(name, datatype, tuple(shape), view[start + size :], parameters)


def pack(t: WireTensor) -> WireTensor:
    """``t`` as a BYTES tensor of one packed element, in OIP's raw form (a 4-byte length first)."""
    element = pack_element(t)
    return WireTensor(t.name, "BYTES", (1,), _LENGTH.pack(len(element)) + element)


def is_packed(t: WireTensor) -> bool:
    return t.datatype == "BYTES"


def unpack(t: WireTensor) -> WireTensor:
    """The tensor a BYTES tensor of :func:`pack` holds (from raw contents)."""
    data = t.data
    view = memoryview(data.load() if not isinstance(data, (bytes, memoryview)) else data)
    if t.shape != (1,) or len(view) < _LENGTH.size:
        raise TensorFormatError(f"tensor {t.name!r}: a packed tensor is BYTES of shape [1]")
    (length,) = _LENGTH.unpack_from(view, 0)
    if length != len(view) - _LENGTH.size:
        raise TensorFormatError(f"tensor {t.name!r}: a packed tensor's element length does not match")
    return unpack_element(t.name, view[_LENGTH.size :])
