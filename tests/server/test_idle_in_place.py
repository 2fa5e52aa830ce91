"""A server with compute threads answers a request that finds it idle, on a short route, in place.

With ``workers`` > 0 a request used to take its places, yield a turn of the loop, take a compute
turn and run in a task of its own, even alone on the server: three turns of the event loop that
a one-at-a-time device waits for on every request. Now a request that finds nothing else in flight,
on a route whose last compute fit the inline budget, computes where its stream read it.

Covered, through a real server with one compute thread (``workers=1``), as ``edge-server`` runs by
default on one core:
- every cut of digits_resnet, one request at a time, three times: no route is known short before
  its first compute (which also builds the tail); by the third pass each is, and the third pass
  (in place) gives exactly the tail's outputs, as the first two (on the thread) did;
- the prediction and the decision refuse while another request holds a place, for a stack, and
  with batching on;
- a long route (a ~30 ms tail) is never taken in place: it keeps computing on the thread.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from model_builder import slow_conv_model

from edge import models, wire
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from edge.wire import InferRequest, encode
from helpers import same_outputs, seeded_inputs
from server.dataplane import PreparedRequest
from server.embedded import BackgroundServer
from server.scheduler import Scheduler

MODEL = "digits_resnet"


def _prepared(
    server: BackgroundServer, graph: ModelGraph, name: str, k: int, cut: dict[str, np.ndarray]
) -> PreparedRequest:
    request = InferRequest(
        model_name=name,
        inputs=tuple(encode(n, a) for n, a in cut.items()),
        parameters={wire.MODEL_SHA256: graph.sha256, wire.SPLIT_POINT: k},
    )
    return server.server.dataplane.prepare(request)


def test_an_idle_server_answers_short_routes_in_place_with_the_tails_outputs(tmp_path: Path) -> None:
    slow = tmp_path / "slow.tflite"
    slow.write_bytes(slow_conv_model())
    graph, slow_graph = ModelGraph.from_file(models.model_path(MODEL)), ModelGraph.from_file(slow)
    cuts = range(1, graph.num_operators)
    with ModelRunner(graph) as runner:
        heads = {k: dict(runner.run_head(k, seeded_inputs(graph, k)).cut) for k in cuts}
        expected = {k: runner.run_tail(k, heads[k]) for k in cuts}
    with BackgroundServer.from_files([models.model_path(MODEL), slow], workers=1) as server:
        scheduler: Scheduler = server.server.servicer.scheduler
        assert not scheduler.serial
        with TailClient(server.address, timeout_s=30.0) as client:
            for attempt in ("first", "second", "in place"):
                for k in cuts:
                    params = {wire.MODEL_SHA256: graph.sha256, wire.SPLIT_POINT: k}
                    if attempt == "first":  # nothing known of the route yet
                        assert not scheduler.predicts_now(MODEL, k), k
                    if attempt == "in place":  # known short (the first compute also builds the tail)
                        assert scheduler.predicts_now(MODEL, k), k
                    result = client.infer(MODEL, heads[k], parameters=params)
                    assert same_outputs(result.outputs, expected[k]), (attempt, k)

            k = 8
            prepared = _prepared(server, graph, MODEL, k, heads[k])
            assert scheduler.computes_now(prepared)
            server.server.dataplane.admit()  # another request holds a place
            try:
                assert not scheduler.predicts_now(MODEL, k)
                assert not scheduler.computes_now(prepared)
            finally:
                server.server.dataplane.release()
            assert not scheduler.computes_now(replace(prepared, stack=2))
            batching = Scheduler(server.server.dataplane, workers=1, max_batch=2)
            batching._compute_us = dict(scheduler._compute_us)  # the same knowledge of routes
            assert not batching.computes_now(prepared) and not batching.predicts_now(MODEL, k)
            batching.shutdown()

            with ModelRunner(slow_graph) as slow_runner:
                x = seeded_inputs(slow_graph, 0)
                slow_cut = dict(slow_runner.run_head(1, x).cut)
                slow_expected = slow_runner.run_tail(1, slow_cut)
            slow_params = {wire.MODEL_SHA256: slow_graph.sha256, wire.SPLIT_POINT: 1}
            for _ in range(2):
                result = client.infer("slow", slow_cut, parameters=slow_params)
                assert same_outputs(result.outputs, slow_expected)
                assert not scheduler.predicts_now("slow", 1)  # ~30 ms: past the inline budget
                assert not scheduler.computes_now(_prepared(server, slow_graph, "slow", 1, slow_cut))
