"""Argument types for the command lines: each refuses a bad value with one line (argparse exits 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

from .address import check_port, normalize
from .errors import ConfigError

__all__ = [
    "Parser",
    "address",
    "at_least",
    "listen_port",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, not the usage block and a line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {low}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def _float(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(
            f"{text} must be a finite number {'>= 0' if allow_zero else 'above 0'}"
        )
    return value


def positive_float(text: str) -> float:
    return _float(text, allow_zero=False)


def non_negative_float(text: str) -> float:
    return _float(text, allow_zero=True)


def listen_port(text: str) -> int:
    """0..65535; 0 picks any free port."""
    try:
        return check_port(at_least(0)(text), allow_zero=True)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def address(text: str) -> str:
    """An edge server's HOST:PORT, checked and written out in full."""
    try:
        return normalize(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
