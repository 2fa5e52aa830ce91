"""Graph analysis: operators, tensors, and which tensors cross each cut."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import CutError
from edge.graph import ModelGraph


def test_operators_and_io(graphs: dict[str, ModelGraph]) -> None:
    g = graphs["digits_resnet"]
    assert g.num_operators == len(g.operators) > 5
    assert [op.index for op in g.operators] == list(range(g.num_operators))
    assert [t.shape for t in g.inputs] == [(1, 32, 32, 1)]
    assert [t.dtype for t in g.inputs] == [np.dtype(np.int8)]
    assert g.outputs[0].dtype == np.int8 and g.outputs[0].quantization is not None
    assert len(g.sha256) == 64


@pytest.mark.parametrize("name", ["digits_resnet", "digits_tiny", "mobilenetv2_035", "digits_resnet_f32"])
def test_cut_tensors_follow_the_definition(graphs: dict[str, ModelGraph], name: str) -> None:
    """A tensor crosses cut K iff it is an activation produced before K (or an input) and used at or after K."""
    g = graphs[name]
    for k in range(g.num_operators + 1):
        expected = set()
        for t in g.tensors:
            if t.is_constant:
                continue
            used_after = any(t.index in op.inputs for op in g.operators[k:])
            made_before = g.producer(t.index) < k
            if used_after and made_before:
                expected.add(t.name)
        cut = g.cut(k)
        assert set(cut.names) == expected, f"cut {k}"
        assert cut.nbytes == sum(t.nbytes for t in cut.tensors)


def test_residual_cuts_carry_two_tensors(graphs: dict[str, ModelGraph]) -> None:
    g = graphs["digits_resnet"]
    multi = [c.index for c in g.cuts() if len(c.tensors) >= 2]
    assert multi, "the residual model should have cuts crossed by two tensors"


def test_degenerate_cuts(graphs: dict[str, ModelGraph]) -> None:
    g = graphs["digits_resnet"]
    assert g.cut(0).names == tuple(t.name for t in g.inputs)
    assert g.cut(0).tail_outputs == g.outputs
    last = g.cut(g.num_operators)
    assert last.tensors == () and last.head_outputs == g.outputs and last.tail_outputs == ()


def test_resolve_cut_by_tensor_name(graphs: dict[str, ModelGraph]) -> None:
    g = graphs["digits_resnet"]
    for op in g.operators:
        name = g.tensors[op.outputs[0]].name
        assert g.resolve_cut(name) == op.index + 1
    assert g.resolve_cut("3") == 3
    assert g.resolve_cut(g.inputs[0].name) == 0


@pytest.mark.parametrize("spec", [-1, 10_000, "10000", "no/such/tensor"])
def test_bad_cuts(graphs: dict[str, ModelGraph], spec: int | str) -> None:
    with pytest.raises(CutError):
        graphs["digits_resnet"].resolve_cut(spec)


def test_constant_tensor_is_not_a_cut(graphs: dict[str, ModelGraph]) -> None:
    g = graphs["digits_resnet"]
    weight = next(t for t in g.tensors if t.is_constant)
    with pytest.raises(CutError, match="constant"):
        g.resolve_cut(weight.name)
