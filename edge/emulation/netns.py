"""Two network namespaces joined by a veth pair whose both ends are shaped with ``tc tbf``.

The device runs in one namespace, the edge server (and the delay proxy) in the other; the
only path between them is the veth pair, so every byte crosses the token bucket. Nothing
outside the two namespaces this module creates is configured: the veth pair is created
directly inside them, and every ``ip`` and ``tc`` command names its namespace. The
namespaces (and with them the veth pair and the qdiscs) are deleted on :meth:`close`, at
exit, and on SIGTERM.

Needs root, ``ip`` and ``tc`` (iproute2).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from ..errors import EdgeError

__all__ = ["EmulationError", "NetnsLink", "check_privileges"]

logger = logging.getLogger(__name__)


class EmulationError(EdgeError):
    """The link emulation cannot be set up here (not root, no iproute2, a command failed)."""


def check_privileges() -> None:
    """Raise EmulationError unless this process can create namespaces and qdiscs."""
    if os.geteuid() != 0:
        raise EmulationError("link emulation needs root (network namespaces and tc); run as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise EmulationError(f"link emulation needs {tool!r} (iproute2), which is not installed")


class NetnsLink:
    """A device namespace and a server namespace joined by one shaped veth pair."""

    def __init__(self, *, tag: str | None = None, subnet: str = "10.213.77") -> None:
        tag = tag or f"{os.getpid() % 100000}"
        self.device_ns = f"edgesw{tag}d"
        self.server_ns = f"edgesw{tag}s"
        # Interface names live inside our namespaces only; IFNAMSIZ allows 15 characters.
        self.device_if = "veth-dev"
        self.server_if = "veth-srv"
        self.device_ip = f"{subnet}.1"
        self.server_ip = f"{subnet}.2"
        self._created: list[str] = []
        self.rate_mbit: float | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def create(self) -> NetnsLink:
        check_privileges()
        atexit.register(self.close)
        for ns in (self.device_ns, self.server_ns):
            if ns in _existing_namespaces():
                raise EmulationError(
                    f"network namespace {ns} already exists; remove it or choose another tag"
                )
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
        _run(
            ["ip", "link", "add", self.device_if, "netns", self.device_ns, "type", "veth",
             "peer", "name", self.server_if, "netns", self.server_ns]
        )  # fmt: skip
        for ns, dev, ip in (
            (self.device_ns, self.device_if, self.device_ip),
            (self.server_ns, self.server_if, self.server_ip),
        ):
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        logger.info(
            "namespaces %s and %s joined by %s/%s",
            self.device_ns,
            self.server_ns,
            self.device_if,
            self.server_if,
        )
        return self

    def close(self) -> None:
        """Delete the namespaces this object created (their veth ends and qdiscs go with them)."""
        while self._created:
            ns = self._created.pop()
            result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                logger.warning("could not delete namespace %s: %s", ns, result.stderr.strip())
        atexit.unregister(self.close)

    def __enter__(self) -> NetnsLink:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- shaping ------------------------------------------------------------------------

    def shape(self, mbit: float) -> None:
        """Limit both directions to ``mbit`` Mbit/s with a token bucket on each veth end."""
        rate_bytes = mbit * 1e6 / 8.0
        # A burst of 1 ms of traffic (at least two full frames): the bucket lets no more than
        # that through at line rate. The queue holds 1 s, so TCP sees delay, not loss.
        burst = max(3028, int(rate_bytes * 0.001))
        limit = max(256 * 1024, int(rate_bytes))
        for ns, dev in ((self.device_ns, self.device_if), (self.server_ns, self.server_if)):
            self._check_ours(ns)
            _run(
                ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", f"{mbit:g}mbit", "burst", str(burst), "limit", str(limit)]
            )  # fmt: skip
        self.rate_mbit = mbit
        logger.info("shaped %s <-> %s to %g Mbit/s (burst %d B)", self.device_ns, self.server_ns, mbit, burst)

    # -- processes ----------------------------------------------------------------------

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside one of this object's namespaces."""
        self._check_ours(ns)
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], text=True, **kwargs)

    def _check_ours(self, ns: str) -> None:
        if ns not in self._created:
            raise EmulationError(f"namespace {ns} was not created by this emulation; refusing to touch it")


def _existing_namespaces() -> set[str]:
    out = _run(["ip", "netns", "list"])
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EmulationError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.returncode}")
    return result.stdout
