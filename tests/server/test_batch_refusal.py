"""A batch with one request a kernel refuses: only that one fails; the others get their own outputs.

The tail of cut 3 of a model whose cut carries a shape tensor (tests/model_builder.py) reshapes
to the shape it is sent; a request with a wrong shape is refused by RESHAPE. Through the real data
plane and backend: a victim beside it failed with it (300 of 300 with --max-batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from model_builder import shape_tensor_model

from edge.errors import EdgeError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.wire import SPLIT_POINT, InferRequest, encode
from server.dataplane import DataPlane
from server.repository import ModelRepository


def test_only_the_refused_member_of_a_batch_fails(tmp_path: Path) -> None:
    path = tmp_path / "shapes.tflite"
    path.write_bytes(shape_tensor_model())
    graph = ModelGraph.from_file(path)
    good = {"b": np.full((1, 4, 4, 2), 0.5, np.float32), "s": np.array([1, 4, 4, 2], np.int32)}
    bad = {"b": good["b"], "s": np.array([1, 2, 3, 99], np.int32)}
    with ModelRunner(graph) as local:
        want = local.run_tail(3, good)
    repository = ModelRepository.from_files([path])
    dataplane = DataPlane(repository)
    try:
        batch = [
            dataplane.prepare(
                InferRequest(
                    model_name="shapes",
                    inputs=tuple(encode(k, v) for k, v in feeds.items()),
                    parameters={SPLIT_POINT: 3},
                )
            )
            for feeds in (good, bad, good)
        ]
        outcomes = dataplane.execute_batch(batch)
    finally:
        repository.close()
    assert isinstance(outcomes[1], EdgeError) and "RESHAPE" in str(outcomes[1])
    for outcome in (outcomes[0], outcomes[2]):
        assert not isinstance(outcome, EdgeError)
        (output,) = outcome.outputs
        assert np.array_equal(
            np.frombuffer(output.data, np.float32).reshape(output.shape), next(iter(want.values()))
        )
