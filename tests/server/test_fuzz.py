"""Fuzz a real server: thousands of mutated requests, unary and on one stream.

Covered: every mutated request gets one answer, a response or a status the caller is to blame for
(never UNKNOWN or INTERNAL); a stream answers every message and stays open; the server still
answers a health check and a good request promptly afterwards; its memory stays bounded.
Byte-level mutations (flips, inserts, cuts) test the parser, structural ones (shapes,
datatypes, names, parameters, typed contents) test validation.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from edge import models
from edge.graph import ModelGraph
from edge.protocol import SERVICE_NAME, pb, pb_grpc
from helpers import seeded_inputs
from server.embedded import BackgroundServer

MODEL = "digits_resnet"
CALLERS_FAULT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer.from_files([models.model_path(MODEL)]) as srv:
        yield srv


def _valid_requests(graph: ModelGraph) -> list[pb.ModelInferRequest]:
    from edge.runner import ModelRunner

    x = seeded_inputs(graph, 0)
    out = []
    whole = pb.ModelInferRequest(model_name=MODEL)
    ((name, array),) = x.items()
    whole.inputs.add(name=name, datatype="INT8", shape=list(array.shape))
    whole.raw_input_contents.append(array.tobytes())
    out.append(whole)
    with ModelRunner(graph) as runner:
        for k in (3, 8, 16):
            tail = pb.ModelInferRequest(model_name=MODEL)
            tail.parameters["split_point"].int64_param = k
            tail.parameters["model_sha256"].string_param = graph.sha256
            for t_name, t_array in runner.run_head(k, x).cut.items():
                tail.inputs.add(name=t_name, datatype="INT8", shape=list(t_array.shape))
                tail.raw_input_contents.append(t_array.tobytes())
            out.append(tail)
    typed = pb.ModelInferRequest(model_name=MODEL)
    tensor = typed.inputs.add(name=name, datatype="INT8", shape=list(array.shape))
    tensor.contents.int_contents.extend(int(v) for v in array.reshape(-1))
    out.append(typed)
    ping = pb.ModelInferRequest(model_name=MODEL)
    ping.parameters["ping"].bool_param = True
    out.append(ping)
    return out


def _byte_mutations(rng: np.random.Generator, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        at = int(rng.integers(0, len(buf))) if buf else 0
        kind = int(rng.integers(0, 3))
        if kind == 0 and buf:
            buf[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            buf[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 12)), dtype=np.uint8))
        else:
            del buf[at : at + int(rng.integers(1, 64))]
    return bytes(buf)


def _structural(rng: np.random.Generator, request: pb.ModelInferRequest) -> bytes:
    msg = pb.ModelInferRequest()
    msg.CopyFrom(request)
    choice = int(rng.integers(0, 9))
    if choice == 0 and msg.inputs:
        msg.inputs[0].shape[int(rng.integers(0, len(msg.inputs[0].shape)))] = int(rng.integers(-5, 10**12))
    elif choice == 1 and msg.inputs:
        msg.inputs[0].datatype = str(rng.choice(["FP32", "BYTES", "INT64", "BOOL", "", "int8", "FP16"]))
    elif choice == 2 and msg.inputs:
        msg.inputs[0].name = str(rng.choice(["", "x" * 300, "nope", "\x00"]))
    elif choice == 3:
        msg.parameters["split_point"].int64_param = int(rng.integers(-(2**40), 2**40))
    elif choice == 4:
        msg.parameters["split_point"].string_param = "eight"
    elif choice == 5:
        msg.model_version = str(rng.choice(["2", "x" * 1000, "-1"]))
    elif choice == 6 and msg.raw_input_contents:
        msg.raw_input_contents.append(b"\x00" * int(rng.integers(0, 4096)))
    elif choice == 7:
        msg.parameters["ping"].int64_param = 1
    else:
        del msg.inputs[:]
    return msg.SerializeToString()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_mutated_requests_get_one_answer_each_and_the_server_holds(
    server: BackgroundServer, graphs: dict
) -> None:
    graph = graphs[MODEL]
    valid = _valid_requests(graph)
    rng = np.random.default_rng(20261201)
    payloads = []
    for n in range(3000):
        base = valid[n % len(valid)]
        payloads.append(_byte_mutations(rng, base.SerializeToString()) if n % 2 else _structural(rng, base))
    with grpc.insecure_channel(server.address) as channel:
        unary = channel.unary_unary(
            f"/{SERVICE_NAME}/ModelInfer", request_serializer=None, response_deserializer=None
        )
        before = _rss_mib()
        outcomes: dict[str, int] = {}
        for payload in payloads[:2000]:
            try:
                unary(payload, timeout=10)
                code = "OK"
            except grpc.RpcError as err:
                assert err.code() in CALLERS_FAULT, (err.code(), err.details())
                code = err.code().name
            outcomes[code] = outcomes.get(code, 0) + 1
        assert sum(outcomes.values()) == 2000 and outcomes.get("INVALID_ARGUMENT", 0) > 0

        stream = channel.stream_stream(
            f"/{SERVICE_NAME}/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = list(stream(iter(payloads[2000:]), timeout=120))
        assert len(answers) == 1000
        for answer in answers:
            if answer.error_message:
                assert answer.error_message.split(":")[0] in {c.name for c in CALLERS_FAULT}, (
                    answer.error_message
                )

        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready
        reply = stub.ModelInfer(valid[0], timeout=5)
        assert reply.outputs and reply.raw_output_contents
        assert _rss_mib() - before < 200, "memory grew by more than 200 MiB"
