"""The server as a standard Open Inference Protocol endpoint: tritonclient, bad requests, health, reflection."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge import models
from edge.graph import ModelGraph
from edge.partition import split_model
from edge.protocol import SERVICE_NAME, pb, pb_grpc
from edge.runner import ModelRunner
from helpers import seeded_inputs
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.grpc_service import EdgeServer
from server.repository import ModelRepository

MODEL = "digits_resnet"


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))


@pytest.fixture(scope="module")
def triton_client(server: BackgroundServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.address)


def _triton_input(name: str, array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "INT8" if array.dtype == np.int8 else "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def test_tritonclient_health_and_metadata(triton_client: triton.InferenceServerClient, graphs: dict) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert not triton_client.is_model_ready("no_such_model")
    meta = triton_client.get_model_metadata(MODEL)
    graph = graphs[MODEL]
    assert meta.name == MODEL
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (t.name, "INT8", list(t.shape)) for t in graph.inputs
    ]
    assert [(t.name, t.datatype) for t in meta.outputs] == [(t.name, "INT8") for t in graph.outputs]
    assert triton_client.get_server_metadata().name == "edge-server"


def test_tritonclient_whole_model(triton_client: triton.InferenceServerClient, graphs: dict) -> None:
    graph = graphs[MODEL]
    feeds = seeded_inputs(graph, 7)
    ((name, array),) = feeds.items()
    result = triton_client.infer(MODEL, [_triton_input(name, array)])
    expected = ModelRunner(graph).run(feeds)
    for out, want in expected.items():
        assert np.array_equal(result.as_numpy(out), want)


@pytest.mark.parametrize("k", [0, 3, 8, 13, 16])
def test_tritonclient_tail_request(triton_client: triton.InferenceServerClient, graphs: dict, k: int) -> None:
    graph = graphs[MODEL]
    feeds = seeded_inputs(graph, 8)
    part = split_model(graph, k)
    runner = ModelRunner(graph)
    cut = runner.run_head(k, feeds).cut
    inputs = [_triton_input(name, array) for name, array in cut.items()]
    result = triton_client.infer(MODEL, inputs, parameters={"split_point": k, "model_sha256": graph.sha256})
    expected = runner.run(feeds)
    assert len(part.cut.tensors) == len(inputs)
    for out, want in expected.items():
        assert np.array_equal(result.as_numpy(out), want)
    params = result.get_response().parameters
    assert params["split_point"].int64_param == k
    assert params["compute_us"].int64_param >= 0


def _request(graph: ModelGraph, **overrides: object) -> pb.ModelInferRequest:
    """A valid whole-model request for ``graph``, with fields overridden to make it bad."""
    ((name, array),) = seeded_inputs(graph, 0).items()
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=overrides.get("name", name),
        datatype=overrides.get("datatype", "INT8"),
        shape=overrides.get("shape", list(array.shape)),
    )
    request = pb.ModelInferRequest(model_name=overrides.get("model", MODEL))
    if not overrides.get("no_inputs"):
        request.inputs.append(tensor)
        request.raw_input_contents.append(overrides.get("raw", array.tobytes()))
    for key, value in overrides.get("params", {}).items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = value
    return request


BAD_REQUESTS = {
    "wrong-dtype": (
        {"datatype": "FP32", "raw": b"\0" * 4096},
        grpc.StatusCode.INVALID_ARGUMENT,
        "must be INT8",
    ),
    "wrong-shape": ({"shape": [1, 16, 64, 1]}, grpc.StatusCode.INVALID_ARGUMENT, "must have shape"),
    "bytes-do-not-match-shape": ({"raw": b"\0" * 1000}, grpc.StatusCode.INVALID_ARGUMENT, "1000"),
    "missing-input": ({"no_inputs": True}, grpc.StatusCode.INVALID_ARGUMENT, "missing input"),
    "unknown-input": ({"name": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "unexpected input"),
    "huge-declared-shape": (
        {"shape": [2**40, 2**40, 2**20, 1], "raw": b"\0" * 8},
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape",
    ),
    "negative-dimension": ({"shape": [1, -32, 32, 1]}, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "unknown-datatype": ({"datatype": "INT3"}, grpc.StatusCode.INVALID_ARGUMENT, "INT3"),
    "split-point-out-of-range": (
        {"params": {"split_point": 99}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "out of range",
    ),
    "unknown-model": ({"model": "no_such_model"}, grpc.StatusCode.NOT_FOUND, "no_such_model"),
    "model-sha-mismatch": (
        {"params": {"model_sha256": "ab" * 32}},
        grpc.StatusCode.FAILED_PRECONDITION,
        "ab" * 32,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_malformed_requests_are_rejected_and_the_server_keeps_serving(
    case: str, stub: pb_grpc.GRPCInferenceServiceStub, graphs: dict
) -> None:
    overrides, code, text = BAD_REQUESTS[case]
    graph = graphs[MODEL]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_request(graph, **overrides), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()
    if case == "model-sha-mismatch":  # the server's own sha256 is not told to the caller
        assert graph.sha256 not in info.value.details() and "holds another file" in info.value.details()
    reply = stub.ModelInfer(_request(graph), timeout=10)
    assert len(reply.raw_output_contents) == 1 and reply.outputs[0].name == graph.outputs[0].name


def test_message_size_limit_is_enforced(graphs: dict) -> None:
    repository = ModelRepository.from_files([models.model_path(MODEL)])
    with BackgroundServer(EdgeServer(DataPlane(repository), max_message_bytes=512)) as srv:
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(srv.address))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_request(graphs[MODEL]), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stream_infer_answers_each_request(stub: pb_grpc.GRPCInferenceServiceStub, graphs: dict) -> None:
    graph = graphs[MODEL]
    requests = [_request(graph), _request(graph, shape=[2, 2]), _request(graph)]
    replies = list(stub.ModelStreamInfer(iter(requests), timeout=10))
    assert [bool(r.error_message) for r in replies] == [False, True, False]
    assert "must have shape" in replies[1].error_message
    assert replies[2].infer_response.outputs[0].name == graph.outputs[0].name


def test_health_service(server: BackgroundServer) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server: BackgroundServer) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.address))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    reply = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))
    assert reply.file_descriptor_response.file_descriptor_proto


def test_shutdown_stops_serving() -> None:
    srv = BackgroundServer.from_files([models.model_path("digits_tiny")])
    srv.start()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.address))
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    srv.stop()
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(), timeout=2)


def test_metadata_of_an_unknown_model_is_not_found(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="no_such_model"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in info.value.details()


@pytest.mark.parametrize(("encoding", "ok"), [("raw", True), ("zip9", False)])
def test_a_tensor_says_its_encoding(
    stub: pb_grpc.GRPCInferenceServiceStub, graphs: dict, encoding: str, ok: bool
) -> None:
    """The per-tensor ``edge_encoding`` parameter reaches the codec: raw is served, an unknown one refused."""
    graph = graphs[MODEL]
    feeds = seeded_inputs(graph, 9)
    ((name, array),) = feeds.items()
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name=name, datatype="INT8", shape=list(array.shape))
    tensor.parameters["edge_encoding"].string_param = encoding
    request.raw_input_contents.append(array.tobytes())
    if ok:
        reply = stub.ModelInfer(request, timeout=10)
        expected = ModelRunner(graph).run(feeds)
        (out,) = expected
        assert np.array_equal(
            np.frombuffer(reply.raw_output_contents[0], np.int8).reshape(expected[out].shape), expected[out]
        )
    else:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown encoding 'zip9'" in err.value.details()
