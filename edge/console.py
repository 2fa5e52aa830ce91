"""A closed stdout (``edge inspect --json | head``) is the normal end of output, not an error."""

from __future__ import annotations

import os
import shutil
import sys

from rich.console import Console

__all__ = ["output_console", "quiet_closed_stdout"]


def quiet_closed_stdout() -> int:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again; returns exit 0.

    The reader has what it wanted; Python's own advice for SIGPIPE-less programs.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 0


class _OutputConsole(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 here; a reader that stopped reading is no failure, so let main() end with 0.
        raise BrokenPipeError


def output_console(*, stderr: bool = False, min_width: int | None = None) -> Console:
    """The console a command prints its report to.

    Its width is the terminal's; output to a pipe or a file gets ``min_width`` columns if given
    (a log keeps every column rather than an 80-column squeeze), else the terminal's size as
    the environment reports it.
    """
    console = _OutputConsole(stderr=stderr)
    if min_width is not None and not console.is_terminal:
        console.width = max(min_width, shutil.get_terminal_size((min_width, 24)).columns)
    return console
