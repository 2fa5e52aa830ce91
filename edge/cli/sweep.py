"""``edge bench sweep``: does the planner's cut come close to the best one, under emulated links?

For each scenario (bandwidth x RTT x device slowdown) the sweep shapes a veth pair between
two network namespaces with ``tc tbf``, puts a user-space delay proxy (RTT/2 each way) in
front of one edge server, and runs the device in the other namespace: first under
``--split-at auto``, which sees only what a device sees (its profile, the server's profile,
its own traffic and probes), then at every cut with a fixed split to measure end-to-end
latency. It writes JSON and a PNG, and prints the chosen cut against the best measured one.
Needs root and the ``plot`` extra.

Only the arguments live here: the work is in :mod:`edge.emulation.sweep`, imported when the
command runs, so no other command loads the emulation code.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..codec import CODEC_NAMES, add_max_loss_arg, codec_arg
from ..errors import EdgeError

__all__ = ["DEFAULT_MODEL", "register"]

DEFAULT_MODEL = "mobilenetv2_035"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from err


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="the planner's cut vs the best measured cut, under emulated links (root)",
        description=__doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else None,
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="a .tflite file or shipped model (default: %(default)s)"
    )
    p.add_argument("--bandwidths", type=_floats, default=[1.0, 10.0, 100.0], help="Mbit/s, comma-separated")
    p.add_argument(
        "--rtts", type=_floats, default=[5.0, 40.0], help="round-trip times in ms, comma-separated"
    )
    p.add_argument(
        "--slowdowns",
        type=_floats,
        default=[1.0, 4.0],
        help="device slowdowns (time dilation), comma-separated",
    )
    p.add_argument("--scenarios", nargs="*", metavar="KEY", help="only these, e.g. 10mbit-5ms-4x")
    p.add_argument(
        "--requests", type=int, default=10, help="measured requests per cut (default: %(default)s)"
    )
    p.add_argument(
        "--pilots", type=int, default=2, help="requests before a cut may be pruned (default: %(default)s)"
    )
    p.add_argument(
        "--prune",
        type=float,
        default=1.5,
        help="prune cuts whose pilots exceed this x best median (default: 1.5)",
    )
    p.add_argument("--adapt", type=int, default=60, help="requests under --split-at auto first (default: 60)")
    p.add_argument("--gap-ms", type=float, default=10.0, help="idle time before each request (default: 10)")
    p.add_argument(
        "--cuts", type=int, nargs="*", default=[], help="measure only these cuts (plus 0, N, choice)"
    )
    p.add_argument("--threads", type=int, default=1, help="device interpreter threads (default: %(default)s)")
    p.add_argument("--server-threads", type=int, default=1, help="server interpreter threads (default: 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each request, seconds")
    p.add_argument(
        "--codec",
        type=codec_arg,
        default="raw",
        metavar="{" + ",".join(CODEC_NAMES) + "}|CODEC.json",
        help="codec of the tensors the device sends, under auto and at every cut: a name, or a codec "
        "calibrated for the model (edge codec calibrate) (default: %(default)s)",
    )
    add_max_loss_arg(p)
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where JSON and PNG go")
    p.add_argument("--name", default="sweep", help="file stem of the outputs (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Checked before minutes of work, not found missing at the plot at the end.
    missing = [name for name in ("matplotlib",) if importlib.util.find_spec(name) is None]
    if missing:
        raise EdgeError(
            f"edge bench sweep needs {', '.join(missing)} for its plot: pip install 'edge-coop[plot]'"
        )
    from ..emulation import sweep

    return sweep.run(args)
