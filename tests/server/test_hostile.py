"""Hostile requests against a real server: unparseable bytes, huge names, oversized echoes.

Covered: bytes that do not parse as the request message get INVALID_ARGUMENT with one log line
and no traceback, on every unary method and on a stream, which then still answers; model names,
versions, ids and parameters past their bounds are refused before any lookup; what an error
message repeats of the caller's input is cut short, so a 1 MB name gets NOT_FOUND (not
RESOURCE_EXHAUSTED) and a short log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest

from edge import models
from edge.protocol import SERVICE_NAME, pb, pb_grpc
from helpers import seeded_inputs
from server.embedded import BackgroundServer

MODEL = "digits_tiny"
GARBAGE = b"\xff\xff\xff\xff\x0f" + b"\x00" * 64  # a field tag with a truncated varint length


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer.from_files([models.model_path(MODEL)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def _raw_unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        f"/{SERVICE_NAME}/{method}", request_serializer=None, response_deserializer=None
    )


@pytest.mark.parametrize(
    "method", ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
)
def test_unparseable_bytes_are_invalid_argument_in_one_log_line(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One line, no traceback; and the same refusal again within the minute adds none (a flood of
    them wrote a line each)."""
    with (
        BackgroundServer.from_files([models.model_path(MODEL)]) as fresh,
        grpc.insecure_channel(fresh.address) as ch,
    ):
        for attempt in range(5):
            with caplog.at_level(logging.INFO, logger="server"), pytest.raises(grpc.RpcError) as err:
                _raw_unary(ch, method)(GARBAGE, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid inference." in err.value.details()
            mine = [r for r in caplog.records if r.name.startswith("server")]
            assert len(mine) == 1 and mine[0].exc_info is None and mine[0].levelno == logging.INFO, attempt


def test_a_stream_answers_an_unparseable_message_and_goes_on(channel: grpc.Channel, graphs: dict) -> None:
    graph = graphs[MODEL]
    x = seeded_inputs(graph, 1)
    ((name, array),) = x.items()
    good = pb.ModelInferRequest(model_name=MODEL)
    good.inputs.add(name=name, datatype="INT8", shape=list(array.shape))
    good.raw_input_contents.append(array.tobytes())
    stream = channel.stream_stream(
        f"/{SERVICE_NAME}/ModelStreamInfer",
        request_serializer=None,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    answers = list(stream(iter([GARBAGE, good.SerializeToString(), GARBAGE]), timeout=10))
    assert len(answers) == 3
    assert answers[0].error_message.startswith("INVALID_ARGUMENT: the request")
    assert not answers[1].error_message and answers[1].infer_response.outputs
    assert answers[2].error_message.startswith("INVALID_ARGUMENT: ")


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [
        ("model_name", "m" * 1_000_000, grpc.StatusCode.INVALID_ARGUMENT),
        ("model_name", "m" * 300, grpc.StatusCode.INVALID_ARGUMENT),
        ("model_version", "v" * 20_000, grpc.StatusCode.INVALID_ARGUMENT),
        ("id", "i" * 20_000, grpc.StatusCode.INVALID_ARGUMENT),
        ("model_name", "not_served", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_long_values_are_refused_and_echoed_short(
    channel: grpc.Channel, field: str, value: str, status: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    setattr(request, field, value)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with caplog.at_level(logging.INFO, logger="server"), pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    assert err.value.code() == status
    assert len(err.value.details()) < 400
    assert all(len(r.getMessage()) < 600 for r in caplog.records)


def test_a_long_name_in_metadata_is_not_found_and_short(channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="n" * 100_000), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) < 400


def test_too_many_or_too_long_parameters_are_refused(channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    many = pb.ModelInferRequest(model_name=MODEL)
    for i in range(65):
        many.parameters[f"p{i}"].int64_param = i
    long_value = pb.ModelInferRequest(model_name=MODEL)
    long_value.parameters["model_sha256"].string_param = "0" * 10_000
    for request, needle in ((many, "65 request parameters"), (long_value, "longer than 256")):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    # And the server still serves.
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_an_input_name_past_the_tensor_name_bound_is_refused_short(channel: grpc.Channel) -> None:
    """Graph tensor names may be long (mobilenetv2_035's reach 402 characters), but not unbounded."""
    from server.dataplane import MAX_TENSOR_NAME_CHARS

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="n" * (MAX_TENSOR_NAME_CHARS + 1), datatype="INT8", shape=[1])
    request.raw_input_contents.append(b"\0")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"longer than {MAX_TENSOR_NAME_CHARS}" in err.value.details() and len(err.value.details()) < 400


def test_typed_contents_for_a_wrong_input_are_refused_without_converting_them(graphs: dict) -> None:
    """2 M int64 values (16 MB once converted) for an input that does not exist: refused on the
    names alone, before any value is converted."""
    import tracemalloc

    from edge.errors import TensorFormatError
    from edge.protocol import infer_request_from_pb
    from server.dataplane import DataPlane
    from server.repository import ModelRepository

    count = 2_000_000
    message = pb.ModelInferRequest(model_name=MODEL)
    tensor = message.inputs.add(name="nope", datatype="INT64", shape=[count])
    tensor.contents.int64_contents.extend(range(count))
    repository = ModelRepository.from_files([models.model_path(MODEL)])
    dataplane = DataPlane(repository)
    tracemalloc.start()
    try:
        request = infer_request_from_pb(message)
        with pytest.raises(TensorFormatError, match="unexpected input 'nope'"):
            dataplane.prepare(request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        repository.close()
    assert peak < 1_000_000, f"{peak:,} bytes allocated to refuse it"


def _tensor_parameters(message: pb.ModelInferRequest) -> None:
    tensor = message.inputs.add(name="x", datatype="INT8", shape=[1])
    for j in range(300_000):
        tensor.parameters[f"q{j}"].bool_param = True


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda m: [m.parameters[f"p{i}"].int64_param for i in range(300_000)], "request parameters"),
        (
            lambda m: [m.inputs.add(name=f"i{i}", datatype="INT8", shape=[1]) for i in range(200_000)],
            "inputs",
        ),
        (lambda m: [m.outputs.add(name=f"o{i}") for i in range(300_000)], "requested outputs"),
        (_tensor_parameters, "has 300,000 parameters"),
    ],
    ids=["request-parameters", "inputs", "outputs", "tensor-parameters"],
)
def test_huge_counts_are_refused_before_any_conversion(build, needle: str) -> None:  # type: ignore[no-untyped-def]
    """Counted on the message (a length is free): converting 2.5 M parameters first took the event loop
    7-13 s, and 2.5 M tensor parameters were even accepted. Refusing now allocates next to nothing."""
    import tracemalloc

    from edge.errors import TensorFormatError
    from edge.protocol import infer_request_from_pb

    message = pb.ModelInferRequest(model_name=MODEL)
    build(message)
    tracemalloc.start()
    try:
        with pytest.raises(TensorFormatError, match=needle):
            infer_request_from_pb(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000, f"{peak:,} bytes allocated to refuse it"
