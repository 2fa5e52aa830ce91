"""Lossless codecs for tensors on the wire: zstd and lz4, when their libraries are installed.

A tensor sent compressed carries ``edge_encoding = "zstd"`` (or ``"lz4"``) in its OIP tensor
parameters; absent means raw. The receiver knows how many bytes the tensor must decode to (its
datatype times its shape), and decompresses at most that many: a frame that claims or yields
more is refused before it is allocated, so a small message cannot expand into a large one.

:func:`compress` keeps a tensor raw when the codec does not make it smaller. The server says which
codecs it decodes in its metadata extensions (``edge_encoding:zstd``); a device sends raw tensors
to a server that does not list its codec, so an old server keeps working.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Literal, get_args

import numpy as np

from .codec import ENCODINGS, Deferred, WireTensor, register_encoding
from .errors import TensorFormatError
from .wire import ENCODING

__all__ = [
    "CODECS",
    "EXTENSION_PREFIX",
    "INT4_BASE",
    "INT4_STEP",
    "LOSSY",
    "available",
    "compress",
    "extensions",
    "offered",
]

EXTENSION_PREFIX = f"{ENCODING}:"
"""ServerMetadata lists each codec the server decodes as ``edge_encoding:NAME``."""

Lossless = Literal["zstd", "lz4"]
Lossy = Literal["fp16", "int4"]
CodecName = Literal["raw", Lossless, Lossy]
"""Every codec a device may name: raw, the lossless ones, and the opt-in lossy ones."""
CODECS: tuple[Lossless, ...] = get_args(Lossless)
ZSTD_LEVEL = 1

_local = threading.local()


def _zstd() -> Any:
    import zstandard

    return zstandard


def _lz4() -> Any:
    import lz4.frame

    return lz4.frame


def _zstd_compress(data: bytes) -> bytes:
    compressor = getattr(_local, "zstd", None)
    if compressor is None:  # a compressor is not safe to share between threads
        compressor = _local.zstd = _zstd().ZstdCompressor(level=ZSTD_LEVEL)
    return bytes(compressor.compress(data))


def _zstd_decompress(t: WireTensor, expected: int) -> bytes:
    data = _bytes_of(t)
    zstandard = _zstd()
    try:
        size = zstandard.frame_content_size(data)
        if size < 0:  # our frames carry their size; one without could expand to anything
            raise TensorFormatError("a zstd frame that does not say its content size")
        if size > expected:
            raise TensorFormatError(f"a zstd frame of {size:,} bytes where {expected:,} are expected")
        # The size is known and bounded, so a decompressobj is safe, and it says what follows the frame.
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        out = decompressor.decompress(bytes(data))
        if decompressor.unused_data:
            raise TensorFormatError(f"{len(decompressor.unused_data):,} bytes after the zstd frame")
        return bytes(out)
    except zstandard.ZstdError as err:
        raise TensorFormatError(f"not a zstd frame of at most {expected:,} bytes: {err}") from err


def _lz4_compress(data: bytes) -> bytes:
    return bytes(_lz4().compress(data, store_size=True))


def _lz4_decompress(t: WireTensor, expected: int) -> bytes:
    data = _bytes_of(t)
    frame = _lz4()
    try:
        decompressor = frame.LZ4FrameDecompressor()
        out = decompressor.decompress(bytes(data), max_length=expected + 1)
    except RuntimeError as err:
        raise TensorFormatError(f"not an lz4 frame: {err}") from err
    if len(out) > expected or not decompressor.eof:
        raise TensorFormatError(f"an lz4 frame that does not decode to exactly {expected:,} bytes")
    if decompressor.unused_data:
        raise TensorFormatError(f"{len(decompressor.unused_data):,} bytes after the lz4 frame")
    return bytes(out)


def _bytes_of(t: WireTensor) -> bytes | memoryview:
    data = t.data
    if isinstance(data, Deferred):  # typed contents are never encoded
        raise TensorFormatError(f"tensor {t.name!r}: an encoding applies to raw contents only")
    return data


# -- lossy: opt-in, and every result sent through one is flagged ------------------------------

INT4_BASE = "edge_int4_base"
INT4_STEP = "edge_int4_step"
"""int64s on an int4 tensor: 4-bit code u stands for the int8 value base + step * u."""


def _fp16_pack(t: WireTensor) -> WireTensor | None:
    if t.datatype != "FP32" or not isinstance(t.data, bytes):
        return None
    half = np.frombuffer(t.data, dtype="<f4").astype("<f2")
    return WireTensor(t.name, t.datatype, t.shape, half.tobytes(), {**t.parameters, ENCODING: "fp16"})


def _fp16_unpack(t: WireTensor, expected: int) -> bytes:
    data = _bytes_of(t)
    if t.datatype != "FP32" or len(data) * 2 != expected:
        raise TensorFormatError(f"tensor {t.name!r}: fp16 encodes FP32 tensors, two bytes an element")
    return np.frombuffer(data, dtype="<f2").astype("<f4").tobytes()


def _int4_grid(values: np.ndarray) -> tuple[int, int]:
    """(base, step): 16 levels spanning the tensor's values, one of them exactly its most common
    value (for an activation after a ReLU, its zero point, which most elements hold)."""
    mode = int(np.bincount(values + 128, minlength=256).argmax()) - 128
    below, above = mode - int(values.min()), int(values.max()) - mode
    step = max(1, -(-(below + above) // 15))
    while True:
        levels_below = -(-below // step)
        if step * (15 - levels_below) >= above:
            return mode - step * levels_below, step
        step += 1


def _int4_pack(t: WireTensor) -> WireTensor | None:
    if t.datatype != "INT8" or not isinstance(t.data, bytes) or not t.data:
        return None
    values = np.frombuffer(t.data, dtype=np.int8).astype(np.int16)
    base, step = _int4_grid(values)
    codes = np.clip(np.rint((values - base) / step), 0, 15).astype(np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    packed = codes[0::2] | (codes[1::2] << 4)
    params = {**t.parameters, ENCODING: "int4", INT4_BASE: base, INT4_STEP: step}
    return WireTensor(t.name, t.datatype, t.shape, packed.tobytes(), params)


def _int4_unpack(t: WireTensor, expected: int) -> bytes:
    data = _bytes_of(t)
    base, step = t.parameters.get(INT4_BASE), t.parameters.get(INT4_STEP)
    if t.datatype != "INT8" or len(data) != (expected + 1) // 2:
        raise TensorFormatError(f"tensor {t.name!r}: int4 encodes INT8 tensors, two elements a byte")
    for name, value, low, high in ((INT4_BASE, base, -128 - 15 * 256, 127), (INT4_STEP, step, 1, 256)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise TensorFormatError(f"tensor {t.name!r}: int4 needs an int {name} in {low}..{high}")
    assert isinstance(base, int) and isinstance(step, int)
    packed = np.frombuffer(data, dtype=np.uint8)
    codes = np.empty(packed.size * 2, dtype=np.int32)
    codes[0::2], codes[1::2] = packed & 0xF, packed >> 4
    return np.clip(base + step * codes[:expected], -128, 127).astype(np.int8).tobytes()


LOSSY: tuple[Lossy, ...] = get_args(Lossy)
"""Opt-in codecs that change values: fp16 for FP32 tensors, int4 (two to a byte) for INT8 ones."""
_LOSSY_PACKERS: dict[str, Callable[[WireTensor], WireTensor | None]] = {
    "fp16": _fp16_pack,
    "int4": _int4_pack,
}
register_encoding("fp16", _fp16_unpack)
register_encoding("int4", _int4_unpack)


def _loads(importer: Callable[[], Any]) -> bool:
    try:
        importer()
    except ImportError:
        return False
    return True


_COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {}
if _loads(_zstd):
    _COMPRESSORS["zstd"] = _zstd_compress
    register_encoding("zstd", _zstd_decompress)
if _loads(_lz4):
    _COMPRESSORS["lz4"] = _lz4_compress
    register_encoding("lz4", _lz4_decompress)


def available() -> tuple[str, ...]:
    """The codecs this process can encode and decode: the lossless ones installed, then the lossy ones."""
    return tuple(name for name in CODECS if name in _COMPRESSORS and name in ENCODINGS) + LOSSY


def extensions() -> tuple[str, ...]:
    """What a server lists in ServerMetadata for the codecs it decodes."""
    return tuple(EXTENSION_PREFIX + name for name in available())


def offered(server_extensions: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The codecs a server's metadata says it decodes."""
    return tuple(e[len(EXTENSION_PREFIX) :] for e in server_extensions if e.startswith(EXTENSION_PREFIX))


def compress(tensor: WireTensor, codec: str) -> WireTensor:
    """``tensor`` encoded with ``codec``, or as it is when that does not make it smaller."""
    if codec == "raw":
        return tensor
    if codec in _LOSSY_PACKERS:
        lossy = _LOSSY_PACKERS[codec](tensor)
        return lossy if lossy is not None else tensor
    pack = _COMPRESSORS.get(codec)
    if pack is None:
        raise TensorFormatError(
            f"codec {codec!r} is not available here; install it (pip install zstandard lz4) or use "
            f"one of: raw, {', '.join(available())}"
        )
    data = tensor.data
    if not isinstance(data, bytes):
        return tensor
    packed = pack(data)
    if len(packed) >= len(data):
        return tensor
    return WireTensor(
        tensor.name, tensor.datatype, tensor.shape, packed, {**tensor.parameters, ENCODING: codec}
    )
