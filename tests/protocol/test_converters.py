"""edge.protocol.converters: codec objects to protobuf messages and back.

tritonclient builds and reads messages here too, because it is what users point at the server.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import _utils as triton_utils
from tritonclient.grpc import service_pb2 as triton_pb

from edge.errors import TensorFormatError
from edge.protocol import (
    infer_request_from_pb,
    infer_request_to_pb,
    infer_response_from_pb,
    infer_response_to_pb,
    model_metadata_from_pb,
    model_metadata_to_pb,
    parameters_from_pb,
    parameters_to_pb,
    pb,
    stream_error_from_pb,
    stream_error_to_pb,
)
from edge.wire import (
    Deferred,
    InferRequest,
    InferResponse,
    ModelMetadata,
    TensorMetadata,
    WireTensor,
    decode,
    encode,
)
from helpers import NUMPY_TYPES

# The typed field that carries each datatype in InferTensorContents (FP16 has none).
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values spread over the type's range, extremes included."""
    dtype = np.dtype(NUMPY_TYPES[datatype])
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind == "f":
        values = rng.standard_normal(shape) * 1e3
        return values.astype(dtype)
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    flat = values.reshape(-1)
    if flat.size >= 2:
        flat[0], flat[1] = info.min, info.max
    return values


def round_trip(message, cls):
    return cls.FromString(message.SerializeToString())


# -- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "choice"),
    [
        (True, "bool_param"),
        (False, "bool_param"),
        (np.bool_(True), "bool_param"),
        (0, "int64_param"),
        (-1, "int64_param"),
        (2**63 - 1, "int64_param"),
        (-(2**63), "int64_param"),
        (np.int32(-7), "int64_param"),
        (2**63, "uint64_param"),
        (2**64 - 1, "uint64_param"),
        (1.5, "double_param"),
        (-0.0, "double_param"),
        (float("inf"), "double_param"),
        (np.float32(0.25), "double_param"),
        ("", "string_param"),
        ("héllo", "string_param"),
    ],
    ids=repr,
)
def test_parameters_pick_the_right_oneof_and_round_trip(value, choice: str) -> None:
    message = pb.ModelInferRequest(parameters=parameters_to_pb({"k": value}))
    parsed = round_trip(message, pb.ModelInferRequest)
    assert parsed.parameters["k"].WhichOneof("parameter_choice") == choice
    back = parameters_from_pb(parsed.parameters)["k"]
    assert back == value
    expected_type = {"bool_param": bool, "string_param": str, "double_param": float}.get(choice, int)
    assert type(back) is expected_type


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_ints_outside_int64_and_uint64_are_refused(value: int) -> None:
    with pytest.raises(ValueError, match="'k'"):
        parameters_to_pb({"k": value})


@pytest.mark.parametrize("value", [None, b"bytes", [1], {"a": 1}, 1j])
def test_parameter_values_of_other_types_are_refused(value) -> None:
    with pytest.raises(TypeError, match="'k'"):
        parameters_to_pb({"k": value})


def test_a_parameter_without_a_value_is_refused() -> None:
    message = pb.ModelInferRequest()
    message.parameters["empty"].SetInParent()
    with pytest.raises(TensorFormatError, match="'empty'"):
        parameters_from_pb(message.parameters)


# -- requests and responses ---------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(NUMPY_TYPES))
def test_request_round_trip_over_the_wire(datatype: str) -> None:
    arrays = {
        "a": sample(datatype, (2, 3, 4)),
        "b": sample(datatype, (5,), seed=1),
        "c": sample(datatype, ()),
    }
    request = InferRequest(
        model_name="mobilenet_tail",
        model_version="3",
        id="req-17",
        inputs=tuple(encode(name, array) for name, array in arrays.items()),
        parameters={"cut": 12, "compressed": False, "scale": 0.5, "codec": "raw"},
        outputs=("logits", "probs"),
    )
    message = infer_request_to_pb(request)
    assert len(message.raw_input_contents) == 3
    assert not any(t.HasField("contents") for t in message.inputs)

    parsed = infer_request_from_pb(round_trip(message, pb.ModelInferRequest))
    assert parsed.model_name == "mobilenet_tail"
    assert parsed.model_version == "3"
    assert parsed.id == "req-17"
    assert parsed.outputs == ("logits", "probs")
    assert dict(parsed.parameters) == request.parameters
    assert [t.name for t in parsed.inputs] == ["a", "b", "c"]
    for tensor in parsed.inputs:
        out = decode(tensor)
        assert out.dtype == arrays[tensor.name].dtype
        assert out.tobytes() == arrays[tensor.name].tobytes()


@pytest.mark.parametrize("datatype", sorted(NUMPY_TYPES))
def test_response_round_trip_uses_raw_output_contents(datatype: str) -> None:
    array = sample(datatype, (1, 10))
    response = InferResponse(
        model_name="m", model_version="1", id="r", outputs=(encode("logits", array),), parameters={"t": 3}
    )
    message = infer_response_to_pb(response)
    assert list(message.raw_output_contents) == [array.tobytes()]
    assert not message.outputs[0].HasField("contents")

    parsed = infer_response_from_pb(round_trip(message, pb.ModelInferResponse))
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("m", "1", "r")
    assert dict(parsed.parameters) == {"t": 3}
    assert decode(parsed.outputs[0]).tobytes() == array.tobytes()


def test_memoryview_data_is_sent_as_bytes() -> None:
    array = np.arange(6, dtype=np.float32)
    request = InferRequest(model_name="m", inputs=(WireTensor("x", "FP32", (6,), memoryview(array)),))
    assert infer_request_to_pb(request).raw_input_contents[0] == array.tobytes()


# -- typed contents -----------------------------------------------------------------------


def typed_request(name: str, datatype: str, shape: tuple[int, ...], **contents) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return message


@pytest.mark.parametrize("datatype", sorted(TYPED_FIELDS))
def test_typed_contents_become_bytes_of_the_declared_datatype(datatype: str) -> None:
    array = sample(datatype, (3, 4))
    message = typed_request(
        "x", datatype, array.shape, **{TYPED_FIELDS[datatype]: array.reshape(-1).tolist()}
    )
    (tensor,) = infer_request_from_pb(round_trip(message, pb.ModelInferRequest)).inputs
    # Converted when decoded, not when read: the request is checked against the model first.
    assert isinstance(tensor.data, Deferred) and tensor.nbytes == array.nbytes
    np.testing.assert_array_equal(decode(tensor), array)
    assert decode(tensor).tobytes() == array.tobytes()


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT8", 128), ("INT8", -129), ("INT16", 2**15), ("UINT8", 256), ("UINT16", 2**16)],
)
def test_typed_values_out_of_range_for_the_datatype_are_refused(datatype: str, value: int) -> None:
    message = typed_request("x", datatype, (2,), **{TYPED_FIELDS[datatype]: [0, value]})
    (tensor,) = infer_request_from_pb(message).inputs
    with pytest.raises(TensorFormatError, match=f"'x'.*out of range for {datatype}"):
        decode(tensor)


def test_typed_contents_in_the_wrong_field_are_refused() -> None:
    message = typed_request("x", "FP32", (2,), int_contents=[1, 2])
    with pytest.raises(TensorFormatError, match="'x' of datatype FP32 carries int_contents"):
        infer_request_from_pb(message)


@pytest.mark.parametrize("values", [[1.0, 2.0], [1.0] * 7], ids=["short", "long"])
def test_typed_value_count_must_match_the_shape(values: list[float]) -> None:
    message = typed_request("x", "FP32", (2, 3), fp32_contents=values)
    with pytest.raises(
        TensorFormatError, match=f"'x': shape \\[2, 3\\] needs 6 values, fp32_contents has {len(values)}"
    ):
        infer_request_from_pb(message)


def test_fp16_cannot_come_as_typed_contents() -> None:
    message = typed_request("half", "FP16", (1,), fp32_contents=[1.0])
    with pytest.raises(TensorFormatError, match="'half': FP16 can only be sent in raw contents"):
        infer_request_from_pb(message)


def test_unknown_datatype_in_typed_contents_is_named() -> None:
    message = typed_request("s", "BYTES", (1,), bytes_contents=[b"abc"])
    with pytest.raises(TensorFormatError, match=r"'s'.*unknown datatype 'BYTES'"):
        infer_request_from_pb(message)


def test_huge_shape_with_typed_contents_is_refused_without_allocating() -> None:
    message = typed_request("big", "FP32", (2**40, 2**40), fp32_contents=[1.0])
    tracemalloc.start()
    try:
        with pytest.raises(TensorFormatError, match="'big'"):
            infer_request_from_pb(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_an_input_with_no_data_at_all_is_refused() -> None:
    message = typed_request("x", "INT8", (4,))
    with pytest.raises(TensorFormatError, match="'x': shape \\[4\\] needs 4 values"):
        infer_request_from_pb(message)


def test_an_empty_tensor_needs_no_contents() -> None:
    (tensor,) = infer_request_from_pb(typed_request("x", "INT8", (0, 3))).inputs
    assert decode(tensor).shape == (0, 3)


def test_typed_output_contents_are_read_too() -> None:
    # MLServer answers with typed contents unless asked for raw ones.
    message = pb.ModelInferResponse(model_name="m")
    message.outputs.add(name="y", datatype="FP64", shape=[2]).contents.fp64_contents.extend([0.5, -2.0])
    (tensor,) = infer_response_from_pb(message).outputs
    np.testing.assert_array_equal(decode(tensor), np.array([0.5, -2.0]))


# -- raw contents that do not line up -----------------------------------------------------


def test_raw_and_typed_contents_mixed_are_refused() -> None:
    message = infer_request_to_pb(
        InferRequest(
            model_name="m", inputs=(encode("a", np.zeros(2, np.int8)), encode("b", np.zeros(2, np.int8)))
        )
    )
    message.inputs[1].contents.int_contents.extend([0, 0])
    with pytest.raises(TensorFormatError, match=r"input 'b' has typed contents .* raw_input_contents"):
        infer_request_from_pb(message)


@pytest.mark.parametrize("raw_count", [1, 3])
def test_raw_entry_count_must_match_the_inputs(raw_count: int) -> None:
    message = infer_request_to_pb(
        InferRequest(
            model_name="m", inputs=(encode("a", np.zeros(2, np.int8)), encode("b", np.zeros(2, np.int8)))
        )
    )
    del message.raw_input_contents[:]
    message.raw_input_contents.extend([b"\0\0"] * raw_count)
    with pytest.raises(TensorFormatError, match=f"{raw_count} raw_input_contents entries for 2 inputs"):
        infer_request_from_pb(message)


def test_raw_output_count_must_match_the_outputs() -> None:
    message = pb.ModelInferResponse(model_name="m", raw_output_contents=[b"", b""])
    message.outputs.add(name="y", datatype="FP32", shape=[0])
    with pytest.raises(TensorFormatError, match="2 raw_output_contents entries for 1 outputs"):
        infer_response_from_pb(message)


# -- against tritonclient -----------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(NUMPY_TYPES))
def test_a_request_built_by_tritonclient_decodes_to_its_arrays(datatype: str) -> None:
    arrays = {"x": sample(datatype, (2, 5)), "y": sample(datatype, (3,), seed=2)}
    inputs = []
    for name, array in arrays.items():
        infer_input = triton.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    request = triton_utils._get_inference_request(
        model_name="tail",
        inputs=inputs,
        model_version="2",
        request_id="abc",
        outputs=[triton.InferRequestedOutput("out")],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters={"flag": True, "n": 4, "s": "v"},
    )
    parsed = infer_request_from_pb(pb.ModelInferRequest.FromString(request.SerializeToString()))
    assert (parsed.model_name, parsed.model_version, parsed.id, parsed.outputs) == (
        "tail",
        "2",
        "abc",
        ("out",),
    )
    assert dict(parsed.parameters) == {"flag": True, "n": 4, "s": "v"}
    for tensor in parsed.inputs:
        np.testing.assert_array_equal(decode(tensor), arrays[tensor.name])


@pytest.mark.parametrize("datatype", sorted(NUMPY_TYPES))
def test_tritonclient_reads_our_response(datatype: str) -> None:
    array = sample(datatype, (4, 3))
    message = infer_response_to_pb(
        InferResponse(model_name="tail", id="abc", outputs=(encode("out", array),))
    )
    result = triton.InferResult(triton_pb.ModelInferResponse.FromString(message.SerializeToString()))
    got = result.as_numpy("out")
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)
    assert result.get_response().id == "abc"


# -- metadata -----------------------------------------------------------------------------


def test_model_metadata_round_trip() -> None:
    meta = ModelMetadata(
        name="mobilenet_tail",
        versions=("1", "2"),
        platform="tflite",
        inputs=(TensorMetadata("cut_12", "INT8", (-1, 14, 14, 96)),),
        outputs=(TensorMetadata("logits", "FP32", (1, 1000)), TensorMetadata("idx", "INT64", (1,))),
    )
    message = round_trip(model_metadata_to_pb(meta), pb.ModelMetadataResponse)
    assert model_metadata_from_pb(message) == meta
    # tritonclient reads it the same way
    theirs = triton_pb.ModelMetadataResponse.FromString(message.SerializeToString())
    assert [tuple(t.shape) for t in theirs.inputs] == [(-1, 14, 14, 96)]
    assert list(theirs.versions) == ["1", "2"]


@pytest.mark.parametrize(
    "status", ["INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE"]
)
def test_stream_errors_carry_their_status(status: str) -> None:
    message = stream_error_to_pb(status, "input 'x': must be INT8: got FP32")
    wire = pb.ModelStreamInferResponse.FromString(message.SerializeToString())
    assert not wire.HasField("infer_response")
    assert stream_error_from_pb(wire.error_message) == (status, "input 'x': must be INT8: got FP32")


@pytest.mark.parametrize(
    "text", ["inference request for unknown model 'x'", "in ensemble: failed", "NOT_A_STATUS: x", ""]
)
def test_stream_errors_without_a_status_are_unknown(text: str) -> None:
    """Triton's stream errors name no status."""
    assert stream_error_from_pb(text) == ("UNKNOWN", text)


def test_per_tensor_parameters_travel_both_ways() -> None:
    t = encode("x", np.zeros((1, 2), np.int8))
    tagged = WireTensor(t.name, t.datatype, t.shape, t.data, {"edge_encoding": "raw", "note": 3})
    request = infer_request_from_pb(infer_request_to_pb(InferRequest(model_name="m", inputs=(tagged, t))))
    assert dict(request.inputs[0].parameters) == {"edge_encoding": "raw", "note": 3}
    assert dict(request.inputs[1].parameters) == {}
    response = infer_response_from_pb(infer_response_to_pb(InferResponse(model_name="m", outputs=(tagged,))))
    assert dict(response.outputs[0].parameters) == {"edge_encoding": "raw", "note": 3}
