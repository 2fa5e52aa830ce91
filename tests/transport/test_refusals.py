"""A refusal is not an outage: a server that answers RESOURCE_EXHAUSTED (its per-device or admission
limit) is up. The refused request finishes on the device, and the next one is offloaded as usual,
for a fixed cut, for `auto`, and in a pool. (One refusal used to stop all offloading for 5 s:
200 of 200 requests fell back.)"""

from __future__ import annotations

import numpy as np
from peers import UNARY_MODEL, busy_server  # noqa: F401 (a fixture)

from edge import models
from edge.cooperative import CooperativeRunner
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import FailoverClient, TailClient
from helpers import seeded_inputs


def test_a_busy_refusal_falls_back_once_and_offloading_goes_on(busy_server: str) -> None:  # noqa: F811
    graph = ModelGraph.from_file(models.model_path(UNARY_MODEL))
    feeds = seeded_inputs(graph, 1)
    with ModelRunner(graph) as local:
        want = local.run(feeds)
    client = TailClient(busy_server, timeout_s=5, streaming=False)
    with CooperativeRunner(ModelRunner(graph), client, model_name=UNARY_MODEL, policy=8) as device:
        results = [device.infer(feeds) for _ in range(30)]
    refused = [r for r in results if r.fallback]
    assert len(refused) == 10 and all(r.fallback_status == "RESOURCE_EXHAUSTED" for r in refused)
    assert sum(r.offloaded for r in results) == 20
    assert device.circuit is not None and device.circuit.available()
    for r in results:
        assert all(np.array_equal(r.outputs[k], v) for k, v in want.items())


def test_a_pool_keeps_a_busy_server_in_turn(busy_server: str) -> None:  # noqa: F811
    graph = ModelGraph.from_file(models.model_path(UNARY_MODEL))
    feeds = seeded_inputs(graph, 2)
    pool = FailoverClient([TailClient(busy_server, timeout_s=5, streaming=False)], retry_after_s=60)
    with CooperativeRunner(ModelRunner(graph), pool, model_name=UNARY_MODEL, policy=8) as device:
        results = [device.infer(feeds) for _ in range(12)]
    assert sum(r.offloaded for r in results) == 8, [r.fallback_reason for r in results]
