"""Keep idle CPUs quick to wake, through Linux's PM QoS interface (``/dev/cpu_dma_latency``).

An idle CPU sleeps in an idle state, and the deeper the state the longer it takes to wake
when a message arrives; on a virtual machine a halted vCPU also comes back with cold caches.
While a process holds a request of N microseconds, the kernel keeps every CPU in idle states
that wake within N; 0 keeps them polling. That buys latency with power, so it is opt-in, for
mains-powered edge servers and for devices where the watts do not matter.

The request lasts as long as the file stays open, and ends when it is closed or the process exits.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import struct
from pathlib import Path
from types import TracebackType

from .argtypes import non_negative_int
from .errors import ConfigError

__all__ = [
    "PM_QOS_PATH",
    "CPULatencyHold",
    "add_cpu_latency_arg",
    "cpu_latency_hold",
    "current_cpu_latency_us",
]

logger = logging.getLogger(__name__)

PM_QOS_PATH = Path("/dev/cpu_dma_latency")


class CPULatencyHold:
    """Holds a PM QoS request of at most ``microseconds`` of CPU wake-up latency; a context manager."""

    def __init__(self, microseconds: int, *, path: Path = PM_QOS_PATH) -> None:
        if not 0 <= microseconds <= 2_000_000_000:
            raise ConfigError(f"CPU wake-up latency must be 0..2000000000 microseconds, not {microseconds}")
        self.microseconds = microseconds
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY)
        except FileNotFoundError as err:
            raise ConfigError(
                f"cannot hold the CPU wake-up latency: {path} does not exist (no PM QoS here)"
            ) from err
        except OSError as err:
            raise ConfigError(
                f"cannot hold the CPU wake-up latency: cannot open {path} for writing "
                f"({err.strerror or err}); it needs root or write access to the file"
            ) from err
        try:
            os.write(self._fd, struct.pack("=i", microseconds))
        except OSError as err:
            self.close()
            raise ConfigError(
                f"cannot hold the CPU wake-up latency: writing {path} failed: {err.strerror or err}"
            ) from err
        logger.info("holding CPU wake-up latency at %d us (%s)", microseconds, path)

    def close(self) -> None:
        """End the request."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def active(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> CPULatencyHold:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def current_cpu_latency_us(path: Path = PM_QOS_PATH) -> int:
    """The latency the kernel now keeps the CPUs within: the strictest request held by any process."""
    try:
        with path.open("rb") as f:
            data = f.read(4)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from err
    if len(data) != 4:
        raise ConfigError(f"{path} gave {len(data)} bytes, not a 32-bit value")
    (value,) = struct.unpack("=i", data)
    return int(value)


def cpu_latency_hold(microseconds: int | None) -> contextlib.AbstractContextManager[object]:
    """A hold for a ``--cpu-latency-us`` option or a profile's ``cpu_latency_us``; does nothing when it is None."""
    return contextlib.nullcontext() if microseconds is None else CPULatencyHold(microseconds)


def add_cpu_latency_arg(p: argparse.ArgumentParser) -> None:
    """The ``--cpu-latency-us`` option, shared by ``edge`` and ``edge-server``."""
    p.add_argument(
        "--cpu-latency-us",
        type=non_negative_int,
        metavar="US",
        help="while running, keep idle CPUs able to wake within US microseconds (Linux PM QoS, "
        "/dev/cpu_dma_latency; needs root). 0 keeps them polling: lowest latency, most power",
    )
