"""Calibrated feature codecs: a cut tensor requantized per channel, its idle channels dropped.

An INT8 activation rarely uses its 256 levels evenly: after a ReLU most of a channel sits at the
zero point, and some channels hardly vary at all. A :class:`ChannelCodec`, fitted on calibration
data (:mod:`edge.codec`), keeps for each channel a range ``lo..hi`` (percentiles of what the
calibration data put there, not its extremes) and sends each element as a code of ``bits`` bits
on that range; a channel whose energy is negligible is not sent, and the server puts a constant of
its own in its place. The codes go through zstd.

The frame says everything needed to decode it, so the server holds no state: the format version,
the bits, the kept channels, each channel's range (or constant), then the packed codes, all
compressed. The receiver knows the tensor's shape, so it knows exactly how many bytes the frame
must decompress to, and refuses one that claims or yields more.

A value is rebuilt as ``round(lo + (hi - lo) * code / (2**bits - 1))``: the same integer on every
machine, as it is computed from integers in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.errors import TensorFormatError

__all__ = ["FORMAT", "NAME", "ChannelCodec", "decode_frame"]

NAME = "calibrated"
"""The encoding's name on the wire (``edge_encoding = calibrated``)."""
FORMAT = 1
"""The frame's version byte."""
MAX_BITS = 8
ZSTD_LEVEL = 19
"""Frames are small (a cut tensor), so zstd's strongest level costs little here."""


def _zstd() -> Any:
    import zstandard

    return zstandard


@dataclass(frozen=True, slots=True)
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
        if not 1 <= channels <= 65535 or len(self.hi) != channels or len(self.kept) != channels:
            raise TensorFormatError(
                f"a calibrated codec needs lo, hi and kept for each of 1..65535 channels "
                f"(got {len(self.lo)}, {len(self.hi)}, {len(self.kept)})"
            )
        for lo, hi in zip(self.lo, self.hi, strict=True):
            if not -128 <= lo <= hi <= 127:
                raise TensorFormatError(f"a channel's range must be -128 <= lo <= hi <= 127, not {lo}..{hi}")

    @property
    def channels(self) -> int:
        return len(self.lo)

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

    def encode(self, values: np.ndarray) -> bytes:
        """The frame for ``values`` (int8, channels last)."""
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
        body = _header(self) + _pack_bits(codes.T.reshape(-1), self.bits)  # channel after channel
        return bytes(_zstd().ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(body))

    def decode(self, values_shape: tuple[int, ...], frame: bytes) -> np.ndarray:
        """``frame`` rebuilt; for the tests and evaluation (the server uses :func:`decode_frame`)."""
        return decode_frame(frame, values_shape)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TensorFormatError(f"expected an integer, not {value!r}"[:80])
    return value


def _header(codec: ChannelCodec) -> bytes:
    channels = codec.channels
    bitmap = np.packbits(np.array(codec.kept, dtype=np.uint8), bitorder="little").tobytes()
    ranges = np.empty(2 * channels, dtype=np.int8)
    ranges[0::2], ranges[1::2] = codec.lo, codec.hi
    return bytes([FORMAT, codec.bits]) + channels.to_bytes(2, "little") + bitmap + ranges.tobytes()


def _pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Codes of ``bits`` bits each, packed little-endian, first code in the lowest bits."""
    planes = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (planes.reshape(count, bits).astype(np.uint16) @ weights).astype(np.int64)


def decode_frame(frame: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """The int8 tensor of ``shape`` a frame encodes; TensorFormatError for anything else.

    Nothing larger than the shape allows is decompressed: the frame's content size must be what
    its header and the shape imply, and is checked before it is allocated."""
    if not shape or shape[-1] < 1 or shape[-1] > 65535:
        raise TensorFormatError(
            f"a calibrated frame encodes a tensor of 1..65535 channels, not shape {list(shape)}"
        )
    channels = shape[-1]
    positions = int(np.prod(shape[:-1], dtype=np.int64))
    bitmap_bytes = (channels + 7) // 8
    fixed = 4 + bitmap_bytes + 2 * channels
    zstandard = _zstd()
    data = bytes(frame)
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise TensorFormatError(f"not a calibrated frame: {err}") from err
    largest = fixed + (positions * channels * MAX_BITS + 7) // 8
    if size < 0:  # a frame without its size could expand to anything
        raise TensorFormatError("a calibrated frame that does not say its size")
    if size < fixed or size > largest:
        raise TensorFormatError(
            f"a calibrated frame of {size:,} bytes; a tensor of shape {list(shape)} needs {fixed:,} to {largest:,}"
        )
    try:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        body = decompressor.decompress(data)
    except zstandard.ZstdError as err:
        raise TensorFormatError(f"not a calibrated frame: {err}") from err
    if decompressor.unused_data or len(body) != size:
        raise TensorFormatError("a calibrated frame with bytes after it, or shorter than it says")
    version, bits = body[0], body[1]
    if version != FORMAT:
        raise TensorFormatError(f"a calibrated frame of format {version}; this side reads {FORMAT}")
    if int.from_bytes(body[2:4], "little") != channels:
        raise TensorFormatError(
            f"a calibrated frame of {int.from_bytes(body[2:4], 'little')} channels, for {channels}"
        )
    kept_mask = np.unpackbits(np.frombuffer(body[4 : 4 + bitmap_bytes], dtype=np.uint8), bitorder="little")
    kept_mask = kept_mask[:channels].astype(bool)
    ranges = np.frombuffer(body[4 + bitmap_bytes : fixed], dtype=np.int8).astype(np.float64)
    lo, hi = ranges[0::2], ranges[1::2]
    if not 1 <= bits <= MAX_BITS or np.any(hi < lo):
        raise TensorFormatError(f"a calibrated frame with {bits} bits or a channel whose hi is below its lo")
    kept = np.flatnonzero(kept_mask)
    count = positions * len(kept)
    if len(body) != fixed + (count * bits + 7) // 8:
        raise TensorFormatError(
            f"a calibrated frame of {len(body) - fixed:,} code bytes; {count:,} codes of {bits} bits need "
            f"{(count * bits + 7) // 8:,}"
        )
    top = (1 << bits) - 1
    out = np.empty((positions, channels), dtype=np.int8)
    out[:] = lo.astype(np.int8)  # dropped channels: their constant
    if count:
        codes = _unpack_bits(body[fixed:], bits, count).reshape(len(kept), positions).T
        table = np.rint(lo[kept, None] + (hi - lo)[kept, None] * np.arange(top + 1) / top)
        table = np.clip(table, -128, 127).astype(np.int8)  # [kept channel, code] -> value
        out[:, kept] = table[np.arange(len(kept))[None, :], codes]
    return out.reshape(shape)
