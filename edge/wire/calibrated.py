"""Calibrated feature codecs: a cut tensor requantized per channel, its idle channels dropped.

An INT8 activation rarely uses its 256 levels evenly: after a ReLU most of a channel sits at the
zero point, and some channels hardly vary at all. A :class:`ChannelCodec`, fitted on calibration
data (:mod:`edge.codec`), keeps for each channel a range ``lo..hi`` (percentiles of what the
calibration data put there, not its extremes) and sends each element as a code of ``bits`` bits
on that range; a channel whose energy is negligible is not sent, and the receiver puts its constant
in its place. The codes go through zstd.

A frame is zstd-compressed: a header (format, flags, channels), then the codec's *table* (the bits,
which channels are kept, each channel's range) or, once the receiver holds that table, its 16-byte
id, then the packed codes, channel after channel. The table costs two bytes a channel, often more
than the codes, so the device sends it inline until the server has answered a request that carried
it, and by id after that. A server keeps the tables it was sent in a bounded table
(:data:`MAX_TABLES`, least recently used dropped); a frame naming one it does not hold is refused
with :class:`~edge.errors.UnknownCodecTableError` (FAILED_PRECONDITION), and the device sends the
table again.

The receiver knows the tensor's shape, so it knows how many bytes the frame may decompress to, and
refuses one that claims or yields more before it is allocated. A value is rebuilt as
``round(lo + (hi - lo) * code / (2**bits - 1))``: the same integer on every machine.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.errors import TensorFormatError, UnknownCodecTableError

__all__ = ["FORMAT", "MAX_TABLES", "NAME", "UNKNOWN_TABLE", "ChannelCodec", "decode_frame"]

NAME = "calibrated"
"""The encoding's name on the wire (``edge_encoding = calibrated``)."""
FORMAT = 1
"""The frame's version byte."""
MAX_BITS = 8
MAX_CHANNELS = 65535
SMALL_BODY = 4096
"""A frame body up to this size is compressed at zstd's strongest level (19: 0.03 ms for 375 bytes
here); a larger one at level 3 (37.5 kB: 0.19 ms, against 3.4 ms at 19 for 2 % fewer bytes)."""
ID_BYTES = 16
_INLINE = 1
"""Flag: the table is in the frame (else its id is)."""
UNKNOWN_TABLE = "unknown codec table"
"""How the error for a frame naming a table this side does not hold begins: the device, seeing it,
sends its tables again."""
MAX_TABLES = 256
MAX_TABLE_BYTES = 16 * 1024 * 1024
"""Codec tables a process holds for frames that name them by id: at most this many, and bytes."""


def _zstd() -> Any:
    import zstandard

    return zstandard


@dataclass(frozen=True)
class ChannelCodec:
    """How one INT8 tensor is sent: ``bits`` per element, and per channel (the last axis) a range
    ``lo..hi`` in the tensor's own int8 values; a channel not ``kept`` is rebuilt as ``lo``."""

    bits: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    kept: tuple[bool, ...]

    def __post_init__(self) -> None:
        channels = len(self.lo)
        if not 1 <= self.bits <= MAX_BITS:
            raise TensorFormatError(f"a calibrated codec has 1 to {MAX_BITS} bits, not {self.bits}")
        if not 1 <= channels <= MAX_CHANNELS or len(self.hi) != channels or len(self.kept) != channels:
            raise TensorFormatError(
                f"a calibrated codec needs lo, hi and kept for each of 1..{MAX_CHANNELS} channels "
                f"(got {len(self.lo)}, {len(self.hi)}, {len(self.kept)})"
            )
        for lo, hi in zip(self.lo, self.hi, strict=True):
            if not -128 <= lo <= hi <= 127:
                raise TensorFormatError(f"a channel's range must be -128 <= lo <= hi <= 127, not {lo}..{hi}")

    @property
    def channels(self) -> int:
        return len(self.lo)

    @functools.cached_property
    def table(self) -> bytes:
        """The bits, the kept channels (a bitmap) and each channel's lo and hi: what a frame refers to
        (made once: every request's frame carries it or its id)."""
        bitmap = np.packbits(np.array(self.kept, dtype=np.uint8), bitorder="little").tobytes()
        ranges = np.empty(2 * self.channels, dtype=np.int8)
        ranges[0::2], ranges[1::2] = self.lo, self.hi
        return bytes([self.bits]) + bitmap + ranges.tobytes()

    @functools.cached_property
    def table_id(self) -> bytes:
        return hashlib.sha256(self.table).digest()[:ID_BYTES]

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "lo": list(self.lo),
            "hi": list(self.hi),
            "kept": [int(k) for k in self.kept],
        }

    @classmethod
    def from_json(cls, body: Any, where: str) -> ChannelCodec:
        try:
            return cls(
                bits=_int(body["bits"]),
                lo=tuple(_int(v) for v in body["lo"]),
                hi=tuple(_int(v) for v in body["hi"]),
                kept=tuple(bool(_int(v)) for v in body["kept"]),
            )
        except (KeyError, TypeError) as err:
            raise TensorFormatError(f"{where}: a tensor's codec needs bits, lo, hi and kept: {err}") from err
        except TensorFormatError as err:
            raise TensorFormatError(f"{where}: {err}") from err

    def encode(self, values: np.ndarray, *, inline: bool = True) -> bytes:
        """The frame for ``values`` (int8, channels last); with the table itself, or (``inline`` False)
        its id, for a receiver that holds it."""
        if values.dtype != np.int8 or values.ndim == 0 or values.shape[-1] != self.channels:
            raise TensorFormatError(
                f"this codec takes int8 tensors of {self.channels} channels (last axis), "
                f"not {values.dtype.name}{list(values.shape)}"
            )
        kept = np.flatnonzero(np.array(self.kept, dtype=bool))
        lo = np.array(self.lo, dtype=np.float64)[kept]
        span = np.array(self.hi, dtype=np.float64)[kept] - lo
        top = (1 << self.bits) - 1
        x = values.reshape(-1, self.channels)[:, kept].astype(np.float64)
        scale = np.divide(top, span, out=np.zeros_like(span), where=span > 0)
        codes = np.clip(np.rint((x - lo) * scale), 0, top).astype(np.uint8)
        header = bytes([FORMAT, _INLINE if inline else 0]) + self.channels.to_bytes(2, "little")
        body = header + (self.table if inline else self.table_id) + _pack_bits(codes.T.reshape(-1), self.bits)
        return _compress(body)

    def decode(self, values_shape: tuple[int, ...], frame: bytes) -> np.ndarray:
        """``frame`` rebuilt (the table inline, or this codec's own): for evaluation on the device."""
        _remember(self.table_id, self.table)
        return decode_frame(frame, values_shape)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TensorFormatError(f"expected an integer, not {value!r}"[:80])
    return value


_local = threading.local()


def _compress(body: bytes) -> bytes:
    level = 19 if len(body) <= SMALL_BODY else 3
    compressors = getattr(_local, "compressors", None)
    if compressors is None:  # a compressor is not safe to share between threads
        compressors = _local.compressors = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = _zstd().ZstdCompressor(level=level, write_content_size=True)
    return bytes(compressor.compress(body))


_tables: OrderedDict[bytes, bytes] = OrderedDict()
_tables_lock = threading.Lock()
_table_bytes = 0


def _remember(table_id: bytes, table: bytes) -> None:
    global _table_bytes
    with _tables_lock:
        old = _tables.pop(table_id, None)
        _table_bytes += len(table) - (len(old) if old is not None else 0)
        _tables[table_id] = table
        while len(_tables) > MAX_TABLES or _table_bytes > MAX_TABLE_BYTES:
            _, dropped = _tables.popitem(last=False)
            _table_bytes -= len(dropped)


def _recall(table_id: bytes) -> bytes:
    with _tables_lock:
        table = _tables.get(table_id)
        if table is not None:
            _tables.move_to_end(table_id)
    if table is None:
        raise UnknownCodecTableError(f"{UNKNOWN_TABLE} {table_id.hex()}: send the table with the frame")
    return table


def _pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Codes of ``bits`` bits each, packed little-endian, first code in the lowest bits."""
    planes = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (planes.reshape(count, bits).astype(np.uint16) @ weights).astype(np.int64)


def decode_frame(frame: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """The int8 tensor of ``shape`` a frame encodes; TensorFormatError for anything else, and
    UnknownCodecTableError for a frame naming a table this process does not hold.

    Nothing larger than the shape allows is decompressed: the frame's content size must be what
    its header and the shape allow, and is checked before it is allocated."""
    if not shape or not 1 <= shape[-1] <= MAX_CHANNELS:
        raise TensorFormatError(
            f"a calibrated frame encodes a tensor of 1..{MAX_CHANNELS} channels, not shape {list(shape)}"
        )
    channels = shape[-1]
    positions = int(np.prod(shape[:-1], dtype=np.int64))
    table_bytes = 1 + (channels + 7) // 8 + 2 * channels
    zstandard = _zstd()
    data = bytes(frame)
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise TensorFormatError(f"not a calibrated frame: {err}") from err
    largest = 4 + max(table_bytes, ID_BYTES) + (positions * channels * MAX_BITS + 7) // 8
    if size < 0:  # a frame without its size could expand to anything
        raise TensorFormatError("a calibrated frame that does not say its size")
    if size < 4 + min(ID_BYTES, table_bytes) or size > largest:
        raise TensorFormatError(
            f"a calibrated frame of {size:,} bytes; a tensor of shape {list(shape)} needs at most {largest:,}"
        )
    try:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        body = decompressor.decompress(data)
    except zstandard.ZstdError as err:
        raise TensorFormatError(f"not a calibrated frame: {err}") from err
    if decompressor.unused_data or len(body) != size:
        raise TensorFormatError("a calibrated frame with bytes after it, or shorter than it says")
    version, flags, said = body[0], body[1], int.from_bytes(body[2:4], "little")
    if version != FORMAT:
        raise TensorFormatError(f"a calibrated frame of format {version}; this side reads {FORMAT}")
    if said != channels:
        raise TensorFormatError(f"a calibrated frame of {said} channels, for a tensor of {channels}")
    if flags & _INLINE:
        table, codes_at = body[4 : 4 + table_bytes], 4 + table_bytes
    else:
        table, codes_at = _recall(body[4 : 4 + ID_BYTES]), 4 + ID_BYTES
    if len(table) != table_bytes:
        raise TensorFormatError(
            f"a calibrated frame whose table is for another number of channels than {channels}"
        )
    bits = table[0]
    kept_mask = np.unpackbits(
        np.frombuffer(table[1 : 1 + (channels + 7) // 8], dtype=np.uint8), bitorder="little"
    )
    kept = np.flatnonzero(kept_mask[:channels])
    ranges = np.frombuffer(table[1 + (channels + 7) // 8 :], dtype=np.int8).astype(np.float64)
    lo, hi = ranges[0::2], ranges[1::2]
    if not 1 <= bits <= MAX_BITS or np.any(hi < lo):
        raise TensorFormatError(f"a calibrated frame with {bits} bits or a channel whose hi is below its lo")
    count = positions * len(kept)
    if len(body) - codes_at != (count * bits + 7) // 8:
        raise TensorFormatError(
            f"a calibrated frame of {len(body) - codes_at:,} code bytes; {count:,} codes of {bits} bits need "
            f"{(count * bits + 7) // 8:,}"
        )
    if flags & _INLINE:
        _remember(hashlib.sha256(table).digest()[:ID_BYTES], bytes(table))
    top = (1 << bits) - 1
    out = np.empty((positions, channels), dtype=np.int8)
    out[:] = lo.astype(np.int8)  # dropped channels: their constant
    if count:
        codes = _unpack_bits(body[codes_at:], bits, count).reshape(len(kept), positions).T
        levels = np.rint(lo[kept, None] + (hi - lo)[kept, None] * np.arange(top + 1) / top)
        levels = np.clip(levels, -128, 127).astype(np.int8)  # [kept channel, code] -> value
        out[:, kept] = levels[np.arange(len(kept))[None, :], codes]
    return out.reshape(shape)
