"""Per-cut dynamic batching through a real server (``max_batch`` > 1).

Covered: mobilenetv2_035 at cut 7 (two cut tensors) and the whole model, digits_resnet at cut 8,
and digits_tiny at cut 0 (which does not batch, and runs one by one): 8 devices with different
seeded inputs send at once to a server with one compute thread and ``max_batch=4``; every answer
equals the whole model's outputs for that device's input (np.array_equal), and some answers say
they ran in a batch (``batch_size`` > 1, at most 4) where the tail batches.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge import models
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import seeded_inputs
from server.embedded import BackgroundServer

CASES = [("mobilenetv2_035", 7), ("mobilenetv2_035", None), ("digits_resnet", 8), ("digits_tiny", 0)]
DEVICES = 8


@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-K{k}" for n, k in CASES])
def test_batched_requests_get_their_own_outputs(name: str, k: int | None) -> None:
    graph = ModelGraph.from_file(models.model_path(name))
    inputs = [seeded_inputs(graph, 100 + i) for i in range(DEVICES)]
    with ModelRunner(graph) as runner:
        expected = [runner.run(x) for x in inputs]
        sent = [x if k is None else runner.run_head(k, x).cut for x in inputs]
    sizes: list[int] = []
    same: list[bool] = []
    lock = threading.Lock()
    with BackgroundServer.from_files(
        [models.model_path(name)], workers=1, max_batch=4, max_batch_delay_us=20_000
    ) as server:
        barrier = threading.Barrier(DEVICES)

        def device(i: int) -> None:
            with TailClient(server.address, timeout_s=30.0) as client:
                barrier.wait(timeout=30)
                for _ in range(3):
                    result = client.infer(
                        name, sent[i], parameters={"split_point": k} if k is not None else None
                    )
                    with lock:
                        sizes.append(int(result.parameters.get("batch_size", 1)))
                        same.append(
                            set(result.outputs) == set(expected[i])
                            and all(np.array_equal(result.outputs[t], v) for t, v in expected[i].items())
                        )

        threads = [threading.Thread(target=device, args=(i,)) for i in range(DEVICES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert len(same) == 3 * DEVICES and all(same)
    assert max(sizes) <= 4
    if name == "digits_tiny":
        assert set(sizes) == {1}, "its tail does not batch: the requests ran one by one"
    else:
        assert max(sizes) > 1, sizes
