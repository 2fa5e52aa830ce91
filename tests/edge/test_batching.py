"""Tails run as a batch give each request exactly what it gets alone.

Covered: every cut 0..N-1 of every shipped model (digits_resnet, digits_resnet_f32, digits_tiny,
mobilenetv2_035), batches of 2 and 3 requests with different seeded inputs; outputs compared
with ``np.array_equal`` (dtype, shape and every value). Every such tail batches but digits_tiny's at
cuts 0 and 1 (DOES_NOT_BATCH: a RESHAPE to a constant [1, 64]), whose requests run one by one with
the same outputs. Also the shape-tensor model's cut 2 (an int32 [4] cut tensor) does not batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge import models
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from helpers import SHIPPED, seeded_inputs


def _cases() -> list[tuple[str, int]]:
    cases = []
    for name in SHIPPED:
        n = ModelGraph.from_file(models.model_path(name)).num_operators
        cases += [(name, k) for k in range(n)]
    return cases


CASES = _cases()
# Tails whose graph fixes the batch at 1: a RESHAPE to the constant shape [1, 64] before the
# classifier. Their requests run one by one.
DOES_NOT_BATCH = {("digits_tiny", 0), ("digits_tiny", 1)}


@pytest.fixture(scope="module")
def runners(graphs: dict[str, ModelGraph]) -> dict[str, ModelRunner]:
    return {name: ModelRunner(graph, cache_size=8) for name, graph in graphs.items()}


@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-K{k}" for n, k in CASES])
def test_a_batched_tail_equals_each_request_alone(name: str, k: int, runners: dict[str, ModelRunner]) -> None:
    runner = runners[name]
    cuts = [runner.run_head(k, seeded_inputs(runner.graph, seed)).cut for seed in (11, 12, 13)]
    alone = [runner.run_tail(k, c) for c in cuts]
    for size in (2, 3):
        batched = runner.run_tail_batch(k, cuts[:size])
        assert len(batched) == size
        for got, want in zip(batched, alone, strict=False):
            assert set(got) == set(want)
            for tensor, array in want.items():
                assert got[tensor].dtype == array.dtype and np.array_equal(got[tensor], array), (
                    name,
                    k,
                    size,
                    tensor,
                )
    assert runner.batches(k, 3) == ((name, k) not in DOES_NOT_BATCH), (name, k)


def test_a_tail_that_does_not_batch_runs_one_by_one(tmp_path) -> None:
    """The shape-tensor model's cut 2 carries an int32 [4] tensor: no leading batch dimension."""
    from model_builder import shape_tensor_model

    path = tmp_path / "shape.tflite"
    path.write_bytes(shape_tensor_model())
    graph = ModelGraph.from_file(path)
    with ModelRunner(graph) as runner:
        cuts = [runner.run_head(2, seeded_inputs(graph, seed)).cut for seed in (1, 2)]
        batched = runner.run_tail_batch(2, cuts)
        assert not runner.batches(2, 2)
        for got, feeds in zip(batched, cuts, strict=True):
            want = runner.run_tail(2, feeds)
            assert all(np.array_equal(got[t], want[t]) for t in want)
