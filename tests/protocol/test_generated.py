"""The committed generated code: up to date, and wire-compatible with Triton's and KServe's protos.

The field numbers below are the public definitions (kserve/open-inference-protocol
open_inference_grpc.proto; triton-inference-server/common grpc_service.proto for
ModelStreamInfer). They are read back from our descriptor, and compared with the protos
tritonclient compiles into its own package.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2 as triton_pb

from edge.protocol import SERVICE_NAME, pb

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py")

# (message, field) -> field number, as published.
FIELD_NUMBERS = {
    ("ServerLiveResponse", "live"): 1,
    ("ServerReadyResponse", "ready"): 1,
    ("ModelReadyRequest", "name"): 1,
    ("ModelReadyRequest", "version"): 2,
    ("ModelReadyResponse", "ready"): 1,
    ("ServerMetadataResponse", "name"): 1,
    ("ServerMetadataResponse", "version"): 2,
    ("ServerMetadataResponse", "extensions"): 3,
    ("ModelMetadataRequest", "name"): 1,
    ("ModelMetadataRequest", "version"): 2,
    ("ModelMetadataResponse", "name"): 1,
    ("ModelMetadataResponse", "versions"): 2,
    ("ModelMetadataResponse", "platform"): 3,
    ("ModelMetadataResponse", "inputs"): 4,
    ("ModelMetadataResponse", "outputs"): 5,
    ("ModelMetadataResponse.TensorMetadata", "name"): 1,
    ("ModelMetadataResponse.TensorMetadata", "datatype"): 2,
    ("ModelMetadataResponse.TensorMetadata", "shape"): 3,
    ("InferParameter", "bool_param"): 1,
    ("InferParameter", "int64_param"): 2,
    ("InferParameter", "string_param"): 3,
    ("InferParameter", "double_param"): 4,
    ("InferParameter", "uint64_param"): 5,
    ("InferTensorContents", "bool_contents"): 1,
    ("InferTensorContents", "int_contents"): 2,
    ("InferTensorContents", "int64_contents"): 3,
    ("InferTensorContents", "uint_contents"): 4,
    ("InferTensorContents", "uint64_contents"): 5,
    ("InferTensorContents", "fp32_contents"): 6,
    ("InferTensorContents", "fp64_contents"): 7,
    ("InferTensorContents", "bytes_contents"): 8,
    ("ModelInferRequest", "model_name"): 1,
    ("ModelInferRequest", "model_version"): 2,
    ("ModelInferRequest", "id"): 3,
    ("ModelInferRequest", "parameters"): 4,
    ("ModelInferRequest", "inputs"): 5,
    ("ModelInferRequest", "outputs"): 6,
    ("ModelInferRequest", "raw_input_contents"): 7,
    ("ModelInferRequest.InferInputTensor", "name"): 1,
    ("ModelInferRequest.InferInputTensor", "datatype"): 2,
    ("ModelInferRequest.InferInputTensor", "shape"): 3,
    ("ModelInferRequest.InferInputTensor", "parameters"): 4,
    ("ModelInferRequest.InferInputTensor", "contents"): 5,
    ("ModelInferRequest.InferRequestedOutputTensor", "name"): 1,
    ("ModelInferRequest.InferRequestedOutputTensor", "parameters"): 2,
    ("ModelInferResponse", "model_name"): 1,
    ("ModelInferResponse", "model_version"): 2,
    ("ModelInferResponse", "id"): 3,
    ("ModelInferResponse", "parameters"): 4,
    ("ModelInferResponse", "outputs"): 5,
    ("ModelInferResponse", "raw_output_contents"): 6,
    ("ModelInferResponse.InferOutputTensor", "name"): 1,
    ("ModelInferResponse.InferOutputTensor", "datatype"): 2,
    ("ModelInferResponse.InferOutputTensor", "shape"): 3,
    ("ModelInferResponse.InferOutputTensor", "parameters"): 4,
    ("ModelInferResponse.InferOutputTensor", "contents"): 5,
    ("ModelStreamInferResponse", "error_message"): 1,
    ("ModelStreamInferResponse", "infer_response"): 2,
    ("RepositoryIndexRequest", "repository_name"): 1,
    ("RepositoryIndexRequest", "ready"): 2,
    ("RepositoryIndexResponse", "models"): 1,
    ("RepositoryIndexResponse.ModelIndex", "name"): 1,
    ("RepositoryIndexResponse.ModelIndex", "version"): 2,
    ("RepositoryIndexResponse.ModelIndex", "state"): 3,
    ("RepositoryIndexResponse.ModelIndex", "reason"): 4,
    ("ModelRepositoryParameter", "bool_param"): 1,
    ("ModelRepositoryParameter", "int64_param"): 2,
    ("ModelRepositoryParameter", "string_param"): 3,
    ("ModelRepositoryParameter", "bytes_param"): 4,
    ("RepositoryModelLoadRequest", "repository_name"): 1,
    ("RepositoryModelLoadRequest", "model_name"): 2,
    ("RepositoryModelLoadRequest", "parameters"): 3,
    ("RepositoryModelUnloadRequest", "repository_name"): 1,
    ("RepositoryModelUnloadRequest", "model_name"): 2,
    ("RepositoryModelUnloadRequest", "parameters"): 3,
}

# rpc -> (request, response, client streaming, server streaming)
METHODS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse", False, False),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse", False, False),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse", False, False),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse", False, False),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse", False, False),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse", False, False),
    "ModelStreamInfer": ("ModelInferRequest", "ModelStreamInferResponse", True, True),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse", False, False),
    "RepositoryModelLoad": ("RepositoryModelLoadRequest", "RepositoryModelLoadResponse", False, False),
    "RepositoryModelUnload": ("RepositoryModelUnloadRequest", "RepositoryModelUnloadResponse", False, False),
}


def message_descriptor(module, dotted: str) -> Descriptor:
    top, *nested = dotted.split(".")
    descriptor = module.DESCRIPTOR.message_types_by_name[top]
    for name in nested:
        descriptor = descriptor.nested_types_by_name[name]
    return descriptor


def all_messages(descriptor: Descriptor, prefix: str = ""):
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            yield from all_messages(nested, f"{prefix}{descriptor.name}.")
    yield f"{prefix}{descriptor.name}", descriptor


# -- the committed code is what the script generates --------------------------------------


def test_regenerating_changes_no_byte(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    committed_grpc = (ROOT / "edge" / "protocol" / "grpc_service_pb2_grpc.py").read_text(encoding="utf-8")
    match = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed_grpc)
    generated_by = match.group(1) if match else "unknown"
    installed = importlib.metadata.version("grpcio-tools")
    stale = [
        name
        for name in GENERATED
        if (tmp_path / name).read_bytes() != (ROOT / "edge" / "protocol" / name).read_bytes()
    ]
    assert not stale, (
        f"{stale} differ from what tools/gen_protos.py generates: run it and commit the result "
        f"(committed code comes from grpcio-tools {generated_by}; installed is {installed})"
    )


# -- the descriptor says what the wire needs ----------------------------------------------


def test_service_name_comes_from_the_descriptor() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert SERVICE_NAME == service.full_name


def test_the_service_has_exactly_the_expected_methods() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    found = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert found == METHODS


@pytest.mark.parametrize(("message", "field", "number"), [(m, f, n) for (m, f), n in FIELD_NUMBERS.items()])
def test_field_numbers_match_the_published_protos(message: str, field: str, number: int) -> None:
    assert message_descriptor(pb, message).fields_by_name[field].number == number


def test_every_field_is_listed() -> None:
    ours = {
        (name, field.name)
        for top in pb.DESCRIPTOR.message_types_by_name.values()
        for name, descriptor in all_messages(top)
        for field in descriptor.fields
    }
    assert ours == set(FIELD_NUMBERS)


def test_the_infer_parameter_oneof_holds_all_five_kinds() -> None:
    oneof = pb.InferParameter.DESCRIPTOR.oneofs_by_name["parameter_choice"]
    assert {f.name: f.number for f in oneof.fields} == {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    }


@pytest.mark.parametrize(
    "message",
    sorted({name for top in pb.DESCRIPTOR.message_types_by_name.values() for name, _ in all_messages(top)}),
)
def test_every_message_matches_tritonclients_definition(message: str) -> None:
    ours = message_descriptor(pb, message)
    theirs = message_descriptor(triton_pb, message)

    def shape(descriptor: Descriptor) -> dict[str, tuple]:
        return {
            f.name: (
                f.number,
                f.type,
                f.is_repeated,
                f.message_type.full_name if f.message_type else None,
                f.containing_oneof.name if f.containing_oneof else None,
            )
            for f in descriptor.fields
        }

    assert shape(ours) == shape(theirs)


def test_every_method_matches_tritonclients_service() -> None:
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name,
            other.output_type.full_name,
        )
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        )


def test_our_descriptors_stay_out_of_the_default_pool() -> None:
    # tritonclient (imported above) owns inference.* in the default pool; ours must not clash.
    from google.protobuf import descriptor_pool

    assert pb.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest") is not None


# -- bytes written by one side parse on the other -----------------------------------------


def fill_parameters(parameters) -> None:
    parameters["b"].bool_param = True
    parameters["i"].int64_param = -(2**63)
    parameters["s"].string_param = "héllo"
    parameters["d"].double_param = -1.25e-300
    parameters["u"].uint64_param = 2**64 - 1


def check_parameters(parameters) -> None:
    assert {k: v.WhichOneof("parameter_choice") for k, v in parameters.items()} == {
        "b": "bool_param",
        "i": "int64_param",
        "s": "string_param",
        "d": "double_param",
        "u": "uint64_param",
    }
    assert parameters["b"].bool_param is True
    assert parameters["i"].int64_param == -(2**63)
    assert parameters["s"].string_param == "héllo"
    assert parameters["d"].double_param == -1.25e-300
    assert parameters["u"].uint64_param == 2**64 - 1


def build_request(module):
    request = module.ModelInferRequest(model_name="tail", model_version="7", id="req-1")
    fill_parameters(request.parameters)
    raw = request.inputs.add(name="cut", datatype="INT8", shape=[1, 2, 2, 3])
    fill_parameters(raw.parameters)
    out = request.outputs.add(name="logits")
    fill_parameters(out.parameters)
    request.raw_input_contents.append(bytes(range(12)))
    return request


def check_request(request) -> None:
    assert (request.model_name, request.model_version, request.id) == ("tail", "7", "req-1")
    check_parameters(request.parameters)
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("cut", "INT8", [1, 2, 2, 3])
    check_parameters(tensor.parameters)
    assert [o.name for o in request.outputs] == ["logits"]
    check_parameters(request.outputs[0].parameters)
    assert list(request.raw_input_contents) == [bytes(range(12))]


def build_stream_response(module):
    response = module.ModelStreamInferResponse(error_message="partial failure")
    inner = response.infer_response
    inner.model_name, inner.model_version, inner.id = "tail", "7", "req-1"
    fill_parameters(inner.parameters)
    out = inner.outputs.add(name="logits", datatype="FP32", shape=[1, 2])
    fill_parameters(out.parameters)
    typed = inner.outputs.add(name="typed", datatype="INT64", shape=[2])
    typed.contents.int64_contents.extend([-1, 2**62])
    inner.raw_output_contents.append(b"\x00\x00\x80\x3f\x00\x00\x00\xc0")
    return response


def check_stream_response(response) -> None:
    assert response.error_message == "partial failure"
    inner = response.infer_response
    assert (inner.model_name, inner.model_version, inner.id) == ("tail", "7", "req-1")
    check_parameters(inner.parameters)
    raw, typed = inner.outputs
    assert (raw.name, raw.datatype, list(raw.shape)) == ("logits", "FP32", [1, 2])
    check_parameters(raw.parameters)
    assert list(typed.contents.int64_contents) == [-1, 2**62]
    assert list(inner.raw_output_contents) == [b"\x00\x00\x80\x3f\x00\x00\x00\xc0"]


@pytest.mark.parametrize(
    ("writer", "reader"), [(pb, triton_pb), (triton_pb, pb)], ids=["ours->triton", "triton->ours"]
)
def test_requests_cross_the_wire(writer, reader) -> None:
    data = build_request(writer).SerializeToString()
    check_request(reader.ModelInferRequest.FromString(data))


@pytest.mark.parametrize(
    ("writer", "reader"), [(pb, triton_pb), (triton_pb, pb)], ids=["ours->triton", "triton->ours"]
)
def test_stream_responses_cross_the_wire(writer, reader) -> None:
    data = build_stream_response(writer).SerializeToString()
    check_stream_response(reader.ModelStreamInferResponse.FromString(data))


@pytest.mark.parametrize(
    ("writer", "reader"), [(pb, triton_pb), (triton_pb, pb)], ids=["ours->triton", "triton->ours"]
)
def test_typed_contents_cross_the_wire(writer, reader) -> None:
    request = writer.ModelInferRequest(model_name="m")
    contents = request.inputs.add(name="x", datatype="FP32", shape=[2]).contents
    contents.bool_contents.extend([True, False])
    contents.int_contents.extend([-(2**31), 2**31 - 1])
    contents.int64_contents.extend([-(2**63)])
    contents.uint_contents.extend([2**32 - 1])
    contents.uint64_contents.extend([2**64 - 1])
    contents.fp32_contents.extend([0.5, -2.0])
    contents.fp64_contents.extend([1e300])
    contents.bytes_contents.extend([b"\x00\xff"])
    parsed = reader.ModelInferRequest.FromString(request.SerializeToString()).inputs[0].contents
    assert list(parsed.bool_contents) == [True, False]
    assert list(parsed.int_contents) == [-(2**31), 2**31 - 1]
    assert list(parsed.int64_contents) == [-(2**63)]
    assert list(parsed.uint_contents) == [2**32 - 1]
    assert list(parsed.uint64_contents) == [2**64 - 1]
    assert list(parsed.fp32_contents) == [0.5, -2.0]
    assert list(parsed.fp64_contents) == [1e300]
    assert list(parsed.bytes_contents) == [b"\x00\xff"]


@pytest.mark.parametrize(
    ("ours", "theirs", "fields"),
    [
        (pb.ServerLiveResponse(live=True), "ServerLiveResponse", {"live": True}),
        (pb.ServerReadyResponse(ready=True), "ServerReadyResponse", {"ready": True}),
        (pb.ModelReadyRequest(name="m", version="2"), "ModelReadyRequest", {"name": "m", "version": "2"}),
        (pb.ModelReadyResponse(ready=True), "ModelReadyResponse", {"ready": True}),
        (
            pb.ServerMetadataResponse(name="edge", version="0.1", extensions=["a", "b"]),
            "ServerMetadataResponse",
            {"name": "edge", "version": "0.1", "extensions": ["a", "b"]},
        ),
        (
            pb.ModelMetadataRequest(name="m", version="3"),
            "ModelMetadataRequest",
            {"name": "m", "version": "3"},
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_small_messages_cross_the_wire(ours, theirs: str, fields: dict) -> None:
    parsed = getattr(triton_pb, theirs).FromString(ours.SerializeToString())
    for name, value in fields.items():
        got = getattr(parsed, name)
        assert (list(got) if isinstance(value, list) else got) == value
