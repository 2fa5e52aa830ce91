"""Health Watch streams from callers without a token cannot lock out a device that has one. They held
every connection slot (max_connection_idle ignores a connection with an open call), and a device with
a valid token got UNAVAILABLE. Now such callers hold at most MAX_OPEN_WATCHES streams: the others are
refused, their connections go idle and are closed, and the device is served. With a real server,
300 Watch streams on 300 connections against --max-connections 310."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge import models
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from edge.wire import MODEL_SHA256, SPLIT_POINT
from helpers import seeded_inputs
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.grpc_service import EdgeServer
from server.repository import ModelRepository
from server.security import MAX_OPEN_WATCHES, Security

TOKEN = "device-token-0123456789abcdef"


def test_300_watch_streams_without_a_token_do_not_lock_out_a_device(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"dev1 {TOKEN}\n")
    security = Security(tokens=tokens)
    repository = ModelRepository.from_files([models.model_path("digits_resnet")])
    server = EdgeServer(
        DataPlane(repository), max_connections=310, idle_timeout_s=1.0, interceptors=security.interceptors()
    )
    channels, watches, refused = [], [], 0
    with BackgroundServer(server) as running:
        try:
            for _ in range(300):
                channel = grpc.insecure_channel(
                    running.address, options=[("grpc.use_local_subchannel_pool", 1)]
                )
                channels.append(channel)
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
                try:
                    next(call)  # the stream is open: its first answer came
                    watches.append(call)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                    refused += 1
            assert len(watches) == MAX_OPEN_WATCHES and refused == 300 - MAX_OPEN_WATCHES
            time.sleep(2.5)  # the refused callers' connections are idle now, and closed
            graph = ModelGraph.from_file(models.model_path("digits_resnet"))
            with ModelRunner(graph) as runner:
                cut = runner.run_head(8, seeded_inputs(graph, 0)).cut
            with TailClient(running.address, timeout_s=10, token=TOKEN, streaming=False) as device:
                result = device.infer(
                    "digits_resnet", cut, parameters={MODEL_SHA256: graph.sha256, SPLIT_POINT: 8}
                )
            assert result.outputs
        finally:
            for call in watches:
                call.cancel()
            for channel in channels:
                channel.close()
    repository.close()
