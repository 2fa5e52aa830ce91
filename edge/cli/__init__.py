"""The ``edge`` command line: one module per subcommand, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..argtypes import Parser
from ..codec import bound_codec
from ..console import quiet_closed_stdout
from ..cpu_latency import cpu_latency_hold
from ..errors import EdgeError
from . import (
    bench_cmd,
    cascade_cmd,
    codec_cmd,
    demo_cmd,
    export_cmd,
    infer_cmd,
    inspect_cmd,
    ping_cmd,
    plan_cmd,
    quantize_cmd,
    run_cmd,
    split_cmd,
)

__all__ = ["main"]

logger = logging.getLogger(__name__)

COMMANDS = [
    demo_cmd,
    inspect_cmd,
    split_cmd,
    infer_cmd,
    bench_cmd,
    plan_cmd,
    ping_cmd,
    cascade_cmd,
    codec_cmd,
    quantize_cmd,
    run_cmd,
    export_cmd,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="edge",
        description="Cooperative device-edge inference: split a TFLite model, run the head here and the tail "
        "on an edge server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    _global_flags_everywhere(parser)
    return parser


def _global_flags_everywhere(parser: argparse.ArgumentParser) -> None:
    """--debug and -v after the subcommand too (``edge infer … -v``). SUPPRESS as the default: a
    subcommand that was not given the flag leaves the top level's value alone."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in dict.fromkeys(action.choices.values()):
            if "--debug" not in child._option_string_actions:
                child.add_argument(
                    "--debug",
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help="show tracebacks and debug logs",
                )
            if "--verbose" not in child._option_string_actions and "-v" not in child._option_string_actions:
                child.add_argument(
                    "-v",
                    "--verbose",
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help="log progress to stderr",
                )
            _global_flags_everywhere(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bound_codec(args)
        with cpu_latency_hold(getattr(args, "cpu_latency_us", None)):
            return int(args.func(args) or 0)
    except EdgeError as err:
        if args.debug:
            raise
        print(f"edge: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return quiet_closed_stdout()
    except KeyboardInterrupt:
        return 130
