"""``edge plan``: predict every cut's latency on this device and link, and show the planner's choice."""

from __future__ import annotations

import argparse
import json
import logging
from contextlib import ExitStack
from pathlib import Path

from rich import box
from rich.table import Table

from ..argtypes import positive_float, positive_int
from ..autosplit import AutoSplit
from ..backends.support import require_runnable
from ..codec import CodecFile
from ..console import output_console
from ..errors import EdgeError
from ..planner import DEFAULT_COMPUTE_WATTS, DEFAULT_RADIO_WATTS, OBJECTIVES, Plan
from ..policy import make_policy
from ..profiler import profile_path
from ..runner import ModelRunner
from ..transport import TailClient
from .common import (
    MODEL_HELP,
    add_address_args,
    add_backend_args,
    add_constraint_args,
    client_options,
    load_graph,
)

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict the latency of every cut and choose one",
        description="Profile MODEL's heads on this device (cached), fetch the server's tail profile, probe the "
        "link, then predict every cut: T(K) = head(K) + bytes(K)/bandwidth + rtt + queue + tail(K). "
        "This is what --split-at auto starts from. Without --server an edge server is started in-process "
        "on loopback.",
    )
    p.add_argument("model", help=MODEL_HELP)
    add_address_args(p)
    add_backend_args(p)
    p.add_argument(
        "--objective", choices=OBJECTIVES, default="latency", help="what to minimise (default: latency)"
    )
    add_constraint_args(p)
    p.add_argument(
        "--compute-watts",
        type=positive_float,
        default=DEFAULT_COMPUTE_WATTS,
        help="device power while computing, W (default: %(default)s)",
    )
    p.add_argument(
        "--radio-watts",
        type=positive_float,
        default=DEFAULT_RADIO_WATTS,
        help="device power while sending, W (default: %(default)s)",
    )
    p.add_argument(
        "--probes", type=positive_int, default=3, help="link probes of each kind (default: %(default)s)"
    )
    p.add_argument(
        "--refresh-profile", action="store_true", help="measure the device again, ignoring the cache"
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        help="deadline of each probe, seconds (default: %(default)s)",
    )
    p.add_argument("--all", action="store_true", help="list every cut, not only those the planner may choose")
    p.add_argument("--json", action="store_true", help="print JSON (every cut)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.model)
    name = args.model_name or Path(graph.source).stem
    with ExitStack() as stack:
        address = args.server
        if not address:
            from server.embedded import BackgroundServer

            address = stack.enter_context(BackgroundServer.from_files([Path(graph.source)])).address
        require_runnable(graph, args.backend)
        runner = stack.enter_context(ModelRunner(graph, backend=args.backend, threads=args.threads))
        client = stack.enter_context(TailClient(address, timeout_s=args.timeout, **client_options(args)))
        policy = make_policy(
            graph,
            "auto",
            runner=runner,
            client=client,
            model_name=name,
            objective=args.objective,
            deadline_ms=args.deadline_ms,
            max_bytes=args.max_bytes,
            compute_watts=args.compute_watts,
            radio_watts=args.radio_watts,
            probes=args.probes,
            refresh_profile=args.refresh_profile,
            progress=True,
        )
    assert isinstance(policy, AutoSplit)
    chosen = policy.last_plan
    if chosen is None:
        raise EdgeError("the planner produced no plan")
    report = _report(args, policy, chosen, address, name)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, chosen, graph.num_operators, policy.candidates, args.all, policy.coded_cuts)
    return 0


def _report(
    args: argparse.Namespace, policy: AutoSplit, chosen: Plan, address: str, name: str
) -> dict[str, object]:
    link = policy.estimator.estimate() if policy.reachable else None
    n = policy.n
    predictions = chosen.predictions
    return {
        "model": name,
        "server": address,
        "server_reachable": policy.reachable,
        "objective": chosen.objective,
        "deadline_ms": args.deadline_ms,
        "max_bytes": args.max_bytes,
        "choice": chosen.choice,
        "met_constraints": chosen.met_constraints,
        "note": chosen.note
        or ("" if policy.reachable else "the server is unreachable: the device runs alone"),
        "predicted_ms": round(chosen.chosen.predicted_ms, 4),
        "device_only_ms": round(predictions[n].predicted_ms, 4),
        "server_only_ms": round(predictions[0].predicted_ms, 4) if policy.reachable else None,
        "link": link.as_dict() if link is not None else None,
        "device": {
            "backend": args.backend,
            "threads": args.threads,
            "profile": str(profile_path(policy.graph.sha256, args.backend, args.threads)),
        },
        "num_operators": n,
        "codec": policy.codec,
        **(
            {"codec_file": args.codec.source, "codec_max_loss_pp": args.codec.max_loss_pp}
            if isinstance(args.codec, CodecFile)
            else {}
        ),
        "cuts": [
            {
                **p.as_dict(),
                "candidate": p.index in policy.candidates,
                "coded": p.index in policy.coded_cuts,
                **(
                    {"codec_ratio": round(policy.wire_ratio[p.index], 4)}
                    if p.index in policy.wire_ratio
                    else {}
                ),
            }
            for p in predictions
        ],
    }


def _print(
    report: dict[str, object],
    chosen: Plan,
    n: int,
    candidates: frozenset[int],
    show_all: bool,
    coded: frozenset[int] = frozenset(),
) -> None:
    console = output_console(min_width=100)
    table = Table(
        title=f"{report['model']}: {n} operators, objective {chosen.objective}; times in ms",
        box=box.SIMPLE_HEAD,
    )
    codec = str(report["codec"])
    columns = (
        "K",
        "head",
        "bytes",
        *(("sent as",) if codec != "raw" else ()),
        "transfer",
        "rtt+queue",
        "tail",
    )
    for column in (*columns, "predicted", "mJ", ""):
        table.add_column(column, justify="right", no_wrap=True)
    shown = [p for p in chosen.predictions if show_all or p.index in candidates]
    for p in shown:
        if p.index == chosen.choice:
            mark = "◀ chosen"
        elif p.index not in candidates:
            mark = "dominated"
        else:
            mark = "" if p.feasible else "✗ limits"
        remote = not p.local
        table.add_row(
            str(p.index),
            f"{p.head_ms:.3f}",
            f"{p.nbytes:,}",
            *((codec if p.index in coded else "raw" if remote else "-",) if codec != "raw" else ()),
            f"{p.transfer_ms:.3f}" if remote else "-",
            f"{p.rtt_ms + p.queue_ms:.3f}" if remote else "-",
            f"{p.tail_ms:.3f}" if remote else "-",
            f"{p.predicted_ms:.3f}",
            f"{p.energy_mj:.3f}",
            mark,
            style="bold green" if p.index == chosen.choice else None,
        )
    console.print(table)
    hidden = len(chosen.predictions) - len(shown)
    if hidden:
        console.print(
            f"{hidden} other {'cut is' if hidden == 1 else 'cuts are'} not shown: each sends no fewer bytes "
            "than an earlier cut, so it cannot win unless the device outruns the server (--all lists them)"
        )
    link = report["link"]
    if isinstance(link, dict):
        mbit = link["bandwidth_mbit_s"]
        console.print(
            f"link: rtt {link['rtt_ms']:.2f} ms, {'?' if mbit is None else f'{mbit:.2f}'} Mbit/s "
            f"({link['method']}, {link['samples']} samples)"
        )
    server_only = report["server_only_ms"]
    console.print(
        f"choice: K={chosen.choice} predicted {report['predicted_ms']:.3f} ms; device only (K={n}) "
        f"{report['device_only_ms']:.3f} ms; server only (K=0) "
        f"{'-' if server_only is None else f'{server_only:.3f} ms'}"
    )
    if report["codec"] != "raw":
        console.print(
            f"a cut sent as {report['codec']} goes through the codec only where that is predicted better than raw"
            " (a lossy codec by more than 10 %); its bytes are at the cut's ratio on the activations of a seeded"
            " input (corrected from live traffic), and its head pays the codec's time"
            + (
                f"; each cut's codec is {report['codec_file']}'s smallest within {report['codec_max_loss_pp']:g} pp"
                if "codec_file" in report
                else ""
            )
        )
    if report["note"]:
        console.print(f"note: {report['note']}")
