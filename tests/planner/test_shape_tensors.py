"""Planning on a model whose cuts carry a shape tensor (SHAPE feeding RESHAPE, as in EfficientNet).

Covered: the server profiles every tail on what the head computes, so every cut of this model
gets a finite time (random values in the int32 shape tensor make RESHAPE fail); the planner
finds the server reachable and payload probes at those cuts succeed; every cut of the model is
bit-exact across the wire; a server that cannot profile at all is still used, with tails
estimated from the device's profile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from model_builder import shape_tensor_model

from edge.autosplit import AutoSplit
from edge.cooperative import CooperativeRunner
from edge.errors import BackendError, RemoteError
from edge.graph import ModelGraph
from edge.policy import make_policy
from edge.preprocess import random_inputs, random_tensors
from edge.runner import ModelRunner
from edge.transport import TailClient, tail_profile
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.grpc_service import EdgeServer
from server.repository import ModelRepository, ServedModel

NAME = "shapes"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / f"{NAME}.tflite"
    path.write_bytes(shape_tensor_model())
    return path


@pytest.fixture(scope="module")
def graph(model_file: Path) -> ModelGraph:
    return ModelGraph.from_file(model_file)


@pytest.fixture(scope="module")
def server(model_file: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer.from_files([model_file]) as srv:
        yield srv


def test_the_model_sends_a_shape_tensor_and_random_values_break_it(graph: ModelGraph) -> None:
    carrying = [
        k for k in range(graph.num_operators) if any(t.dtype == np.int32 for t in graph.cut(k).tensors)
    ]
    assert carrying == [2, 3]
    with ModelRunner(graph) as runner, pytest.raises(BackendError, match="RESHAPE"):
        runner.run_tail(2, random_tensors(graph.cut(2).tensors, seed=2))


def test_the_server_profiles_every_tail(server: BackgroundServer, graph: ModelGraph) -> None:
    with TailClient(server.address, timeout_s=60.0) as client:
        profile = tail_profile(client, NAME, model_sha256=graph.sha256)
    n = graph.num_operators
    assert profile.shape == (n + 1,)
    assert all(math.isfinite(ms) and ms > 0 for ms in profile[:n]), profile
    assert profile[n] == 0.0


def test_auto_split_finds_the_server_and_every_cut_is_exact(
    server: BackgroundServer, graph: ModelGraph
) -> None:
    x = random_inputs(graph, seed=3)
    with ModelRunner(graph) as reference:
        expected = reference.run(x)
    client = TailClient(server.address, timeout_s=60.0)
    runner = ModelRunner(graph)
    policy = make_policy(graph, "auto", runner=runner, client=client, model_name=NAME, progress=False)
    assert isinstance(policy, AutoSplit) and policy.reachable
    assert policy.estimator.estimate().samples > 0
    with CooperativeRunner(runner, client, model_name=NAME, policy=0) as device:
        for k in range(graph.num_operators + 1):
            device.policy = make_policy(graph, k)
            result = device.infer(x)
            assert not result.fallback, (k, result.fallback_reason)
            for name, array in expected.items():
                assert np.array_equal(result.outputs[name], array), (k, name)


class _CannotProfile(DataPlane):
    def tail_profile(self, model: ServedModel) -> np.ndarray:
        raise BackendError("this server cannot time its tails")


def test_a_server_that_cannot_profile_is_still_used(model_file: Path, graph: ModelGraph) -> None:
    dataplane = _CannotProfile(ModelRepository.from_files([model_file]))
    with BackgroundServer(EdgeServer(dataplane)) as srv:
        client = TailClient(srv.address, timeout_s=30.0)
        runner = ModelRunner(graph)
        policy = make_policy(graph, "auto", runner=runner, client=client, model_name=NAME, progress=False)
        try:
            assert isinstance(policy, AutoSplit) and policy.reachable
            costs = policy.costs()
            assert all(math.isfinite(c.tail_ms) for c in costs)
        finally:
            client.close()
            runner.close()


def test_values_a_kernel_refuses_are_the_callers_fault_and_the_tail_survives(
    server: BackgroundServer, graph: ModelGraph
) -> None:
    with TailClient(server.address, timeout_s=30.0) as client:
        params = {"split_point": 2, "model_sha256": graph.sha256}
        bad = random_tensors(graph.cut(2).tensors, seed=2)  # a random shape tensor: RESHAPE fails
        with pytest.raises(RemoteError) as err:
            client.infer(NAME, bad, parameters=params)
        assert err.value.status == "INVALID_ARGUMENT" and "RESHAPE" in str(err.value)
        x = random_inputs(graph, seed=4)
        with ModelRunner(graph) as runner:
            good = runner.run_head(2, x).cut
            expected = runner.run(x)
        result = client.infer(NAME, good, parameters=params)
        assert all(np.array_equal(result.outputs[k], v) for k, v in expected.items())
