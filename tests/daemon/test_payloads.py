"""Payload decoding: JSON, raw bytes and images into the exact tensor the model takes; errors carry the id."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edge import models
from edge.daemon.config import SensorConfig
from edge.daemon.payloads import PayloadError, _depth, _nesting, decode, fallback_id
from edge.graph import ModelGraph, TensorInfo
from edge.preprocess import quantize

GRAPH = ModelGraph.from_file(models.model_path("digits_resnet"))
FLOAT_GRAPH = ModelGraph.from_file(models.model_path("digits_resnet_f32"))
RGB_GRAPH = ModelGraph.from_file(models.model_path("mobilenetv2_035"))
INPUT = GRAPH.inputs[0]
SAMPLE = models.digits_sample()
JSON = SensorConfig(topic="s/+", format="json")
RAW = SensorConfig(topic="s/+", format="raw")
IMAGE = SensorConfig(topic="s/+", format="image")


def as_json(**doc: Any) -> bytes:
    return json.dumps(doc).encode()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def digit_image(i: int, size: int = 32) -> Image.Image:
    pixels = (SAMPLE.x_float[i, :, :, 0] * 255).round().astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST)


@pytest.mark.parametrize("shape", ["nested", "unbatched", "flat"])
def test_json_int8_in_any_layout(shape: str) -> None:
    x = SAMPLE.x[0]  # [32, 32, 1]
    data = {"nested": x[None], "unbatched": x, "flat": x.reshape(-1)}[shape].tolist()
    decoded = decode(as_json(id="a1", data=data), JSON, GRAPH.inputs)
    assert decoded.message_id == "a1"
    (array,) = decoded.feeds.values()
    assert array.dtype == np.int8 and array.shape == (1, 32, 32, 1)
    np.testing.assert_array_equal(array, SAMPLE.x[:1])


def test_json_reals_are_quantized_with_the_input_scale() -> None:
    decoded = decode(as_json(id=7, data=SAMPLE.x_float[0].tolist()), JSON, GRAPH.inputs)
    assert decoded.message_id == "7"
    np.testing.assert_array_equal(decoded.feeds[INPUT.name], quantize(SAMPLE.x_float[:1], INPUT))
    np.testing.assert_array_equal(decoded.feeds[INPUT.name], SAMPLE.x[:1])  # the shipped sample agrees


def test_json_for_a_float_model_is_taken_as_is() -> None:
    decoded = decode(as_json(data=SAMPLE.x_float[0].tolist()), JSON, FLOAT_GRAPH.inputs)
    assert decoded.message_id is None
    (array,) = decoded.feeds.values()
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, SAMPLE.x_float[:1].astype(np.float32))


def test_json_data_keyed_by_input_name() -> None:
    decoded = decode(as_json(data={INPUT.name: SAMPLE.x[1].tolist()}), JSON, GRAPH.inputs)
    np.testing.assert_array_equal(decoded.feeds[INPUT.name], SAMPLE.x[1:2])


def test_the_id_comes_from_json_then_from_the_user_property() -> None:
    data = SAMPLE.x[0].tolist()
    assert decode(as_json(id="j", data=data), JSON, GRAPH.inputs, {"id": "p"}).message_id == "j"
    assert decode(as_json(data=data), JSON, GRAPH.inputs, {"id": "p"}).message_id == "p"
    assert decode(SAMPLE.x[0].tobytes(), RAW, GRAPH.inputs, {"id": "r"}).message_id == "r"
    assert decode(SAMPLE.x[0].tobytes(), RAW, GRAPH.inputs).message_id is None
    assert fallback_id("sensors/a/digits", 17) == "sensors/a/digits#17"


@pytest.mark.parametrize(
    ("payload", "message_id", "problem"),
    [
        (b'{"id": "x", "data": [1, 2', None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[1, 2, 3]", None, "must be an object"),
        (as_json(id="x"), "x", 'no "data"'),
        (as_json(id=True, data=[1]), None, '"id" must be'),
        (as_json(id={"a": 1}, data=[1]), None, '"id" must be'),
        (as_json(id="x", data=[[1, 2], [3, 4]]), "x", "must have shape [1, 32, 32, 1], got [2, 2]"),
        (as_json(id="x", data=[1] * 1023), "x", "must have shape"),
        (as_json(id="x", data=[[1, 2], [3]]), "x", "regular array"),
        (as_json(id="x", data=["a", "b"]), "x", "only numbers"),
        (as_json(id="x", data=7), "x", "must be an array"),
        (as_json(id="x", data=[500] * 1024), "x", "do not fit"),
        (as_json(id="x", data={"nope": [1]}), "x", "unknown input(s) nope"),
        (b'{"id": "x", "data": [NaN]}', "x", "finite"),
    ],
)
def test_bad_json_is_named_and_keeps_the_id(payload: bytes, message_id: str | None, problem: str) -> None:
    with pytest.raises(PayloadError) as err:
        decode(payload, JSON, GRAPH.inputs)
    assert problem in str(err.value)
    assert err.value.message_id == message_id


def test_raw_int8_with_the_inputs_own_type_and_shape() -> None:
    decoded = decode(SAMPLE.x[2].tobytes(), RAW, GRAPH.inputs)
    np.testing.assert_array_equal(decoded.feeds[INPUT.name], SAMPLE.x[2:3])


@pytest.mark.parametrize("shape", ["1,32,32,1", "[32, 32, 1]", "32x32", "1024"])
def test_raw_float32_from_user_properties_is_quantized(shape: str) -> None:
    payload = SAMPLE.x_float[2].astype("<f4").tobytes()
    decoded = decode(payload, RAW, GRAPH.inputs, {"dtype": "float32", "shape": shape})
    np.testing.assert_array_equal(decoded.feeds[INPUT.name], SAMPLE.x[2:3])


def test_raw_dtype_and_shape_from_the_sensor_config() -> None:
    sensor = SensorConfig(topic="s", format="raw", dtype="float64", shape=[32, 32])
    payload = SAMPLE.x_float[3].astype("<f8").tobytes()
    np.testing.assert_array_equal(decode(payload, sensor, GRAPH.inputs).feeds[INPUT.name], SAMPLE.x[3:4])


@pytest.mark.parametrize(
    ("payload", "properties", "problem"),
    [
        (b"\x00" * 1021, {}, "raw payload is 1021 bytes; int8[1, 32, 32, 1] needs 1024"),
        (b"\x00" * 1024, {"dtype": "float32"}, "needs 4096"),
        (b"\x00" * 1024, {"dtype": "complex-ish"}, "unknown dtype 'complex-ish'"),
        (b"\x00" * 1024, {"dtype": "bool"}, "not an integer or floating type"),
        (b"\x00" * 1024, {"shape": "a,b"}, "not a list of sizes"),
        (b"\x00" * 1024, {"shape": "0,1024"}, "positive sizes"),
        (b"\x00" * 2048, {"shape": "2,32,32,1"}, "must have shape"),
        (b"\x00" * 2048, {"shape": "2048"}, "must have shape"),
        (np.full(1024, np.inf, "<f4").tobytes(), {"dtype": "float32"}, "finite"),
    ],
)
def test_bad_raw_payloads(payload: bytes, properties: dict[str, str], problem: str) -> None:
    with pytest.raises(PayloadError) as err:
        decode(payload, RAW, GRAPH.inputs, {"id": "r1", **properties})
    assert problem in str(err.value)
    assert err.value.message_id == "r1"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_images_are_resized_converted_and_quantized(fmt: str) -> None:
    exact = decode(encoded(digit_image(4), "PNG"), IMAGE, GRAPH.inputs).feeds[INPUT.name]
    pixels = np.asarray(digit_image(4), dtype=np.float64).reshape(INPUT.shape)
    np.testing.assert_array_equal(exact, quantize(pixels / 255, INPUT))  # lossless, already 32x32: exact
    rgb_big = digit_image(4, 96).convert("RGB")
    decoded = decode(encoded(rgb_big, fmt), IMAGE, GRAPH.inputs, {"id": "cam"})
    assert decoded.message_id == "cam"
    array = decoded.feeds[INPUT.name]
    assert array.dtype == np.int8 and array.shape == (1, 32, 32, 1)
    assert np.abs(array.astype(int) - SAMPLE.x[4:5].astype(int)).mean() < 20


def test_grayscale_to_an_rgb_input_with_scale_and_offset() -> None:
    sensor = SensorConfig(topic="c", format="image", image_scale=2 / 255, image_offset=-1.0)
    tensor: TensorInfo = RGB_GRAPH.inputs[0]
    array = decode(encoded(Image.new("L", (50, 40), 255), "PNG"), sensor, RGB_GRAPH.inputs).feeds[tensor.name]
    assert array.shape == (1, 224, 224, 3)
    np.testing.assert_array_equal(array, quantize(np.ones(tensor.shape), tensor))


def test_bad_images() -> None:
    good = bytearray(encoded(digit_image(1), "PNG"))
    corrupt = bytes(good[:40]) + b"\x00" * 40 + bytes(good[80:])
    truncated = bytes(good[: len(good) // 2])
    for payload, problem in [
        (corrupt, "not a readable PNG or JPEG"),
        (truncated, "not a readable PNG or JPEG"),
        (b"hello", "not a readable PNG or JPEG"),
        (encoded(Image.new("L", (8, 8)), "GIF"), "image is GIF; send PNG or JPEG"),
        (encoded(Image.new("L", (5000, 4000)), "PNG"), "at most"),
    ]:
        with pytest.raises(PayloadError) as err:
            decode(payload, IMAGE, GRAPH.inputs, {"id": "i"})
        assert problem in str(err.value)
        assert err.value.message_id == "i"


@pytest.mark.parametrize(
    ("sensor", "payload", "properties", "needle"),
    [
        (JSON, b'{"data": ' + b"[" * 2000 + b"]" * 2000 + b"}", {}, "nested deeper than 16"),
        (JSON, b'{"data": ' + b"[" * 20 + b"0" + b"]" * 20 + b"}", {}, "nested deeper than 16"),
        (RAW, SAMPLE.x[0].tobytes(), {"shape": ",".join(["1"] * 65)}, "65 dimensions; at most 8"),
        (RAW, SAMPLE.x[0].tobytes(), {"dtype": "V99999999999999999999"}, "unknown dtype"),
        (RAW, SAMPLE.x[0].tobytes(), {"dtype": "(" * 500}, "unknown dtype"),
        (JSON, as_json(id="x" * 300, data=[0] * 1024), {}, '"id" has 300 characters; at most 256'),
        (RAW, SAMPLE.x[0].tobytes(), {"id": "y" * 300}, "id property has 300 characters"),
        (RAW, b"\x00" * (8 * 1024 * 1024 + 1), {}, "at most 8,388,608"),
    ],
    ids=["deep-2000", "deep-20", "rank-65", "dtype-huge", "dtype-parens", "json-id", "property-id", "size"],
)
def test_the_decoders_are_bounded(
    sensor: SensorConfig, payload: bytes, properties: dict[str, str], needle: str
) -> None:
    with pytest.raises(PayloadError) as err:
        decode(payload, sensor, GRAPH.inputs, properties)
    assert needle in str(err.value)
    assert len(str(err.value)) < 500


def test_json_of_any_nesting_with_the_inputs_shape_is_taken() -> None:
    x = SAMPLE.x[2]
    expected = x.reshape(INPUT.shape)
    for data in (x.reshape(32, 32).tolist(), x.reshape(1, 32, 32).tolist(), x.reshape(32, 32, 1).tolist()):
        got = decode(as_json(id="n", data=data), JSON, GRAPH.inputs).feeds[INPUT.name]
        assert np.array_equal(got, expected)
    with pytest.raises(PayloadError, match="shape"):
        decode(as_json(id="n", data=x.reshape(16, 64).tolist()), JSON, GRAPH.inputs)


def _mutations(seed: int, base: bytes, count: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 8))):
            choice = rng.integers(0, 4)
            at = int(rng.integers(0, max(len(data), 1)))
            if choice == 0 and data:
                data[at] = int(rng.integers(0, 256))
            elif choice == 1:
                data[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
            elif choice == 2 and data:
                del data[at : at + int(rng.integers(1, 32))]
            else:
                data = data[: at or 1]
        out.append(bytes(data))
    return out


def test_fuzzed_payloads_decode_or_raise_payload_error_only() -> None:
    """3,000 mutated JSON, raw and image payloads: each becomes feeds or one PayloadError, nothing else."""
    cases = [
        (JSON, as_json(id="j", data=SAMPLE.x[0].reshape(-1).tolist()), {}),
        (JSON, as_json(id="k", data={INPUT.name: SAMPLE.x_float[1].reshape(32, 32).tolist()}), {}),
        (RAW, SAMPLE.x[0].tobytes(), {"dtype": "int8", "shape": "1,32,32,1"}),
        (IMAGE, encoded(digit_image(2), "PNG"), {}),
    ]
    outcomes = {"decoded": 0, "refused": 0}
    for n, (sensor, base, properties) in enumerate(cases):
        for payload in _mutations(n, base, 750):
            try:
                decoded = decode(payload, sensor, GRAPH.inputs, properties)
            except PayloadError:
                outcomes["refused"] += 1
            else:
                assert decoded.feeds[INPUT.name].shape == INPUT.shape
                outcomes["decoded"] += 1
    assert sum(outcomes.values()) == 3000 and outcomes["refused"] > 0


def _random_json(rng: np.random.Generator, depth: int) -> object:
    kind = rng.integers(0, 5) if depth < 6 else rng.integers(3, 5)
    if kind == 0:
        return [_random_json(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    if kind == 1:
        return {f"k{i}[{{": _random_json(rng, depth + 1) for i in range(rng.integers(0, 3))}
    if kind == 2:
        return ['"]}[{\\', "\\\\", 'x\\"[[', "é[{"][int(rng.integers(0, 4))]
    if kind == 3:
        return float(rng.standard_normal())
    return int(rng.integers(-5, 5))


@pytest.mark.parametrize("seed", range(200))
def test_the_text_scan_of_nesting_agrees_with_walking_the_document(seed: int) -> None:
    """Brackets inside strings, escaped quotes and backslashes included; ASCII and not."""
    doc = _random_json(np.random.default_rng(seed), 0)
    for ensure_ascii in (True, False):
        text = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
        assert _nesting(text, doc, 99) == _depth(doc, 99), text[:200]


@pytest.mark.parametrize("fill", ["x", '\\"', "\\\\"], ids=["plain", "escaped-quotes", "escaped-backslashes"])
def test_the_nesting_scan_of_a_huge_string_takes_little_memory(fill: str) -> None:
    """An 8 MiB JSON string cost about 1 GB: the escape-aware pattern backtracked per character. In a
    process of its own, the scan's peak must stay within a few copies of the payload."""
    code = f"""
import json, resource, sys
from edge.daemon.payloads import _nesting
text = b'{{"id": "a", "data": [[1, 2]], "note": "' + {fill!r}.encode() * (8 * 1024 * 1024 // {len(fill)}) + b'"}}'
doc = json.loads(text)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert _nesting(text, doc, 99) == 3
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 64, f"the scan grew the process by {proc.stdout.strip()} MiB"
