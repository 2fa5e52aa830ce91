"""``edge inspect MODEL``: every cut of a model, with what crosses it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from ..graph import ModelGraph, load_model

__all__ = ["describe", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list every cut of a model and the bytes it sends",
        description="List every cut K of MODEL's main graph: the head runs operators [0, K), the tail runs "
        "[K, N). For each cut, the tensors that cross it and the bytes the device would send.",
    )
    p.add_argument("model", help="a .tflite file")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(func=run)


def describe(graph: ModelGraph) -> dict[str, Any]:
    """The model and its cuts as JSON-friendly data."""
    return {
        "sha256": graph.sha256,
        "operators": [{"index": op.index, "opcode": op.opcode} for op in graph.operators],
        "inputs": [t.describe() for t in graph.inputs],
        "outputs": [t.describe() for t in graph.outputs],
        "cuts": [
            {
                "index": cut.index,
                "bytes": cut.nbytes,
                "tensors": [t.describe() for t in cut.tensors],
                "head_outputs": [t.name for t in cut.head_outputs],
            }
            for cut in graph.cuts()
        ],
    }


def run(args: argparse.Namespace) -> int:
    graph = load_model(args.model)
    if args.json:
        print(json.dumps(describe(graph), indent=2))
        return 0
    console = Console()
    console.width = max(console.width, 140)
    input_bytes = sum(t.nbytes for t in graph.inputs)
    console.print(f"[bold]{graph.source}[/bold]  sha256 {graph.sha256}")
    console.print(
        f"{graph.num_operators} operators; cut K runs [0, K) on the device and [K, N) on the server"
    )
    for label, tensors in (("input ", graph.inputs), ("output", graph.outputs)):
        for t in tensors:
            console.print(f"  {label} {t.name}  {t.dtype.name}{list(t.shape)}  {t.nbytes} B")
    table = Table(header_style="bold")
    table.add_column("K", justify="right")
    table.add_column("after operator", no_wrap=True)
    table.add_column("tensors sent", overflow="fold")
    table.add_column("shape, dtype", no_wrap=True)
    table.add_column("bytes", justify="right")
    table.add_column("vs input", justify="right")
    cuts = graph.cuts()
    inner = cuts[1:-1] or cuts
    smallest = min(cut.nbytes for cut in inner)
    for cut in cuts:
        if cut.index == 0:
            op = "- (server only)"
        else:
            op = f"{cut.index - 1} {graph.operators[cut.index - 1].opcode}"
            if cut.index == graph.num_operators:
                op += " (device only)"
        names = "\n".join(t.name for t in cut.tensors) or "-"
        shapes = "\n".join(f"{t.dtype.name}{list(t.shape)}" for t in cut.tensors) or "-"
        ratio = f"{cut.nbytes / input_bytes:.2f}x" if input_bytes else "-"
        style = "green" if cut in inner and cut.nbytes == smallest else None
        table.add_row(str(cut.index), op, names, shapes, f"{cut.nbytes:,}", ratio, style=style)
    console.print(table)
    console.print("[green]green[/green]: the inner cuts that send the fewest bytes")
    return 0
