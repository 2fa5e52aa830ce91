"""``edge export mlserver MODEL --out DIR``: a directory ready for ``mlserver start DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..argtypes import listen_port, non_negative_int, positive_float, positive_int
from .common import MODEL_HELP, load_graph

__all__ = ["register"]


def _cuts(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected cut indices like 8,12; got {text!r}") from err


def _port(text: str) -> int:
    port = listen_port(text)
    if port == 0:
        raise argparse.ArgumentTypeError("MLServer needs a fixed port, 1..65535")
    return port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write deployment files for another serving engine (mlserver)",
        description="Write deployment files that serve MODEL's tails with edge-server's semantics on another "
        "engine. 'mlserver' writes DIR/settings.json, DIR/MODEL/model-settings.json (the whole model, with the "
        "runtime server.mlserver.EdgeRuntime), one DIR/MODEL@K/model-settings.json per --cuts K (that tail under "
        "its own name, batched by MLServer), and DIR/requirements.txt. Then: mlserver start DIR.",
    )
    p.add_argument("engine", choices=["mlserver"], help="the serving engine")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory (created if missing)"
    )
    p.add_argument(
        "--cuts",
        type=_cuts,
        default=[],
        metavar="K,…",
        help="cuts whose tails get a model name of their own (NAME@K) for MLServer's adaptive batching",
    )
    p.add_argument("--name", help="the model's name on the server (default: the file's stem)")
    p.add_argument(
        "--parallel-workers",
        type=non_negative_int,
        default=0,
        help="MLServer's inference worker processes; 0 runs inference in MLServer's own process, which is "
        "faster on one core (default: %(default)s)",
    )
    p.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=1,
        help="adaptive batching of each NAME@K (default: 1, off)",
    )
    p.add_argument(
        "--max-batch-time-ms",
        type=positive_float,
        default=1.0,
        help="how long a batch gathers, in ms (default: 1)",
    )
    p.add_argument(
        "--backend", default="litert", choices=["litert", "tflite-runtime"], help="the server's interpreter"
    )
    p.add_argument(
        "--threads", type=positive_int, default=1, help="interpreter threads per model (default: 1)"
    )
    p.add_argument("--grpc-port", type=_port, default=8081, help="default: %(default)s")
    p.add_argument("--http-port", type=_port, default=8080, help="default: %(default)s")
    p.add_argument("--metrics-port", type=_port, default=8082, help="default: %(default)s")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from server.export import write_mlserver

    graph = load_graph(args.model)
    written = write_mlserver(
        graph,
        args.out,
        cuts=args.cuts,
        name=args.name,
        parallel_workers=args.parallel_workers,
        max_batch_size=args.max_batch_size,
        max_batch_time_ms=args.max_batch_time_ms,
        backend=args.backend,
        threads=args.threads,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
    )
    for path in written:
        print(f"wrote {path}")
    print(f"start it with: mlserver start {args.out}")
    return 0
