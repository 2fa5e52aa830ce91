"""Sensor payloads to model inputs: JSON, raw tensor bytes, or PNG/JPEG images.

Pure functions: bytes and MQTT user properties in, a message id and the exact tensors the
model takes out. Anything malformed raises :class:`PayloadError`, which carries the
message's id when the payload got far enough to name one.

Message ids: a JSON payload's ``"id"``, else the MQTT v5 user property ``id``; when neither
is given the daemon falls back to ``<topic>#<mid>`` (see :func:`fallback_id`), which is only
unique while the message is in flight.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import TensorFormatError
from ..graph import TensorInfo
from ..preprocess import coerce_input, quantize
from .config import LimitsConfig, SensorConfig

__all__ = ["Decoded", "PayloadError", "decode", "fallback_id"]

logger = logging.getLogger(__name__)

# Refuse to decode images larger than this many pixels: a device has little memory to spare.
MAX_IMAGE_PIXELS = 16 * 1024 * 1024


class PayloadError(TensorFormatError):
    """A sensor message that cannot become a model input; ``message_id`` is its id when known."""

    def __init__(self, message: str, *, message_id: str | None = None) -> None:
        super().__init__(message)
        self.message_id = message_id


@dataclass(frozen=True, slots=True)
class Decoded:
    """A sensor message ready for the model."""

    message_id: str | None
    """The id the message carried, or None (the caller falls back to topic and mid)."""
    feeds: dict[str, np.ndarray]


def fallback_id(topic: str, mid: int) -> str:
    """The id of a message that carries none: its topic and MQTT packet id."""
    return f"{topic}#{mid}"


def decode(
    payload: bytes,
    sensor: SensorConfig,
    inputs: Sequence[TensorInfo],
    properties: Mapping[str, str] | None = None,
    limits: LimitsConfig | None = None,
) -> Decoded:
    """Decode one message from ``sensor`` into feeds for a model with ``inputs``.

    Every failure, whatever its cause, is a :class:`PayloadError`: a message always ends in a
    result or an error document.
    """
    limits = limits or LimitsConfig()
    properties = properties or {}
    prop_id = properties.get("id") or None
    if prop_id is not None and len(prop_id) > limits.max_id_chars:
        raise PayloadError(f"the id property has {len(prop_id):,} characters; at most {limits.max_id_chars}")
    if len(payload) > limits.max_payload_bytes:
        raise PayloadError(
            f"the payload is {len(payload):,} bytes; at most {limits.max_payload_bytes:,}", message_id=prop_id
        )
    try:
        if sensor.format == "json":
            return _decode_json(payload, sensor, inputs, prop_id, limits)
        target = _target(sensor, inputs, prop_id)
        try:
            if sensor.format == "raw":
                array = _decode_raw(payload, sensor, target, properties, limits)
            else:
                array = _decode_image(payload, sensor, target)
        except TensorFormatError as err:
            raise PayloadError(str(err), message_id=prop_id) from err
        return Decoded(prop_id, {target.name: array})
    except PayloadError:
        raise
    except Exception as err:  # a decoder's own failure on input nobody foresaw: still the payload's fault
        raise PayloadError(
            f"cannot decode the payload: {type(err).__name__}: {str(err)[:200]}", message_id=prop_id
        ) from err


# -- JSON -----------------------------------------------------------------------------


def _decode_json(
    payload: bytes,
    sensor: SensorConfig,
    inputs: Sequence[TensorInfo],
    prop_id: str | None,
    limits: LimitsConfig,
) -> Decoded:
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PayloadError(f"not valid JSON: {err}", message_id=prop_id) from err
    except RecursionError as err:
        raise PayloadError(
            f"the JSON is nested deeper than {limits.max_json_depth} levels", message_id=prop_id
        ) from err
    if _nesting(payload, doc, limits.max_json_depth + 1) > limits.max_json_depth:
        raise PayloadError(
            f"the JSON is nested deeper than {limits.max_json_depth} levels", message_id=prop_id
        )
    if not isinstance(doc, dict):
        raise PayloadError('a JSON payload must be an object: {"id": ..., "data": [...]}', message_id=prop_id)
    message_id = prop_id
    if "id" in doc:
        raw_id = doc["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or raw_id == "":
            raise PayloadError(
                f'"id" must be a non-empty string or an integer, got {raw_id!r:.40}', message_id=prop_id
            )
        message_id = str(raw_id)
        if len(message_id) > limits.max_id_chars:
            raise PayloadError(f'"id" has {len(message_id):,} characters; at most {limits.max_id_chars}')
    if "data" not in doc:
        raise PayloadError('the JSON object has no "data"', message_id=message_id)
    data = doc["data"]
    try:
        if isinstance(data, dict):
            feeds = _json_feeds(data, inputs)
        else:
            target = _target(sensor, inputs, message_id)
            feeds = {target.name: _json_array(data, target)}
    except TensorFormatError as err:
        raise PayloadError(str(err), message_id=message_id) from err
    return Decoded(message_id, feeds)


def _json_feeds(data: dict[str, Any], inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    by_name = {t.name: t for t in inputs}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        raise TensorFormatError(
            f'"data" names unknown input(s) {", ".join(unknown)}; inputs: {", ".join(by_name)}'
        )
    missing = [name for name in by_name if name not in data]
    if missing:
        raise TensorFormatError(f'"data" lacks input(s) {", ".join(missing)}')
    return {name: _json_array(data[name], tensor) for name, tensor in by_name.items()}


# A string once its escapes are gone (_unescaped): one character class, matched in linear time and
# constant memory. The escape-aware pattern "(?:[^"\\]|\\.)*" backtracked, keeping about 120 bytes of
# state per character: an 8 MiB string cost the daemon a gigabyte.
_JSON_STRING = re.compile(rb'"[^"]*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _nesting(payload: bytes, doc: Any, stop: int) -> int:
    """How deeply arrays and objects nest in a parsed JSON payload, counted up to ``stop``: from its
    text's brackets outside strings when it is ASCII (a scan in C, where walking a thousand numbers
    one by one cost the daemon a fifth of its time), else by walking ``doc``."""
    if not payload.isascii():
        return _depth(doc, stop)
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub(b'""', _unescaped(payload))):
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest >= stop:
                    return deepest
        else:
            depth -= 1
    return deepest


def _unescaped(payload: bytes) -> bytes:
    """``payload`` (valid JSON) without its escaped backslashes and quotes, so that no quote is left
    inside a string. Escaped backslashes go first: a string may end in one, right before its quote."""
    return payload.replace(b"\\\\", b"").replace(b'\\"', b"")


def _depth(value: Any, stop: int) -> int:
    """How deeply arrays and objects nest in ``value`` (a number is 0), counted up to ``stop``."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (list, dict)):
            level += 1
            deepest = max(deepest, level)
            if deepest >= stop:
                return deepest
            todo.extend((child, level) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _json_array(data: Any, tensor: TensorInfo) -> np.ndarray:
    """Nested or flat numbers: integers are taken as the input's type, reals are quantized.

    Any nesting is taken whose shape is the input's once dimensions of size 1 are dropped
    ([32][32] for an input of [1, 32, 32, 1]), and a flat list of the right length.
    """
    if not isinstance(data, list):
        raise TensorFormatError(f'"data" must be an array of numbers, got {type(data).__name__}')
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError, TypeError) as err:
        raise TensorFormatError(f'"data" is not a regular array of numbers: {err}') from err
    if array.dtype.kind not in "iuf":
        raise TensorFormatError(
            f'"data" must hold only numbers in nested lists of equal length (got {array.dtype.kind!r} elements)'
        )
    size = math.prod(tensor.shape)
    if array.shape != tensor.shape and array.size == size:
        if array.ndim == 1 or _squeezed(array.shape) == _squeezed(tensor.shape):
            array = array.reshape(tensor.shape)
    return _checked(array, tensor)


# -- raw tensor bytes -----------------------------------------------------------------


def _decode_raw(
    payload: bytes,
    sensor: SensorConfig,
    tensor: TensorInfo,
    properties: Mapping[str, str],
    limits: LimitsConfig,
) -> np.ndarray:
    dtype_name = properties.get("dtype") or sensor.dtype or tensor.dtype.name
    try:
        dtype = np.dtype(dtype_name)
    except (TypeError, ValueError, SyntaxError) as err:
        raise TensorFormatError(f"unknown dtype {dtype_name[:40]!r}") from err
    if dtype.kind not in "iuf":
        raise TensorFormatError(f"dtype {dtype_name!r} is not an integer or floating type")
    shape = (
        _parse_shape(properties["shape"], limits.max_shape_rank)
        if "shape" in properties
        else tuple(sensor.shape or tensor.shape)
    )
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) != expected:
        raise TensorFormatError(
            f"raw payload is {len(payload)} bytes; {dtype.name}{list(shape)} needs {expected}"
        )
    # Multi-byte elements travel little-endian, whatever the device's own byte order.
    array = np.frombuffer(payload, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    if array.size == math.prod(tensor.shape):
        array = array.reshape(tensor.shape)  # bytes are row-major: [32, 32] and [1, 32, 32, 1] are the same
    return _checked(array, tensor)


def _parse_shape(text: str, max_rank: int) -> tuple[int, ...]:
    """A shape property: ``1,32,32,1``, ``[1, 32, 32, 1]`` or ``1x32x32x1``, of at most ``max_rank`` sizes."""
    shown = repr(text[:40] + ("…" if len(text) > 40 else ""))
    cleaned = text.strip().strip("[]()").replace("x", ",")
    parts = [part for part in cleaned.split(",") if part.strip()]
    if len(parts) > max_rank:
        raise TensorFormatError(f"shape property has {len(parts)} dimensions; at most {max_rank}")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError as err:
        raise TensorFormatError(f"shape property {shown} is not a list of sizes") from err
    if not shape or any(d <= 0 for d in shape):
        raise TensorFormatError(f"shape property {shown} is not a list of positive sizes")
    return shape


# -- images ---------------------------------------------------------------------------


def _decode_image(payload: bytes, sensor: SensorConfig, tensor: TensorInfo) -> np.ndarray:
    height, width, channels = _image_geometry(tensor)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise TensorFormatError(
                    f"image is {image.format or 'of an unknown format'}; send PNG or JPEG"
                )
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise TensorFormatError(
                    f"image is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels"
                )
            converted = image.convert("L" if channels == 1 else "RGB")
            resized = converted.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(resized, dtype=np.float64)
    except TensorFormatError:
        raise
    # Pillow's decoders raise many kinds of exception on corrupt data (OSError, SyntaxError,
    # ValueError, EOFError, zlib errors...); each means the same thing here.
    except Exception as err:
        raise TensorFormatError(f"not a readable PNG or JPEG image: {err}") from err
    real = pixels * sensor.image_scale + sensor.image_offset
    real = real.reshape(tensor.shape)
    if np.issubdtype(tensor.dtype, np.integer):
        return quantize(real, tensor)
    return real.astype(tensor.dtype)


def _image_geometry(tensor: TensorInfo) -> tuple[int, int, int]:
    """(height, width, channels) of an NHWC or NHW image input."""
    shape = tensor.shape
    if len(shape) == 4 and shape[0] == 1 and shape[3] in (1, 3):
        return shape[1], shape[2], shape[3]
    if len(shape) == 3 and shape[0] == 1:
        return shape[1], shape[2], 1
    raise TensorFormatError(
        f"input {tensor.name!r} of shape {list(shape)} is not an image: expected [1, H, W, 1 or 3]"
    )


# -- shared ---------------------------------------------------------------------------


def _target(sensor: SensorConfig, inputs: Sequence[TensorInfo], message_id: str | None) -> TensorInfo:
    if sensor.input is not None:
        for tensor in inputs:
            if tensor.name == sensor.input:
                return tensor
        raise PayloadError(f"the model has no input {sensor.input!r}", message_id=message_id)
    if len(inputs) != 1:
        raise PayloadError(
            f'the model has {len(inputs)} inputs; send "data" as an object keyed by input name',
            message_id=message_id,
        )
    return inputs[0]


def _checked(array: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        raise TensorFormatError(f"input {tensor.name!r}: values must be finite numbers")
    return coerce_input(array, tensor)
