"""The zoo (tests/zoo, built by tools/build_zoo.py --zoo): the shapes pretrained models arrive in.

Covered, each checked below to be what it says:
- fp16_weights: float16 weights behind DEQUANTIZE (the converter's float16 quantization);
- dynamic_range: int8 weights, float activations, hybrid kernels (dynamic-range quantization);
- sparse_weights: sparse weights behind DENSIFY (the converter's sparsity);
- int8_uint8_io: full-integer int8 with uint8 input and output;
- float_classifier: plain float32;
- ssd_detector: an SSD-style detector ending in TFLite_Detection_PostProcess (four outputs);
- control_flow: three subgraphs, a WHILE in the main one;
- unknown_custom_op: a custom op no runtime has: refused, with its name, on every backend.

Every cut 1 <= K < N of every model that runs is compared with np.array_equal against the whole
model on two seeded inputs, on each backend given by --backends.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge.backends import create_backend
from edge.backends.support import check_support, model_operators
from edge.errors import BackendError
from edge.graph import ModelGraph
from edge.partition import split_model
from helpers import ZOO_DIR, ZOO_RUNNABLE, seeded_inputs

ZOO = sorted(json.loads((ZOO_DIR / "zoo.json").read_text())["models"])
RUNS = [name for name in ZOO if name != "unknown_custom_op"]


def _graph(name: str) -> ModelGraph:
    return ModelGraph.from_file(ZOO_DIR / f"{name}.tflite")


GRAPHS = {name: _graph(name) for name in ZOO}
CASES = [(name, k) for name in RUNS for k in range(1, GRAPHS[name].num_operators)]


def test_the_zoo_is_what_it_says() -> None:
    ops = {name: set(model_operators(g)) for name, g in GRAPHS.items()}
    assert ZOO == sorted([*ZOO_RUNNABLE, "unknown_custom_op"]) and RUNS == ZOO_RUNNABLE
    fp16 = GRAPHS["fp16_weights"]
    assert "DEQUANTIZE" in ops["fp16_weights"]
    assert any(t.is_constant and t.dtype == np.float16 for t in fp16.tensors)
    assert "DENSIFY" in ops["sparse_weights"]
    hybrid = GRAPHS["dynamic_range"]
    assert hybrid.inputs[0].dtype == np.float32 and hybrid.outputs[0].dtype == np.float32
    assert any(t.is_constant and t.dtype == np.int8 for t in hybrid.tensors)
    assert "DEQUANTIZE" not in ops["dynamic_range"]  # hybrid kernels take the int8 weights directly
    io = GRAPHS["int8_uint8_io"]
    assert io.inputs[0].dtype == np.uint8 and io.outputs[0].dtype == np.uint8
    assert "QUANTIZE" in ops["int8_uint8_io"]
    assert "CUSTOM:TFLite_Detection_PostProcess" in ops["ssd_detector"]
    assert len(GRAPHS["ssd_detector"].outputs) == 4
    assert len(GRAPHS["control_flow"].model.subgraphs) == 3 and "WHILE" in ops["control_flow"]
    assert "CUSTOM:EdgeZooSoftArgmax" in ops["unknown_custom_op"]


@pytest.mark.parametrize("name", ["fp16_weights", "sparse_weights"])
def test_computed_weights_never_cross_a_cut(name: str) -> None:
    """Many inner cuts of these models would carry a DEQUANTIZE or DENSIFY of a weight; none does."""
    graph = GRAPHS[name]
    weights = graph.computed_weights
    producers = {graph.producer(t) for t in weights}
    assert weights and {graph.operators[p].opcode for p in producers} <= {"DEQUANTIZE", "DENSIFY"}
    spanned = [
        k
        for k in range(1, graph.num_operators)
        if any(
            graph.producer(t) < k <= max(op.index for op in graph.operators if t in op.inputs)
            for t in weights
        )
    ]
    assert len(spanned) >= graph.num_operators // 3, "the model has few cuts that a weight spans"
    for k in range(graph.num_operators + 1):
        assert not {t.index for t in graph.cut(k).tensors} & weights, f"cut {k} sends a weight"


@pytest.fixture(scope="module")
def references(backend: str) -> dict[str, list[dict[str, np.ndarray]]]:
    out = {}
    for name in RUNS:
        with create_backend(backend, GRAPHS[name].data) as whole:
            out[name] = [whole.run(seeded_inputs(GRAPHS[name], seed)) for seed in (1, 2)]
    return out


def test_references_are_not_degenerate(references: dict[str, list[dict[str, np.ndarray]]]) -> None:
    for name, (first, second) in references.items():
        assert any(not np.array_equal(first[k], second[k]) for k in first), f"{name} gives one output for all"


@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-K{k}" for n, k in CASES])
def test_every_cut_is_bit_exact(name: str, k: int, backend: str, references: dict[str, list]) -> None:
    graph = GRAPHS[name]
    part = split_model(graph, k)
    with create_backend(backend, part.head) as head, create_backend(backend, part.tail) as tail:
        for seed, expected in zip((1, 2), references[name], strict=True):
            produced = head.run(seeded_inputs(graph, seed))
            finished = tail.run({t.name: produced[t.name] for t in part.cut.tensors})
            outputs = {**{t.name: produced[t.name] for t in part.cut.head_outputs}, **finished}
            assert outputs.keys() == expected.keys()
            for out_name, want in expected.items():
                assert outputs[out_name].dtype == want.dtype and outputs[out_name].shape == want.shape
                assert np.array_equal(outputs[out_name], want), f"{name} cut {k}: {out_name} differs"


def test_every_cut_is_enumerated() -> None:
    for name in RUNS:
        assert [k for n, k in CASES if n == name] == list(range(1, GRAPHS[name].num_operators))


def test_an_unknown_custom_op_is_named_on_every_backend(backend: str) -> None:
    graph = GRAPHS["unknown_custom_op"]
    for key in ("litert", "tflite-runtime"):
        support = check_support(graph, key)
        assert support.runs is False and support.unsupported == ("CUSTOM:EdgeZooSoftArgmax",), key
        assert "EdgeZooSoftArgmax" in support.reason and "\n" not in support.reason
    assert check_support(graph, backend).loaded is False  # the installed backend was asked, and refused
    with pytest.raises(BackendError, match="EdgeZooSoftArgmax"):
        create_backend(backend, graph.data)


@pytest.mark.parametrize("name", RUNS)
def test_the_runnable_zoo_is_supported(name: str, backend: str) -> None:
    support = check_support(GRAPHS[name], backend)
    assert support.runs is True and support.unsupported == ()
