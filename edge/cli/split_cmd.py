"""``edge split MODEL --at K --out DIR``: write the head, the tail and the manifest."""

from __future__ import annotations

import argparse

from ..partition import split_model, write_split
from .common import MODEL_HELP, load_graph

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split",
        help="cut a model into head.tflite and tail.tflite",
        description="Cut MODEL at K: DIR/head.tflite runs operators [0, K), DIR/tail.tflite runs [K, N), and "
        "DIR/split.json records the source model's sha256, K and the tensors crossing the cut.",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument(
        "--at",
        required=True,
        metavar="K|TENSOR",
        help="the cut index (0..N), or a tensor name: cut right after that tensor is produced",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.model)
    k = graph.resolve_cut(args.at)
    partition = split_model(graph, k)
    paths = write_split(partition, args.out)
    cut = partition.cut
    print(f"cut {k} of {graph.num_operators}: {len(cut.tensors)} tensor(s), {cut.nbytes:,} bytes to send")
    for t in cut.tensors:
        print(f"  {t.name}  {t.dtype.name}{list(t.shape)}")
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0
