"""How a tensor's bytes travel, both ways: the one path every tensor passes.

A tensor sent encoded carries ``edge_encoding = NAME`` in its OIP tensor parameters; absent means
raw. Every encoding is one entry of :data:`ENCODINGS`, registered here explicitly:

- ``raw``: the little-endian row-major bytes themselves;
- ``zstd`` and ``lz4``: lossless, when their libraries are installed;
- ``fp16`` (FP32 tensors, two bytes an element) and ``int4`` (INT8 tensors, two elements a byte):
  lossy, opt-in, and every result sent through one is flagged;
- ``calibrated``: lossy, a frame of a codec fitted on calibration data (:mod:`edge.wire.calibrated`),
  which says how to decode it; a device sends it only with a CODEC.json (:mod:`edge.codec`).

The receiver knows how many bytes a tensor must decode to (its datatype times its shape) and decodes
at most that many: a frame that claims or yields more is refused before it is allocated, so a small
message cannot expand into a large one.

The server lists what it decodes in its metadata (``edge_encoding:zstd``). :func:`sent_as` is the
one place that decides what a device sends: its codec if the server lists it, else raw; the planner
asks the same question.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np

from edge.errors import TensorFormatError

from . import calibrated
from .names import ENCODING
from .tensors import Deferred, WireTensor, dtype_of, element_count

__all__ = [
    "CODECS",
    "ENCODINGS",
    "EXTENSION_PREFIX",
    "INT4_BASE",
    "INT4_STEP",
    "LOSSY",
    "CodecName",
    "CutEncoder",
    "Encoding",
    "available",
    "compress",
    "decode",
    "decode_expected",
    "decoded",
    "extensions",
    "offered",
    "sent_as",
]

EXTENSION_PREFIX = f"{ENCODING}:"
"""ServerMetadata lists each codec the server decodes as ``edge_encoding:NAME``."""

Lossless = Literal["zstd", "lz4"]
Lossy = Literal["fp16", "int4"]
CodecName = Literal["raw", Lossless, Lossy]
"""Every codec a device may name: raw, the lossless ones, and the opt-in lossy ones."""
CODECS: tuple[Lossless, ...] = get_args(Lossless)
LOSSY: tuple[Lossy, ...] = get_args(Lossy)
"""Opt-in codecs that change values: fp16 for FP32 tensors, int4 (two to a byte) for INT8 ones."""
ZSTD_LEVEL = 1

INT4_BASE = "edge_int4_base"
INT4_STEP = "edge_int4_step"
"""int64s on an int4 tensor: 4-bit code u stands for the int8 value base + step * u."""


class CutEncoder(Protocol):
    """Encodes a model's cut tensors with parameters fitted to them (:class:`edge.codec.CodecFile`);
    its tensors go as the ``calibrated`` encoding."""

    def compress(
        self, tensor: WireTensor, split_point: object, model_sha256: object, known: Container[bytes]
    ) -> tuple[WireTensor, bytes | None]:
        """``tensor`` encoded, and the id of the codec table it carries inline (a server ``known`` to
        hold a table gets its id instead); as it is, and None, when there is no codec for it at that
        cut of that model."""
        ...


@dataclass(frozen=True, slots=True)
class Encoding:
    """One way a tensor's bytes travel."""

    name: str
    lossy: bool
    pack: Callable[[WireTensor], WireTensor | None]
    """The tensor encoded; None when this encoding does not apply to it or does not make it smaller."""
    unpack: Callable[[WireTensor, int], bytes | memoryview]
    """A tensor as it came and the raw size it must decode to (decode no more than that) -> raw bytes."""


def _bytes_of(t: WireTensor) -> bytes | memoryview:
    data = t.data
    if isinstance(data, Deferred):  # typed contents are never encoded
        raise TensorFormatError(f"tensor {t.name!r}: an encoding applies to raw contents only")
    return data


def _tagged(t: WireTensor, data: bytes, name: str, **extra: int) -> WireTensor:
    return WireTensor(t.name, t.datatype, t.shape, data, {**t.parameters, ENCODING: name, **extra})


# -- lossless ----------------------------------------------------------------------------------

_local = threading.local()


def _zstd() -> Any:
    import zstandard

    return zstandard


def _lz4() -> Any:
    import lz4.frame

    return lz4.frame


def _smaller(compress: Callable[[bytes], bytes], name: str) -> Callable[[WireTensor], WireTensor | None]:
    def pack(t: WireTensor) -> WireTensor | None:
        if not isinstance(t.data, bytes):
            return None
        packed = compress(t.data)
        return _tagged(t, packed, name) if len(packed) < len(t.data) else None

    return pack


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


# -- lossy ---------------------------------------------------------------------------------------


def _fp16_pack(t: WireTensor) -> WireTensor | None:
    if t.datatype != "FP32" or not isinstance(t.data, bytes):
        return None
    return _tagged(t, np.frombuffer(t.data, dtype="<f4").astype("<f2").tobytes(), "fp16")


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
    return _tagged(t, packed.tobytes(), "int4", **{INT4_BASE: base, INT4_STEP: step})


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


def _calibrated_unpack(t: WireTensor, expected: int) -> bytes:
    if t.datatype != "INT8" or element_count(t.name, t.shape) != expected:
        raise TensorFormatError(f"tensor {t.name!r}: a calibrated codec encodes INT8 tensors")
    return calibrated.decode_frame(_bytes_of(t), t.shape).tobytes()


# -- the registry --------------------------------------------------------------------------------


def _installed(importer: Callable[[], Any]) -> bool:
    try:
        importer()
    except ImportError:
        return False
    return True


def _registry() -> dict[str, Encoding]:
    table = [
        Encoding("raw", False, lambda t: None, lambda t, expected: _bytes_of(t)),
        Encoding("fp16", True, _fp16_pack, _fp16_unpack),
        Encoding("int4", True, _int4_pack, _int4_unpack),
    ]
    if _installed(_zstd):
        table.append(Encoding("zstd", False, _smaller(_zstd_compress, "zstd"), _zstd_decompress))
    if _installed(_lz4):
        table.append(Encoding("lz4", False, _smaller(_lz4_compress, "lz4"), _lz4_decompress))
    if _installed(_zstd):
        table.append(Encoding(calibrated.NAME, True, lambda t: None, _calibrated_unpack))
    return {e.name: e for e in table}


ENCODINGS: Mapping[str, Encoding] = _registry()
"""Every encoding this process reads and writes, by name."""


def available() -> tuple[str, ...]:
    """The codecs this process can encode and decode by name: the lossless ones installed, then the
    lossy ones."""
    return tuple(name for name in (*CODECS, *LOSSY) if name in ENCODINGS)


def decoded() -> tuple[str, ...]:
    """What a server decodes, and lists in its metadata: :func:`available`, and ``calibrated``."""
    return tuple(name for name in (*available(), calibrated.NAME) if name in ENCODINGS)


def extensions() -> tuple[str, ...]:
    """What a server lists in ServerMetadata for the codecs it decodes."""
    return tuple(EXTENSION_PREFIX + name for name in decoded())


def offered(server_extensions: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The codecs a server's metadata says it decodes."""
    return tuple(e[len(EXTENSION_PREFIX) :] for e in server_extensions if e.startswith(EXTENSION_PREFIX))


def sent_as(codec: str, server_codecs: tuple[str, ...]) -> str:
    """What a device configured with ``codec`` sends to a server that decodes ``server_codecs``:
    its codec when the server lists it, else raw (an older server keeps working)."""
    return codec if codec in server_codecs else "raw"


def compress(tensor: WireTensor, codec: str) -> WireTensor:
    """``tensor`` encoded with ``codec``, or as it is when that does not apply or make it smaller."""
    encoding = ENCODINGS.get(codec)
    if encoding is None:
        raise TensorFormatError(
            f"codec {codec!r} is not available here; install it (pip install zstandard lz4) or use "
            f"one of: raw, {', '.join(available())}"
        )
    return encoding.pack(tensor) or tensor


def decode_expected(
    t: WireTensor, name: str, datatype: str, shape: tuple[int, ...], dtype: np.dtype, nbytes: int
) -> np.ndarray | None:
    """The array, if ``t`` is exactly the tensor expected (name, datatype, shape, byte count, and raw
    bytes); else None, and :func:`decode` after a full check says what is wrong. BOOL tensors are
    never taken here: their bytes need a look."""
    if (
        t.parameters
        or t.name != name
        or t.datatype != datatype
        or t.shape != shape
        or type(t.data) is not bytes
        or len(t.data) != nbytes
        or dtype.kind == "b"
    ):
        return None
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def _payload(t: WireTensor, expected: int) -> bytes | memoryview:
    """``t``'s bytes as raw little-endian bytes, through its encoding (which decodes at most
    ``expected`` bytes)."""
    data = t.data
    if isinstance(data, Deferred):
        return data.load()
    if not t.parameters:
        return data
    name = t.parameters.get(ENCODING, "raw")
    encoding = ENCODINGS.get(name) if isinstance(name, str) else None
    if encoding is None:
        raise TensorFormatError(
            f"tensor {t.name!r}: unknown encoding {str(name)[:40]!r}; supported: {', '.join(ENCODINGS)}"
        )
    return encoding.unpack(t, expected)


def decode(t: WireTensor) -> np.ndarray:
    """Unpack a WireTensor into a read-only array that shares its bytes.

    Datatype, shape and byte count are checked before anything is allocated.
    """
    dtype = dtype_of(t.datatype, t.name)
    count = element_count(t.name, t.shape)
    expected = count * dtype.itemsize
    data = _payload(t, expected)
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if expected != size:
        raise TensorFormatError(
            f"tensor {t.name!r}: shape {list(t.shape)} of {t.datatype} needs {expected} bytes, got {size}"
        )
    try:
        flat = np.frombuffer(data, dtype=dtype, count=count)
    except ValueError as err:  # a memoryview that is not contiguous
        raise TensorFormatError(f"tensor {t.name!r}: unreadable data: {err}") from err
    if dtype.kind == "b" and count and flat.view(np.uint8).max() > 1:
        # numpy would accept the bytes, but a bool that is neither 0 nor 1 misbehaves later.
        raise TensorFormatError(f"tensor {t.name!r}: BOOL data holds bytes other than 0 and 1")
    return flat.reshape(t.shape)
