"""What gRPC itself costs per request here: bare grpcio round trips, with none of our code.

A grpc.aio server (its own process) answers ModelInfer and ModelStreamInfer with a fixed
response after busy-waiting ``--handler-us``; the client busy-waits ``--gap-us`` before each
request, as a device does while it runs the head. The figure is the median of the call time
minus the handler's time: what a request pays for the two gRPC stacks and the loopback.

    python3 tools/grpc_floor.py                       # the split-inference pattern
    python3 tools/grpc_floor.py --gap-us 0 --handler-us 0   # back to back

``--model M --cut K`` replaces both busy-waits with the real work: the client runs the head of cut K
(LiteRT) before each request and sends the cut's bytes; the server runs the tail on a cut of its own
and answers with the tail's output bytes. A busy-wait leaves the CPU's caches warm for gRPC; an
interpreter does not. This floor is still bare gRPC, with none of this project's request path, but
pays what real compute on both sides does to the gRPC steps around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc

from edge.protocol import pb, pb_grpc

Handler = Callable[[], tuple[list[bytes], int]]
"""The server's work per request: the answer's output bytes, and the nanoseconds it took."""

Head = Callable[[], bytes]
"""The client's work before each request: the bytes it then sends."""


def _busy(us: int) -> None:
    end = time.perf_counter_ns() + us * 1000
    while time.perf_counter_ns() < end:
        pass


def _response(handler: Handler) -> Any:
    outputs, took = handler()
    response = pb.ModelInferResponse(model_name="floor", raw_output_contents=outputs)
    response.parameters["handler_ns"].int64_param = took
    return response


def _busy_handler(handler_us: int) -> Handler:
    def run() -> tuple[list[bytes], int]:
        started = time.perf_counter_ns()
        _busy(handler_us)
        return [bytes(1000)], time.perf_counter_ns() - started

    return run


def _busy_head(gap_us: int, payload: bytes) -> Head:
    def run() -> bytes:
        _busy(gap_us)
        return payload

    return run


def _runner(model: str) -> Any:
    from edge.graph import ModelGraph
    from edge.runner import ModelRunner

    return ModelRunner(ModelGraph.from_file(model))


def _tail(model: str, cut: int) -> Handler:
    """The tail of ``cut``, run on one fixed cut of seeded inputs, timed as the handler."""
    from edge.preprocess import random_inputs

    runner = _runner(model)
    tensors = runner.run_head(cut, random_inputs(runner.graph)).cut

    def run() -> tuple[list[bytes], int]:
        started = time.perf_counter_ns()
        outputs = runner.run_tail(cut, tensors)
        return [a.tobytes() for a in outputs.values()], time.perf_counter_ns() - started

    return run


def _head(model: str, cut: int) -> Head:
    """The head of ``cut`` on seeded inputs: the cut's bytes, computed before each request."""
    from edge.preprocess import random_inputs

    runner = _runner(model)
    inputs = random_inputs(runner.graph)

    def run() -> bytes:
        return b"".join(a.tobytes() for a in runner.run_head(cut, inputs).cut.values())

    return run


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        return _response(self.handler)

    async def ModelStreamInfer(self, requests: Any, context: Any) -> Any:  # noqa: N802
        async for _ in requests:
            yield pb.ModelStreamInferResponse(infer_response=_response(self.handler))


def _serve(
    port: multiprocessing.Queue,
    handler_us: int,
    cores: set[int] | None = None,
    model: str | None = None,
    cut: int = 0,
) -> None:
    if cores:
        os.sched_setaffinity(0, cores)
    handler = _tail(model, cut) if model else _busy_handler(handler_us)

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(handler), server)
        port.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _measure(
    address: str, mode: str, n: int, gap_us: int, payload: bytes, model: str | None = None, cut: int = 0
) -> float:
    """The median call time outside the handler; with ``model``, each request is the head's cut."""
    head = _head(model, cut) if model else _busy_head(gap_us, payload)
    loop = asyncio.new_event_loop()

    async def connect() -> Any:
        return grpc.aio.insecure_channel(address)

    channel = loop.run_until_complete(connect())
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="floor", raw_input_contents=[payload])
    request.inputs.add(name="x", datatype="INT8", shape=[len(payload)])
    stream = loop.run_until_complete(_open(stub)) if mode == "stream" else None

    async def once() -> Any:
        if stream is None:
            return await stub.ModelInfer(request, timeout=5)
        await stream.write(request)
        return (await stream.read()).infer_response

    costs = []
    for i in range(n + n // 10):
        request.raw_input_contents[0] = head()
        started = time.perf_counter_ns()
        reply = loop.run_until_complete(once())
        took = time.perf_counter_ns() - started
        if i >= n // 10:  # the first tenth warms up
            costs.append((took - reply.parameters["handler_ns"].int64_param) / 1e6)
    if stream is not None:
        stream.cancel()
    loop.run_until_complete(channel.close())
    loop.close()
    return statistics.median(costs)


async def _open(stub: Any) -> Any:
    return stub.ModelStreamInfer()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2000, help="requests per mode (default: %(default)s)")
    p.add_argument("--bytes", type=int, default=4704, help="request payload (default: %(default)s)")
    p.add_argument("--gap-us", type=int, default=1200, help="client busy time before each request")
    p.add_argument("--handler-us", type=int, default=450, help="server busy time per request")
    p.add_argument("--server-core", type=int, help="pin the server process to this core")
    p.add_argument("--client-core", type=int, help="pin the client (this process) to this core")
    p.add_argument("--modes", default="unary,stream", help="which to measure (default: %(default)s)")
    p.add_argument("--model", help="a .tflite model: real head and tail instead of the busy-waits")
    p.add_argument("--cut", type=int, default=32, help="with --model, the cut (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args()
    if args.client_core is not None:
        os.sched_setaffinity(0, {args.client_core})
    ctx = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = ctx.Queue()
    server_cores = {args.server_core} if args.server_core is not None else None
    server = ctx.Process(
        target=_serve, args=(ports, args.handler_us, server_cores, args.model, args.cut), daemon=True
    )
    server.start()
    try:
        address = f"127.0.0.1:{ports.get(timeout=30)}"
        payload = os.urandom(args.bytes)
        result = {
            mode: round(_measure(address, mode, args.n, args.gap_us, payload, args.model, args.cut), 3)
            for mode in args.modes.split(",")
        }
    finally:
        server.terminate()
        server.join(10)
    report = {
        "model": args.model,
        "cut": args.cut if args.model else None,
        "n": args.n,
        "bytes": args.bytes,
        "gap_us": args.gap_us,
        "handler_us": args.handler_us,
        "median_ms": result,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        work = (
            f"the head and tail of {args.model} at cut {args.cut}"
            if args.model
            else f"{args.bytes} B, gap {args.gap_us} us, handler {args.handler_us} us"
        )
        print(f"bare grpc.aio, {work}, n={args.n}")
        for mode, ms in result.items():
            print(f"  {mode:6s} median {ms:.3f} ms per request outside the handler")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
