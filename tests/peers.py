"""Real gRPC peers that serve the Open Inference Protocol otherwise than edge-server does."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from edge import models
from edge.protocol import SERVICE_NAME, converters, pb, pb_grpc
from server.dataplane import DataPlane
from server.grpc_service import InferenceServicer
from server.repository import ModelRepository

UNARY_MODEL = "digits_resnet"
"""What :func:`unary_only_server` serves."""


class UnaryOnly(pb_grpc.GRPCInferenceServiceServicer):
    """A real OIP server without ModelStreamInfer (as KServe's protocol defines it): the generated
    base class answers UNIMPLEMENTED; ModelInfer is our own servicer's."""

    def __init__(self, inner: InferenceServicer) -> None:
        self.inner = inner

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self.inner.ModelInfer(request, context)


@contextlib.contextmanager
def _peer(wrap: Any) -> Iterator[str]:
    """A real grpc.aio server on port 0 whose servicer is ``wrap(our servicer)``; yields its address."""
    repository = ModelRepository.from_files([models.model_path(UNARY_MODEL)])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            wrap(InferenceServicer(DataPlane(repository), workers=0)), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        repository.close()


@pytest.fixture
def unary_only_server() -> Iterator[str]:
    with _peer(UnaryOnly) as address:
        yield address


class ForeignStream:
    """A real gRPC peer that streams as MLServer does: ModelStreamInfer answers with ModelInferResponse
    messages, and ModelInfer answers with our data plane's results. ``version`` is the model version
    it writes: "1" makes the bytes unreadable as ours, "" makes them parse with foreign fields."""

    def __init__(self, dataplane: DataPlane, version: str) -> None:
        self.dataplane = dataplane
        self.version = version
        self.streamed = 0

    def _answer(self, request: Any) -> Any:
        response = converters.infer_response_to_pb(
            self.dataplane.infer(converters.infer_request_from_pb(request))
        )
        response.model_version = self.version
        return response

    def stream(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            self.streamed += 1
            yield self._answer(request)

    def unary(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer(request)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                    self.stream,
                    request_deserializer=pb.ModelInferRequest.FromString,
                    response_serializer=pb.ModelInferResponse.SerializeToString,
                ),
                "ModelInfer": grpc.unary_unary_rpc_method_handler(
                    self.unary,
                    request_deserializer=pb.ModelInferRequest.FromString,
                    response_serializer=pb.ModelInferResponse.SerializeToString,
                ),
            },
        )


class Busy(pb_grpc.GRPCInferenceServiceServicer):
    """A real OIP server that refuses every ``every``-th ModelInfer with RESOURCE_EXHAUSTED, as a
    server at its per-device limit does, and answers the others with our own servicer."""

    def __init__(self, inner: InferenceServicer, every: int) -> None:
        self.inner, self.every, self.calls = inner, every, 0

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self.calls += 1
        if self.calls % self.every == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "16 requests in flight for this device")
        return await self.inner.ModelInfer(request, context)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self.inner.ServerReady(request, context)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self.inner.ServerMetadata(request, context)


@pytest.fixture
def busy_server() -> Iterator[str]:
    """A :class:`Busy` server refusing every third request, serving :data:`UNARY_MODEL`."""
    with _peer(lambda inner: Busy(inner, every=3)) as address:
        yield address
