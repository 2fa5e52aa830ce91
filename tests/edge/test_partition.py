"""Surgery: what head.tflite and tail.tflite contain, and edge split's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from edge.graph import ModelGraph
from edge.partition import read_manifest, split_model, write_split


def _model(data: bytes) -> schema.ModelT:
    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def _weight_bytes(model: schema.ModelT) -> int:
    return sum(len(b.data) for b in model.buffers if b.data is not None and len(b.data))


@pytest.mark.parametrize("name", ["digits_resnet", "mobilenetv2_035"])
def test_halves_carry_only_their_weights(graphs: dict[str, ModelGraph], name: str) -> None:
    graph = graphs[name]
    for k in (1, graph.num_operators // 2, graph.num_operators - 1):
        part = split_model(graph, k)
        head, tail = _model(part.head), _model(part.tail)
        for half in (head, tail):
            referenced = {t.buffer for t in half.subgraphs[0].tensors} | {
                m.buffer for m in half.metadata or []
            }
            unused = [i for i, b in enumerate(half.buffers) if i and i not in referenced]
            assert unused == [], f"cut {k}: unreferenced buffers {unused}"
            codes = {op.opcodeIndex for op in half.subgraphs[0].operators}
            assert codes == set(range(len(half.operatorCodes))), f"cut {k}: unused operator codes"
        for half, ops in ((head, graph.operators[:k]), (tail, graph.operators[k:])):
            # Exactly the distinct weights its own operators read (metadata is copied to both halves).
            used = {graph.model.subgraphs[0].tensors[t].buffer for op in ops for t in op.inputs}
            expected = sum(
                len(graph.model.buffers[b].data) for b in used if graph.model.buffers[b].data is not None
            )
            metadata = sum(len(half.buffers[m.buffer].data) for m in half.metadata or [])
            assert _weight_bytes(half) - metadata == expected
        assert len(head.subgraphs[0].operators) == k
        assert len(tail.subgraphs[0].operators) == graph.num_operators - k


def test_names_and_signatures_are_kept(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    k = next(c.index for c in graph.cuts() if len(c.tensors) >= 2)
    part = split_model(graph, k)
    head, tail = _model(part.head), _model(part.tail)

    def names(model: schema.ModelT, which: str) -> list[str]:
        sg = model.subgraphs[0]
        return [sg.tensors[i].name.decode() for i in getattr(sg, which)]

    assert names(head, "outputs") == list(part.cut.names)
    assert names(tail, "inputs") == list(part.cut.names)
    assert names(tail, "outputs") == [t.name for t in graph.outputs]
    assert names(head, "inputs") == [t.name for t in graph.inputs]
    assert [m.name.decode() for m in tail.signatureDefs[0].inputs] == list(part.cut.names)


def test_write_split_files(graphs: dict[str, ModelGraph], tmp_path: Path) -> None:
    graph = graphs["digits_resnet"]
    part = split_model(graph, 5)
    paths = write_split(part, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["head.tflite", "split.json", "tail.tflite"]
    manifest = read_manifest(tmp_path / "out" / "split.json")
    assert manifest["source_sha256"] == graph.sha256
    assert manifest["split_point"] == 5
    assert [t["name"] for t in manifest["tensors"]] == list(part.cut.names)
    for entry, tensor in zip(manifest["tensors"], part.cut.tensors, strict=True):
        assert entry["scale"] == tensor.scale[0] and entry["zero_point"] == tensor.zero_point[0]
        assert entry["dtype"] == "int8" and entry["shape"] == list(tensor.shape)
    assert (tmp_path / "out" / "head.tflite").read_bytes() == part.head
    assert json.loads((tmp_path / "out" / "split.json").read_text())["cut_bytes"] == part.cut.nbytes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "head.tflite",
        "split.json",
        "tail.tflite",
    ]


def test_halves_are_valid_models_on_their_own(graphs: dict[str, ModelGraph]) -> None:
    """A half parses with our own reader, so it can itself be inspected and split again."""
    graph = graphs["digits_resnet"]
    part = split_model(graph, 4)
    head = ModelGraph(part.head, source="head")
    tail = ModelGraph(part.tail, source="tail")
    assert head.num_operators == 4 and tail.num_operators == graph.num_operators - 4
    assert [t.name for t in tail.inputs] == list(part.cut.names)
    assert np.all([t.dtype == np.int8 for t in tail.inputs])
