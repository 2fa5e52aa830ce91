"""``edge inspect MODEL``: every cut of a model, with what crosses it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from ..backends import BACKENDS
from ..backends.support import check_support
from ..cascade import exit_outputs
from ..console import output_console
from ..errors import EdgeError
from ..graph import ModelGraph, TensorInfo
from ..preprocess import random_inputs
from ..runner import ModelRunner
from ..wire import encode, encodings
from .common import MODEL_HELP, load_graph, load_inputs

__all__ = ["describe", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list every cut of a model and the bytes it sends",
        description="List every cut K of MODEL's main graph: the head runs operators [0, K), the tail runs "
        "[K, N). For each cut, the tensors that cross it and the bytes the device would send.",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument(
        "--codec",
        choices=encodings.CODECS,
        help="also show each cut's bytes compressed with this codec, on the activations of --sample",
    )
    p.add_argument(
        "--sample",
        type=Path,
        metavar="FILE.npy",
        help="with --codec: the input whose activations are compressed (default: a seeded random input, "
        "which compresses worse than real data)",
    )
    p.set_defaults(func=run)


def compressed_sizes(graph: ModelGraph, codec: str, sample: Path | None) -> dict[int, int]:
    """Each cut's bytes on the wire with ``codec``, on the activations the model computes from ``sample``."""
    if sample is not None:
        inputs = load_inputs(graph, [str(sample)])
    else:
        inputs = random_inputs(graph, 0)
    with ModelRunner(graph) as runner:
        activations = runner.activations(inputs)
    sizes = {}
    for cut in graph.cuts():
        sizes[cut.index] = sum(
            encodings.compress(encode(t.name, activations[t.name]), codec).nbytes for t in cut.tensors
        )
    return sizes


def describe(graph: ModelGraph, compressed: dict[int, int] | None = None) -> dict[str, Any]:
    """The model and its cuts as JSON-friendly data (with ``compressed`` bytes per cut, if given)."""
    body: dict[str, Any] = {
        "sha256": graph.sha256,
        "backends": [check_support(graph, key).describe() for key in BACKENDS],
        "operators": [{"index": op.index, "opcode": op.opcode} for op in graph.operators],
        "inputs": [t.describe() for t in graph.inputs],
        "outputs": [t.describe() for t in graph.outputs],
        "exits": [{"output": name, "from_cut": k} for name, k in exit_outputs(graph).items()],
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
    if compressed is not None:
        for entry in body["cuts"]:
            entry["compressed_bytes"] = compressed[int(entry["index"])]
    return body


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.model)
    if args.sample is not None and args.codec is None:
        raise EdgeError("--sample goes with --codec")
    compressed = compressed_sizes(graph, args.codec, args.sample) if args.codec else None
    if args.json:
        print(json.dumps(describe(graph, compressed), indent=2))
        return 0
    console = output_console()
    input_bytes = sum(t.nbytes for t in graph.inputs)
    console.print(f"[bold]{graph.source}[/bold]  sha256 {graph.sha256}")
    console.print(
        f"{graph.num_operators} operators; cut K runs [0, K) on the device and [K, N) on the server"
    )
    exits = exit_outputs(graph)
    for label, group in (("input ", graph.inputs), ("output", graph.outputs)):
        for t in group:
            note = (
                f"  early exit: computed in the head from cut {exits[t.name]} on" if t.name in exits else ""
            )
            console.print(f"  {label} {t.name}  {t.dtype.name}{list(t.shape)}  {t.nbytes} B{note}")
    for key in BACKENDS:
        support = check_support(graph, key)
        if support.runs:
            verdict = "runs the whole model"
        elif support.runs is None:
            verdict = "not installed here; it has every custom op the model uses"
        else:
            verdict = f"[red]cannot run it[/red]: {escape(support.reason)}"
        console.print(f"  backend {key}: {verdict}")
    table = Table(header_style="bold")
    table.add_column("K", justify="right", no_wrap=True)
    table.add_column("after operator", min_width=10)
    # Converter names run to hundreds of characters; folded whole, one cut took dozens of lines at 80
    # columns. Shortened in the middle, a name takes two lines at most.
    narrow = console.width < 100  # the ratio to the input goes, so that the rest fits
    column = max(12, console.width - (64 if narrow else 74))
    table.add_column("tensors sent", overflow="fold", min_width=column)
    limit = 2 * column
    shortened = False
    table.add_column("shape, dtype", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    if not narrow:
        table.add_column("vs input", justify="right", no_wrap=True)
    if compressed is not None:
        table.add_column(args.codec, justify="right", no_wrap=True)
    cuts = graph.cuts()
    inner = cuts[1:-1] or cuts
    smallest = min(cut.nbytes for cut in inner)
    colour = console.color_system is not None
    for cut in cuts:
        if cut.index == 0:
            op = "- (server only)"
        else:
            op = f"{cut.index - 1} {graph.operators[cut.index - 1].opcode}"
            if cut.index == graph.num_operators:
                op += " (device only)"
        ratio = f"{cut.nbytes / input_bytes:.2f}x" if input_bytes else "-"
        best = cut in inner and cut.nbytes == smallest
        style = "green" if best and colour else None
        mark = "" if colour or not best else " *"
        # One row per tensor, so a long name that wraps cannot push its shape out of line.
        tensors: tuple[TensorInfo | None, ...] = cut.tensors or (None,)
        shortened = shortened or any(t is not None and len(t.name) > limit for t in tensors)
        for i, tensor in enumerate(tensors):
            first = i == 0
            table.add_row(
                str(cut.index) + mark if first else "",
                op if first else "",
                _short(tensor.name, limit) if tensor is not None else "-",
                f"{tensor.dtype.name}{list(tensor.shape)}" if tensor is not None else "-",
                f"{cut.nbytes:,}" if first else "",
                *([] if narrow else [ratio if first else ""]),
                *([f"{compressed[cut.index]:,}" if first else ""] if compressed is not None else []),
                style=style,
                end_section=i == len(tensors) - 1 and len(tensors) > 1,
            )
    console.print(table)
    if shortened:
        console.print("long tensor names are shortened in the middle (…); --json has them whole")
    if colour:
        console.print("[green]green[/green]: the inner cuts that send the fewest bytes")
    else:
        console.print("*: the inner cuts that send the fewest bytes")
    return 0


def _short(name: str, limit: int) -> str:
    """``name`` cut in the middle to ``limit`` characters: its start and its end say the most."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[len(name) - (limit - 1 - head) :]}"
