"""The runner's cache of halves and its build-time boundary check.

Covered: the cache keeps at most ``cache_size`` halves and evicts the least recently used one,
and an evicted half rebuilt later gives the same outputs; a built half whose boundary differs
from the cut (another cut's tensors, or a cut tensor whose quantization changed in surgery) is
refused when built, naming the tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from edge.backends import create_backend
from edge.errors import ModelMismatchError
from edge.graph import ModelGraph
from edge.partition import _pack, build_head
from edge.runner import ModelRunner, _check_boundary
from helpers import seeded_inputs


def test_the_cache_evicts_the_least_recently_used_half(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    x = seeded_inputs(graph, 0)
    with ModelRunner(graph, cache_size=2) as runner:
        first = runner.run_head(3, x).cut
        runner.run_head(5, x)
        runner.run_head(3, x)  # 3 is now the most recent
        runner.run_head(7, x)  # evicts 5
        assert list(runner._halves) == [("head", 3, 1), ("head", 7, 1)]
        again = runner.run_head(3, x).cut  # 3 is the most recent again, 7 the least
        assert all(np.array_equal(first[k], again[k]) for k in first)
        rebuilt = runner.run_head(5, x).cut  # rebuilt, evicting 7
        assert list(runner._halves) == [("head", 3, 1), ("head", 5, 1)]
        with ModelRunner(graph) as fresh:
            expected = fresh.run_head(5, x).cut
        assert all(np.array_equal(rebuilt[k], expected[k]) for k in expected)


def test_a_half_with_another_cuts_tensors_is_refused(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    other = create_backend("litert", build_head(graph, graph.cut(3)))
    with pytest.raises(ModelMismatchError, match=r"head of cut 5: tensor"):
        _check_boundary("head", graph.cut(5), other)


def test_a_half_whose_quantization_changed_is_refused(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_resnet"]
    cut = graph.cut(5)
    head = schema.ModelT.InitFromPackedBuf(build_head(graph, cut), 0)
    name = cut.tensors[0].name
    (tensor,) = [t for t in head.subgraphs[0].tensors if t.name.decode() == name]
    tensor.quantization.scale = np.asarray(tensor.quantization.scale, np.float32) * 2
    changed = create_backend("litert", _pack(head))
    assert changed.outputs[0].dtype == cut.tensors[0].dtype  # same names, dtypes and shapes
    with pytest.raises(ModelMismatchError, match=name.replace(";", ".").split("/")[0]):
        _check_boundary("head", cut, changed)
    _check_boundary("head", cut, create_backend("litert", build_head(graph, cut)))  # the real one passes


def test_replicas_let_threads_run_one_half_at_once_with_identical_outputs(
    graphs: dict[str, ModelGraph],
) -> None:
    import threading

    from edge.backends.pool import ReplicaPool

    graph = graphs["mobilenetv2_035"]
    x = seeded_inputs(graph, 3)
    with ModelRunner(graph) as single:
        expected = single.run_head(24, x).cut
    with ModelRunner(graph, replicas=2) as runner:
        runner.run_head(24, x)
        (pool,) = runner._halves.values()
        assert isinstance(pool, ReplicaPool)
        results: list[dict[str, np.ndarray]] = []
        start = threading.Barrier(4)

        def work() -> None:
            start.wait(timeout=10)
            for _ in range(20):
                results.append(runner.run_head(24, x).cut)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 80
        assert all(np.array_equal(r[k], v) for r in results for k, v in expected.items())
        assert pool._count == 2  # four threads, two interpreters: never more than the size
