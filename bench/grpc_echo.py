#!/usr/bin/env python3
"""The floor under edge-server's per-request cost: a bare grpc.aio server on the same service.

It answers every ``ModelStreamInfer`` message (and ``ModelInfer`` call) with one fixed response
of the model's output shape, without parsing the request or computing anything: what grpcio
alone costs per message. ``bench/fleet.py --echo`` drives it exactly as it drives edge-server.

    python bench/grpc_echo.py --port 50800 --model mobilenetv2_035
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge import models
from edge.graph import ModelGraph
from edge.protocol import SERVICE_NAME, converters, pb
from edge.wire import InferResponse, encode


def fixed_answer(model: str) -> tuple[bytes, bytes]:
    """(a ModelInferResponse, a ModelStreamInferResponse), serialized, with the model's outputs."""
    graph = ModelGraph.from_file(models.resolve(model))
    outputs = tuple(encode(t.name, np.zeros(t.shape, dtype=t.dtype)) for t in graph.outputs)
    reply = converters.infer_response_to_pb(
        InferResponse(model_name=models.resolve(model).stem, model_version="1", outputs=outputs)
    )
    return reply.SerializeToString(), pb.ModelStreamInferResponse(infer_response=reply).SerializeToString()


async def serve(port: int, model: str) -> None:
    unary_answer, stream_answer = fixed_answer(model)

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return unary_answer

    async def stream(requests, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        async for _ in requests:
            yield stream_answer

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="mobilenetv2_035")
    args = p.parse_args()
    try:
        asyncio.run(serve(args.port, args.model))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
