"""``edge infer``: one cooperative inference from .npy inputs to an .npz of outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..autosplit import AutoSplit
from ..cascade import Calibration, open_router
from ..cooperative import CooperativeRunner
from ..errors import EdgeError
from .common import add_device_args, add_server_args, check_strict, load_graph, load_inputs, open_runner

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="run one input through the model, head here and tail on the server",
        description="Run the head of MODEL locally, send the cut tensors to the edge server, and write the "
        "model's outputs. If the server fails, the tail runs locally and the result is marked as a fallback; "
        "the outputs are identical either way.",
    )
    add_device_args(p)
    add_server_args(p)
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="[NAME=]FILE.npy",
        help="an input array; floats given to a quantized input are quantized with its scale and zero point",
    )
    p.add_argument("--output", metavar="FILE.npz", help="write the outputs here, keyed by output tensor name")
    p.add_argument("--local", action="store_true", help="run the whole model on this device; no network")
    p.add_argument(
        "--cascade",
        type=Path,
        metavar="CAL.json",
        help="first run the calibration's small model here, and answer with it when it is sure enough "
        "(a file from edge calibrate for MODEL)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.model)
    feeds = load_inputs(graph, args.input)
    output = _output_path(args.output) if args.output else None
    calibration = Calibration.load(args.cascade) if args.cascade else None
    if calibration is not None:
        try:
            calibration.check_model(graph)  # before the device profiles anything for the wrong model
        except EdgeError as err:
            raise EdgeError(f"{args.cascade}: {err}") from err
        if args.split_at is None:
            args.split_at = str(calibration.split_point)
    device = open_runner(args, graph, local=args.local)
    routed = None
    try:
        if calibration is not None:
            router = open_router(calibration, device, backend=args.backend, threads=args.threads)
            try:
                routed = router.infer(feeds)
            finally:
                router.close()
            result = routed.inference
        else:
            result = device.infer(feeds)
    finally:
        device.close()
    written = routed.outputs if routed is not None else result.outputs
    if output is not None:
        try:
            with output.open("wb") as fh:  # a file object: np.savez would add .npz to a name by itself
                np.savez(fh, **written)  # type: ignore[arg-type]  # numpy's stub
        except OSError as err:
            raise EdgeError(f"cannot write {output}: {err.strerror or err}") from err
    if routed is not None:
        print(
            f"answered by {routed.answered_by}: confidence {routed.confidence:.4f} "
            f"({'at or above' if not routed.escalated else 'below'} the threshold {routed.threshold:.4f})"
        )
    t = result.timings
    if result.offloaded:
        print(
            f"cut {result.split_point}, tail on the server: head {t.head_ms:.2f} ms, transfer {t.transfer_ms:.2f} ms, "
            f"queue {t.queue_ms:.2f} ms, tail {t.tail_ms:.2f} ms, total {t.e2e_ms:.2f} ms, "
            f"{result.bytes_sent:,} bytes sent"
        )
    elif result.fallback:
        # Nothing reached the server: no transfer to report, only the time lost before finishing here.
        print(
            f"on this device (fallback from cut {result.split_point}): total {t.e2e_ms:.2f} ms, "
            f"of which {t.transfer_ms:.2f} ms waiting on the server, 0 bytes delivered"
        )
        print(f"fallback: the tail ran locally ({result.fallback_reason})", file=sys.stderr)
    else:
        answered_here = routed is not None and not routed.escalated  # the line above says why
        why = "" if args.local or not args.server or answered_here else f" ({_why_local(device)})"
        print(f"on this device{why}: total {t.e2e_ms:.2f} ms, 0 bytes sent")
    if result.lossy:
        print(
            f"lossy: the cut went {args.codec}-encoded; the outputs may differ from the model's",
            file=sys.stderr,
        )
    for name, array in written.items():
        line = f"  {name}  {array.dtype.name}{list(array.shape)}"
        if array.ndim <= 2 and array.size <= 1000 and array.size > 1:
            line += f"  argmax {int(np.argmax(array))}"
        print(line)
    if output is not None:
        print(f"wrote {output}")
    check_strict(args, int(result.fallback), 1, result.fallback_reason)
    return 0


def _why_local(device: CooperativeRunner) -> str:
    """Why a request with a server stayed on the device: the circuit, or the plan."""
    circuit = device.circuit
    if circuit is not None and not circuit.available():
        return f"the server is down: {circuit.reason}"
    if isinstance(device.policy, AutoSplit):
        if not device.policy.reachable:
            return "the planner could not reach the server"
        return "the planner predicts the device alone is fastest here; edge plan shows every cut"
    return "the cut sends nothing"


def _output_path(spec: str) -> Path:
    """Where ``--output`` writes: the name as given if it ends in .npz, else with .npz added."""
    path = Path(spec)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    if path.is_dir():
        raise EdgeError(f"--output {spec}: {path} is a directory")
    return path
