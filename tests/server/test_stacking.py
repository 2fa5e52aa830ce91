"""Stacked requests: W samples of one cut in one message (``edge_stack``), answered per sample.

Covered, through real in-process servers and real clients:

- every cut 0..N-1 of every shipped model (digits_resnet, digits_resnet_exit, digits_resnet_f32,
  digits_tiny, mobilenetv2_035, shapes_cnn): one request of 3 seeded samples stacked; each sample's
  slice of every output equals what its tail alone gives (np.array_equal: dtype, shape, values).
  digits_tiny's cuts 0 and 1 do not batch, so their samples run one by one, with the same outputs.
  Twice: on a server computing on its loop (each stack at once), and on one with a compute thread
  whose stacks compute in parts of one sample each, joined again;
- a cut whose tensor has no first axis of 1 (the shape-tensor model's cut 2) is refused in one line;
- refusals, each one INVALID_ARGUMENT naming the problem: 1 sample, more than the server's limit, a
  bool or string count, the whole model, samples short of the count, and any stack to a server
  started with ``max_stack=1`` (whose metadata then names no limit);
- a pipelined device's burst of 48 requests for two cuts of digits_resnet (8 and 12, interleaved in
  runs of 4) goes out stacked (answers say ``batch_size`` > 1, never more than the server's 8),
  and each request gets exactly the whole model's outputs for its input;
- the same burst to a server that takes no stacks goes one message each, with the same outputs;
- five requests sent 1 ms apart while a 20 ms tail computes go in at most three messages (the hold:
  a request waits while two messages of its stream await answers), each with its own outputs;
- a device pipelining 8 requests to mobilenetv2_035 at cut 32 goes stacked, and the server stops
  mid-burst: all 24 requests get exactly the whole model's outputs, some finished on the device;
- an answer that does not split into the stack's samples fails each of them (INTERNAL), never
  hands one sample another's slice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from edge import models, wire
from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.protocol import pb
from edge.runner import ModelRunner
from edge.transport import TailClient
from edge.transport.session import _unstack
from helpers import SHIPPED, seeded_inputs
from server.embedded import BackgroundServer

SAMPLES = 3
# The tails whose graph fixes the batch at 1 (tests/edge/test_batching.py): run one by one.
ONE_BY_ONE = {("digits_tiny", 0), ("digits_tiny", 1)}


def _stacked(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}


@pytest.fixture(scope="module")
def parted() -> Iterator[BackgroundServer]:
    """A server of every shipped model with a compute thread, computing stacks one sample per part."""
    with BackgroundServer.from_files([models.model_path(name) for name in SHIPPED], workers=1) as srv:
        srv.server.servicer.scheduler.stack_part_us = 1
        dataplane = srv.server.dataplane
        compute = dataplane.execute_part
        srv.parts = []  # type: ignore[attr-defined]  # the samples of each part computed, in order

        def counted(prepared, start, count):  # type: ignore[no-untyped-def]
            srv.parts.append(count)  # type: ignore[attr-defined]
            return compute(prepared, start, count)

        dataplane.execute_part = counted  # type: ignore[method-assign]
        yield srv


@pytest.mark.parametrize("where", ["server", "parted"])
@pytest.mark.parametrize("name", SHIPPED)
def test_a_stacked_request_answers_each_sample_as_it_alone(
    name: str, where: str, request: pytest.FixtureRequest
) -> None:
    server: BackgroundServer = request.getfixturevalue(where)
    graph = ModelGraph.from_file(models.model_path(name))
    checked = []
    with ModelRunner(graph) as runner, TailClient(server.address, timeout_s=60.0) as client:
        inputs = [seeded_inputs(graph, 40 + i) for i in range(SAMPLES)]
        for k in range(graph.num_operators):
            cuts = [dict(runner.run_head(k, x).cut) for x in inputs]
            alone = [runner.run_tail(k, c) for c in cuts]
            parts = getattr(server, "parts", [])
            parts.clear()
            result = client.infer(name, _stacked(cuts), parameters={wire.SPLIT_POINT: k, wire.STACK: SAMPLES})
            assert result.parameters[wire.STACK] == SAMPLES
            assert parts == ([1] * SAMPLES if where == "parted" else []), (name, k, parts)
            assert set(result.outputs) == set(alone[0]), (name, k)
            for i, want in enumerate(alone):
                for tensor, array in want.items():
                    got = result.outputs[tensor][i : i + 1]
                    assert got.dtype == array.dtype and np.array_equal(got, array), (name, k, i, tensor)
            checked.append(k)
            if (name, k) in ONE_BY_ONE:
                assert not runner.batches(k, 2)
    assert checked == list(range(graph.num_operators))


def test_a_cut_without_a_sample_axis_is_refused(tmp_path) -> None:
    from model_builder import shape_tensor_model

    path = tmp_path / "shapes.tflite"
    path.write_bytes(shape_tensor_model())
    graph = ModelGraph.from_file(path)
    with ModelRunner(graph) as runner:
        cut = dict(runner.run_head(2, seeded_inputs(graph, 1)).cut)
    with BackgroundServer.from_files([path]) as srv, TailClient(srv.address) as client:
        with pytest.raises(RemoteError) as err:
            client.infer("shapes", _stacked([cut, cut]), parameters={wire.SPLIT_POINT: 2, wire.STACK: 2})
    assert err.value.status == "INVALID_ARGUMENT"
    assert "cannot take stacked requests" in str(err.value) and "not a first axis of 1" in str(err.value)


@pytest.mark.parametrize(
    ("count", "samples", "split", "words"),
    [
        (1, 1, 8, "out of range: this server takes 2 to 8"),
        (9, 9, 8, "out of range: this server takes 2 to 8"),
        (True, 2, 8, "must be an int64, got bool"),
        ("2", 2, 8, "must be an int64, got str"),
        (2, 2, None, "a stacked request names its cut"),
        (3, 2, 8, "must have shape [3,"),
    ],
    ids=["one", "past-limit", "bool", "string", "whole-model", "short"],
)
def test_a_bad_stack_is_one_clear_refusal(
    count: object, samples: int, split: int | None, words: str, server: BackgroundServer
) -> None:
    graph = ModelGraph.from_file(models.model_path("digits_resnet"))
    with ModelRunner(graph) as runner:
        x = seeded_inputs(graph, 3)
        feeds = x if split is None else dict(runner.run_head(split, x).cut)
    params: dict[str, object] = {wire.STACK: count}
    if split is not None:
        params[wire.SPLIT_POINT] = split
    with TailClient(server.address) as client, pytest.raises(RemoteError) as err:
        client.infer("digits_resnet", _stacked([feeds] * samples), parameters=params)  # type: ignore[arg-type]
    assert err.value.status == "INVALID_ARGUMENT", err.value
    assert words in str(err.value), err.value


def test_a_server_started_without_stacks_names_none_and_refuses_them() -> None:
    path = models.model_path("digits_resnet")
    graph = ModelGraph.from_file(path)
    with ModelRunner(graph) as runner:
        cut = dict(runner.run_head(8, seeded_inputs(graph, 3)).cut)
    with BackgroundServer.from_files([path], max_stack=1) as srv, TailClient(srv.address) as client:
        _, _, extensions = client.server_metadata()
        assert not any(e.startswith(wire.STACK_PREFIX) for e in extensions), extensions
        with pytest.raises(RemoteError) as err:
            client.infer(
                "digits_resnet", _stacked([cut, cut]), parameters={wire.SPLIT_POINT: 8, wire.STACK: 2}
            )
    assert err.value.status == "INVALID_ARGUMENT" and "takes no stacked requests" in str(err.value)


def _burst(max_stack: int) -> list[int]:
    """48 requests submitted at once for cuts 8 and 12 of digits_resnet; the batch size each answer
    names. Each answer must equal the whole model's outputs for its input."""
    path = models.model_path("digits_resnet")
    graph = ModelGraph.from_file(path)
    inputs = [seeded_inputs(graph, 500 + i) for i in range(48)]
    cuts = [8 if (i // 4) % 2 == 0 else 12 for i in range(48)]
    with ModelRunner(graph) as runner:
        expected = [runner.run(x) for x in inputs]
        sent = [dict(runner.run_head(k, x).cut) for k, x in zip(cuts, inputs, strict=True)]
    with (
        BackgroundServer.from_files([path], max_stack=max_stack) as srv,
        TailClient(srv.address, timeout_s=30.0) as client,
    ):
        client.infer("digits_resnet", sent[0], parameters={wire.SPLIT_POINT: 8})  # connected, traits read
        futures = [
            client.submit("digits_resnet", s, parameters={wire.SPLIT_POINT: k})
            for s, k in zip(sent, cuts, strict=True)
        ]
        results = [f.result(timeout=60) for f in futures]
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        assert set(result.outputs) == set(want), i
        for tensor, array in want.items():
            got = result.outputs[tensor]
            assert got.dtype == array.dtype and np.array_equal(got, array), (i, cuts[i], tensor)
    return [int(r.parameters.get(wire.BATCH_SIZE, 1)) for r in results]


def test_a_burst_goes_stacked_and_each_request_gets_its_own_outputs() -> None:
    sizes = _burst(max_stack=8)
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8, sizes


def test_a_burst_to_a_server_without_stacks_goes_one_message_each() -> None:
    assert set(_burst(max_stack=1)) == {1}


def _answer(count: int, *, said: int | None, rows: int, extra_bytes: int = 0) -> object:
    reply = pb.ModelInferResponse(model_name="m", id="stack#1")
    if said is not None:
        reply.parameters[wire.STACK].int64_param = said
    reply.outputs.add(name="out", datatype="INT8", shape=[rows, 10])
    reply.raw_output_contents.append(bytes(range(rows * 10 + extra_bytes)))
    return reply


@pytest.mark.parametrize(
    ("said", "rows", "extra"),
    [(None, 3, 0), (2, 3, 0), (3, 2, 0), (3, 3, 1)],
    ids=["unnamed", "other-count", "short-output", "ragged-bytes"],
)
def test_an_answer_that_does_not_split_is_refused(said: int | None, rows: int, extra: int) -> None:
    with pytest.raises(ValueError):
        _unstack(_answer(3, said=said, rows=rows, extra_bytes=extra), ["a", "b", "c"])


def test_an_answer_splits_into_each_samples_own_slice() -> None:
    replies = _unstack(_answer(3, said=3, rows=3), ["a", "b", "c"])
    assert [r.id for r in replies] == ["a", "b", "c"]
    for i, reply in enumerate(replies):
        assert list(reply.outputs[0].shape) == [1, 10]
        assert reply.raw_output_contents[0] == bytes(range(i * 10, i * 10 + 10))
        assert reply.parameters[wire.BATCH_SIZE].int64_param == 3
        assert reply.parameters[wire.STACK].int64_param == 3


def test_requests_that_come_while_two_messages_compute_wait_and_go_stacked(tmp_path) -> None:
    """To a server that takes stacks, a request waits while two messages of its stream await answers.

    Five requests are sent 1 ms apart while the first computes (about 20 ms): without the hold each
    would go alone as it came, the writer being idle; with it, at most two go before the first answer
    and the rest wait for it, then go as one message: three messages at most."""
    from model_builder import slow_conv_model

    path = tmp_path / "slow.tflite"
    path.write_bytes(slow_conv_model(size=4, channels=1300))  # 83 kB a sample: three fit one stack
    graph = ModelGraph.from_file(path)
    inputs = [seeded_inputs(graph, 900 + i) for i in range(5)]
    with ModelRunner(graph) as runner:
        expected = [runner.run(x) for x in inputs]
    with BackgroundServer.from_files([path]) as srv, TailClient(srv.address, timeout_s=60.0) as client:
        # The pipe's stream open, the traits read, the tail built:
        client.submit("slow", inputs[0], parameters={wire.SPLIT_POINT: 0}).result(timeout=60)
        futures = []
        for x in inputs:
            futures.append(client.submit("slow", x, parameters={wire.SPLIT_POINT: 0}))
            time.sleep(0.001)
        results = [f.result(timeout=60) for f in futures]
    for result, want in zip(results, expected, strict=True):
        assert all(np.array_equal(result.outputs[t], a) for t, a in want.items())
    sizes = [int(r.parameters.get(wire.BATCH_SIZE, 1)) for r in results]
    messages = sum(1 / size for size in sizes)
    assert round(messages) <= 3 and max(sizes) >= 2, sizes  # two alone at most, then the rest as one


def test_stacked_requests_when_the_server_stops_finish_on_the_device(graphs: dict[str, ModelGraph]) -> None:
    """A device pipelining 8 requests goes stacked; the server stops mid-burst: every request still
    gets exactly the whole model's outputs, the ones it held finished on the device."""
    from edge.cooperative import CooperativeRunner
    from helpers import pipelined_with_a_stop, same_outputs, whole_model_outputs

    graph = graphs["mobilenetv2_035"]
    feeds = [seeded_inputs(graph, 700 + i) for i in range(24)]
    expected = whole_model_outputs(graph, feeds)
    srv = BackgroundServer.from_files([models.model_path("mobilenetv2_035")], workers=1)
    srv.start()
    client = TailClient(srv.address, timeout_s=10.0)
    with CooperativeRunner(ModelRunner(graph), client, model_name="mobilenetv2_035", policy=32) as device:
        results = pipelined_with_a_stop(device, feeds, 8, 16, srv.stop)
    assert sorted(results) == list(range(len(feeds)))
    for i, result in results.items():
        assert same_outputs(result.outputs, expected[i]), i
    assert any(r.fallback for r in results.values())
    stacked = [r.remote.stacked for r in results.values() if r.remote is not None]
    assert max(stacked) > 1, stacked
