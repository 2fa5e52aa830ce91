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
from typing import Any

from .codec import ENCODINGS, WireTensor, register_encoding
from .errors import TensorFormatError
from .wire import ENCODING

__all__ = ["CODECS", "EXTENSION_PREFIX", "available", "compress", "extensions", "offered"]

EXTENSION_PREFIX = f"{ENCODING}:"
"""ServerMetadata lists each codec the server decodes as ``edge_encoding:NAME``."""

CODECS = ("zstd", "lz4")
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


def _zstd_decompress(data: bytes | memoryview, expected: int) -> bytes:
    zstandard = _zstd()
    try:
        size = zstandard.frame_content_size(data)
        if size > expected:
            raise TensorFormatError(f"a zstd frame of {size:,} bytes where {expected:,} are expected")
        return bytes(zstandard.ZstdDecompressor().decompress(data, max_output_size=expected))
    except zstandard.ZstdError as err:
        raise TensorFormatError(f"not a zstd frame of at most {expected:,} bytes: {err}") from err


def _lz4_compress(data: bytes) -> bytes:
    return bytes(_lz4().compress(data, store_size=True))


def _lz4_decompress(data: bytes | memoryview, expected: int) -> bytes:
    frame = _lz4()
    try:
        decompressor = frame.LZ4FrameDecompressor()
        out = decompressor.decompress(bytes(data), max_length=expected + 1)
    except RuntimeError as err:
        raise TensorFormatError(f"not an lz4 frame: {err}") from err
    if len(out) > expected or not decompressor.eof:
        raise TensorFormatError(f"an lz4 frame that does not decode to exactly {expected:,} bytes")
    return bytes(out)


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
    """The codecs this process can encode and decode."""
    return tuple(name for name in CODECS if name in _COMPRESSORS and name in ENCODINGS)


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
