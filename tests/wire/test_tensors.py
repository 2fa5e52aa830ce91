"""edge.wire: tensors to wire bytes and back, and the checks made before decoding."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from edge.errors import EdgeError, TensorFormatError
from edge.wire import (
    DATATYPES,
    MAX_NDIM,
    WireTensor,
    datatype_of,
    decode,
    decode_expected,
    dtype_of,
    element_count,
    encode,
)
from helpers import NUMPY_TYPES

SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4), (1, 28, 28, 8)]


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values covering the type's whole range (every bit pattern for floats, NaNs included)."""
    dtype = np.dtype(NUMPY_TYPES[datatype])
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def test_the_codec_carries_exactly_the_oip_fixed_size_datatypes() -> None:
    assert set(DATATYPES) == set(NUMPY_TYPES)


@pytest.mark.parametrize("datatype", sorted(NUMPY_TYPES))
def test_datatype_and_dtype_map_both_ways(datatype: str) -> None:
    numpy_type = NUMPY_TYPES[datatype]
    assert datatype_of(numpy_type) == datatype
    assert datatype_of(np.dtype(numpy_type)) == datatype
    assert dtype_of(datatype) == np.dtype(numpy_type)
    assert dtype_of(datatype).byteorder in "<|="


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("datatype", sorted(NUMPY_TYPES))
def test_round_trip_is_bit_exact(datatype: str, shape: tuple[int, ...]) -> None:
    array = sample(datatype, shape)
    tensor = encode("x", array)
    assert tensor.name == "x"
    assert tensor.datatype == datatype
    assert tensor.shape == shape
    assert tensor.nbytes == array.nbytes
    out = decode(tensor)
    assert out.dtype == array.dtype
    assert out.shape == shape
    assert out.tobytes() == array.tobytes()  # bitwise, so NaN payloads count too


@pytest.mark.parametrize("datatype", ["UINT16", "INT32", "INT64", "FP16", "FP32", "FP64"])
def test_big_endian_arrays_travel_little_endian(datatype: str) -> None:
    array = sample(datatype, (4, 5))
    swapped = array.astype(array.dtype.newbyteorder(">"))
    tensor = encode("x", swapped)
    assert tensor.datatype == datatype
    assert tensor.data == array.astype(array.dtype.newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(decode(tensor), array)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a.T,
        lambda a: a[:, ::2],
        lambda a: a[::-1],
        lambda a: np.asfortranarray(a),
    ],
    ids=["transposed", "strided", "reversed", "fortran"],
)
def test_non_contiguous_arrays_encode_in_row_major_order(view) -> None:
    array = view(sample("FP32", (6, 8)))
    assert not array.flags.c_contiguous
    tensor = encode("x", array)
    assert tensor.shape == array.shape
    np.testing.assert_array_equal(decode(tensor), array)


def test_encode_takes_a_snapshot() -> None:
    array = np.arange(12, dtype=np.int8).reshape(3, 4)
    tensor = encode("x", array)
    array[:] = -1
    np.testing.assert_array_equal(decode(tensor), np.arange(12, dtype=np.int8).reshape(3, 4))


def test_decode_shares_the_bytes_read_only() -> None:
    data = np.arange(6, dtype=np.float32).tobytes()
    out = decode(WireTensor("x", "FP32", (2, 3), data))
    assert not out.flags.writeable
    assert np.shares_memory(out, np.frombuffer(data, dtype=np.uint8))


def test_memoryview_data_counts_bytes_not_elements() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = WireTensor("x", "FP32", (2, 3), memoryview(array))
    assert tensor.nbytes == 24
    np.testing.assert_array_equal(decode(tensor), array)


def test_tensor_format_error_is_an_edge_error() -> None:
    assert issubclass(TensorFormatError, EdgeError)


@pytest.mark.parametrize(
    "dtype",
    [np.complex64, np.object_, np.dtype("U3"), np.dtype("S3"), np.dtype("M8[s]"), np.dtype([("a", "<i4")])],
    ids=str,
)
def test_unsupported_dtypes_are_refused_with_the_tensor_name(dtype) -> None:
    with pytest.raises(TensorFormatError, match="dtype"):
        datatype_of(dtype)
    with pytest.raises(TensorFormatError, match="'activ'"):
        encode("activ", np.zeros(2, dtype=dtype))


@pytest.mark.parametrize("datatype", ["BYTES", "BF16", "fp32", "", "FLOAT"])
def test_unknown_datatypes_are_named(datatype: str) -> None:
    with pytest.raises(TensorFormatError, match=f"unknown datatype '{datatype}'"):
        dtype_of(datatype)
    with pytest.raises(TensorFormatError, match=f"tensor 'in0': unknown datatype '{datatype}'"):
        decode(WireTensor("in0", datatype, (1,), b"\0\0\0\0"))


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        ((2, -3), b"", "negative dimension -3"),
        ((-1,), b"\0" * 4, "negative dimension -1"),
        ((2, 3), b"\0" * 20, "needs 24 bytes, got 20"),
        ((2, 3), b"\0" * 28, "needs 24 bytes, got 28"),
        ((), b"", "needs 4 bytes, got 0"),
        ((0,), b"\0" * 4, "needs 0 bytes, got 4"),
        ((2.0, 3), b"\0" * 24, "is not an integer"),
        ((1,) * (MAX_NDIM + 1), b"\0" * 4, "dimensions, more than"),
    ],
    ids=["negative", "negative-first", "short", "long", "scalar-empty", "empty-nonzero", "float-dim", "ndim"],
)
def test_malformed_tensors_are_refused_with_the_tensor_name(shape, data: bytes, message: str) -> None:
    with pytest.raises(TensorFormatError, match=message) as info:
        decode(WireTensor("conv_3", "FP32", shape, data))
    assert "'conv_3'" in str(info.value)


@pytest.mark.parametrize(
    "shape",
    [(2**40, 2**40), (2**62, 4), (2**32, 2**32), (2**31, 2**31, 2**31, 2**31)],
    ids=["2^80", "wraps-int64-to-0", "2^64-wraps-to-0", "4x2^31"],
)
@pytest.mark.parametrize("data", [b"", b"\0" * 8], ids=["empty", "tiny"])
def test_huge_declared_shapes_are_refused_without_allocating(shape, data: bytes) -> None:
    # A product computed in int64 would wrap some of these to 0 and accept an empty payload.
    tracemalloc.start()
    try:
        with pytest.raises(TensorFormatError, match="'big'"):
            decode(WireTensor("big", "FP32", shape, data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    with pytest.raises(TensorFormatError, match=r"'mask'.*BOOL"):
        decode(WireTensor("mask", "BOOL", (3,), b"\x00\x01\x02"))


def test_element_count_uses_python_ints() -> None:
    assert element_count("x", (2**40, 2**40)) == 2**80
    assert element_count("x", ()) == 1
    assert element_count("x", (np.int64(3), 4)) == 12


def test_an_explicit_raw_encoding_decodes_and_an_unknown_one_is_refused() -> None:
    array = np.arange(6, dtype=np.int8).reshape(2, 3)
    plain = encode("t", array)
    raw = WireTensor(plain.name, plain.datatype, plain.shape, plain.data, {"edge_encoding": "raw"})
    assert np.array_equal(decode(raw), array)
    unknown = WireTensor(plain.name, plain.datatype, plain.shape, plain.data, {"edge_encoding": "zip9"})
    with pytest.raises(TensorFormatError, match=r"unknown encoding 'zip9'; supported: raw"):
        decode(unknown)


def test_the_fast_path_takes_only_a_plain_exact_tensor() -> None:
    array = np.arange(6, dtype=np.int8).reshape(2, 3)
    t = encode("t", array)
    spec = ("t", "INT8", (2, 3), np.dtype("i1"), 6)
    got = decode_expected(t, *spec)
    assert got is not None and np.array_equal(got, array)
    with_parameters = WireTensor(t.name, t.datatype, t.shape, t.data, {"edge_encoding": "raw"})
    assert decode_expected(with_parameters, *spec) is None  # an encoding goes through decode
    assert decode_expected(encode("u", array), *spec) is None
    assert decode_expected(encode("t", array.astype(np.int16)), *spec) is None
