"""Head then tail computes exactly what the whole model computes: every cut of every shipped model.

Covered: each shipped model (int8 residual CNN, int8 tiny model, int8 MobileNetV2-0.35, float32
residual CNN), each cut 1 <= K < N, on each backend given by --backends. Inputs: two seeded
random tensors spanning the input's full range, and two real held-out digits for the digit models.
The comparison is np.array_equal on every output, int8 and float alike: the float model is held
to exact equality too, because head and tail run the same kernels on the same values.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge import models
from edge.backends import create_backend
from edge.graph import ModelGraph
from edge.partition import split_model
from helpers import SHIPPED, digit_inputs, seeded_inputs

CASES = [
    (name, k)
    for name in SHIPPED
    for k in range(1, ModelGraph.from_file(models.model_path(name)).num_operators)
]


def _inputs(graph: ModelGraph) -> list[dict[str, np.ndarray]]:
    feeds = [seeded_inputs(graph, seed) for seed in (1, 2)]
    if graph.inputs[0].shape == (1, 32, 32, 1):
        feeds += digit_inputs(graph, 2)
    return feeds


@pytest.fixture(scope="module")
def references(graphs: dict[str, ModelGraph], backend: str) -> dict[str, list[dict[str, np.ndarray]]]:
    """Whole-model outputs per model and input, computed once per backend."""
    out = {}
    for name, graph in graphs.items():
        with create_backend(backend, graph.data) as whole:
            out[name] = [whole.run(feeds) for feeds in _inputs(graph)]
    return out


def test_references_are_not_degenerate(references: dict[str, list[dict[str, np.ndarray]]]) -> None:
    """Each model's output differs between inputs, so equal outputs below mean equal computations."""
    for name, outputs in references.items():
        first, second = outputs[0], outputs[1]
        assert any(not np.array_equal(first[k], second[k]) for k in first), f"{name} gives one output for all"


def test_every_cut_is_enumerated(graphs: dict[str, ModelGraph]) -> None:
    for name, graph in graphs.items():
        assert [k for n, k in CASES if n == name] == list(range(1, graph.num_operators))


@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-K{k}" for n, k in CASES])
def test_head_then_tail_equals_whole(
    name: str, k: int, backend: str, graphs: dict[str, ModelGraph], references: dict[str, list]
) -> None:
    graph = graphs[name]
    part = split_model(graph, k)
    with create_backend(backend, part.head) as head, create_backend(backend, part.tail) as tail:
        for feeds, expected in zip(_inputs(graph), references[name], strict=True):
            produced = head.run(feeds)
            assert set(produced) == {t.name for t in part.cut.tensors} | {
                t.name for t in part.cut.head_outputs
            }
            finished = tail.run({t.name: produced[t.name] for t in part.cut.tensors})
            outputs = {**{t.name: produced[t.name] for t in part.cut.head_outputs}, **finished}
            assert outputs.keys() == expected.keys()
            for out_name, want in expected.items():
                got = outputs[out_name]
                assert got.dtype == want.dtype and got.shape == want.shape
                assert np.array_equal(got, want), f"{name} cut {k}: output {out_name} differs"
