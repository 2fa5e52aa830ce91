"""Packed tensors (one BYTES element each, for MLServer): round trips and malformed elements.

Covered: every datatype the codec carries, raw and zstd-encoded, packs and unpacks to the same
datatype, shape, bytes and encoding; a BYTES tensor that is not packed, a wrong length prefix,
a header too long, an unreadable header and a header of the wrong types are each one
TensorFormatError.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge import wire
from edge.errors import TensorFormatError
from edge.wire import DATATYPES, WireTensor, decode, dtype_of, encode, encodings, packed


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(datatype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.random((1, 3, 5)) * 100).astype(dtype_of(datatype))
    tensor = encode("x", array)
    wired = packed.pack(tensor)
    assert wired.datatype == "BYTES" and wired.shape == (1,)
    back = packed.unpack(wired)
    assert (back.name, back.datatype, back.shape) == ("x", datatype, (1, 3, 5))
    assert np.array_equal(decode(back), array)


def test_an_encoded_tensor_keeps_its_encoding() -> None:
    array = np.zeros((1, 64, 64), dtype=np.int8)
    tensor = encodings.compress(encode("x", array), "zstd")
    assert tensor.parameters.get(wire.ENCODING) == "zstd"
    back = packed.unpack(packed.pack(tensor))
    assert back.parameters == {wire.ENCODING: "zstd"}
    assert np.array_equal(decode(back), array)


def _element(header: bytes, data: bytes = b"\x01") -> bytes:
    return packed.MAGIC + struct.pack("<H", len(header)) + header + data


@pytest.mark.parametrize(
    "element",
    [
        b"not packed at all",
        b"",
        _element(b"{not json"),
        _element(json.dumps({"datatype": "INT8"}).encode()),
        _element(json.dumps({"datatype": 8, "shape": [1]}).encode()),
        _element(json.dumps({"datatype": "INT8", "shape": [True]}).encode()),
        _element(json.dumps({"datatype": "INT8", "shape": [1], "encoding": 3}).encode()),
        packed.MAGIC + struct.pack("<H", 60000) + b"{}",
    ],
    ids=[
        "no-magic",
        "empty",
        "bad-json",
        "no-shape",
        "datatype-not-text",
        "bool-dim",
        "encoding-not-text",
        "header-too-long",
    ],
)
def test_a_malformed_element_is_one_clear_error(element: bytes) -> None:
    with pytest.raises(TensorFormatError, match="tensor 'x'"):
        packed.unpack_element("x", element)


def test_a_wrong_length_prefix_is_refused() -> None:
    wired = packed.pack(encode("x", np.zeros((1, 4), dtype=np.int8)))
    data = bytes(wired.data)
    broken = WireTensor("x", "BYTES", (1,), struct.pack("<I", len(data)) + data[4:])
    with pytest.raises(TensorFormatError, match="length"):
        packed.unpack(broken)


def test_a_header_nested_thousands_deep_is_a_format_error() -> None:
    """It raised RecursionError (INTERNAL through MLServer) instead of INVALID_ARGUMENT's error."""
    from edge.errors import TensorFormatError
    from edge.wire import packed

    text = b"[" * 2000 + b"]" * 2000
    element = packed.MAGIC + packed._HEADER_LENGTH.pack(len(text)) + text
    with pytest.raises(TensorFormatError, match="header cannot be read"):
        packed.unpack_element("x", element)
