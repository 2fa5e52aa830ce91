"""A hung server costs one deadline, not one per request: the circuit, against a real gRPC peer.

Covered: after a missed deadline the next requests run on the device at once (no call reaches
the peer, the outputs are the whole model's, the result says why); a background probe finds the
peer back and requests offload again; a refusal (a non-retryable status) does not trip it; the
``auto`` policy follows the same circuit instead of probing inside requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from edge import models
from edge.autosplit import AutoSplit
from edge.cooperative import CooperativeRunner
from edge.graph import ModelGraph
from edge.link import LinkEstimator, LinkProber
from edge.protocol import converters, pb, pb_grpc
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import grpc_peer, seeded_inputs
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.repository import ModelRepository

MODEL = "digits_resnet"
CUT = 8


class _Hangable(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the real data plane, or, while ``hung`` is set, holds every call without answering."""

    def __init__(self) -> None:
        self.repository = ModelRepository.from_files([models.model_path(MODEL)])
        self.dataplane = DataPlane(self.repository)
        self.hung = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def _answer(self, request: Any) -> Any:
        with self._lock:
            self.calls += 1
        if self.hung.is_set():
            time.sleep(2.0)  # longer than any deadline below; the caller has given up by then
        return converters.infer_response_to_pb(
            self.dataplane.infer(converters.infer_request_from_pb(request))
        )

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer(request)

    def ModelStreamInfer(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        for request in requests:
            yield pb.ModelStreamInferResponse(infer_response=self._answer(request))


@pytest.fixture
def peer() -> Iterator[tuple[_Hangable, str]]:
    servicer = _Hangable()
    with grpc_peer(servicer) as address:
        yield servicer, address
    servicer.repository.close()


def test_a_hung_server_costs_one_deadline_then_requests_run_here_until_it_is_back(
    peer: tuple[_Hangable, str], graphs: dict[str, ModelGraph]
) -> None:
    servicer, address = peer
    graph = graphs[MODEL]
    client = TailClient(address, timeout_s=0.3)
    with (
        CooperativeRunner(
            ModelRunner(graph), client, model_name=MODEL, policy=CUT, timeout_s=0.3, retry_after_s=0.2
        ) as device,
        ModelRunner(graph) as reference,
    ):
        x = seeded_inputs(graph, 0)
        assert not device.infer(x).fallback
        servicer.hung.set()
        first = device.infer(x)
        assert first.fallback and "DEADLINE_EXCEEDED" in (first.fallback_reason or "")
        calls = servicer.calls
        for seed in range(20):
            x = seeded_inputs(graph, seed)
            result = device.infer(x)
            assert result.fallback and "down for" in (result.fallback_reason or "")
            assert result.split_point == graph.num_operators and result.remote is None
            expected = reference.run(x)
            assert all(np.array_equal(result.outputs[k], v) for k, v in expected.items())
        # No request reached the peer; only the background probes did, at most one per 0.2 s.
        assert servicer.calls - calls <= 3
        servicer.hung.clear()
        deadline = time.monotonic() + 10
        while not device.circuit.available() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert device.circuit.available()
        back = device.infer(x)
        assert not back.fallback and back.offloaded


def test_a_refusal_does_not_trip_the_circuit(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs[MODEL]
    with BackgroundServer.from_files([models.model_path(MODEL)]) as server:
        client = TailClient(server.address, timeout_s=2.0)
        with CooperativeRunner(ModelRunner(graph), client, model_name="not_served", policy=CUT) as device:
            for seed in range(2):
                result = device.infer(seeded_inputs(graph, seed))
                assert result.fallback and "NOT_FOUND" in (result.fallback_reason or "")
                assert device.circuit is not None and device.circuit.available()


def test_the_auto_policy_follows_the_same_circuit(
    peer: tuple[_Hangable, str], graphs: dict[str, ModelGraph]
) -> None:
    """A slow device (by its profile) offloads; when the server hangs the policy goes local, sends
    nothing while the circuit is open, and offloads again once a background probe finds it back."""
    servicer, address = peer
    graph = graphs[MODEL]
    n = graph.num_operators
    client = TailClient(address, timeout_s=0.3)
    head = [0.0] + [50.0 * k for k in range(1, n + 1)]  # far slower than any round trip here
    tail = [1.0] * n + [0.0]
    prober = LinkProber(client, MODEL, graph)
    estimator = LinkEstimator()
    prober.probe(estimator)
    # min_live: plan from the profile only, or the device's real (fast) runs would keep it local.
    policy = AutoSplit(graph, head, tail, estimator=estimator, prober=prober, min_live=10**6)
    with CooperativeRunner(
        ModelRunner(graph), client, model_name=MODEL, policy=policy, timeout_s=0.3, retry_after_s=0.2
    ) as device:
        x = seeded_inputs(graph, 0)
        assert device.infer(x).offloaded
        servicer.hung.set()
        assert device.infer(x).fallback
        calls = servicer.calls
        for _ in range(10):
            result = device.infer(x)
            assert result.split_point == n and not result.offloaded
        assert servicer.calls - calls <= 3  # background probes only
        servicer.hung.clear()
        deadline = time.monotonic() + 10
        while not device.circuit.available() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert policy.choose() is not None and policy.reachable  # back without a probe in a request
        # Hysteresis moves off the device after 3 plans in a row that favour the server.
        assert any(device.infer(x).offloaded for _ in range(5))
