"""The device's head profiles, measured once (:mod:`edge.measure`) and cached, and its codec profile.

Device profiles are cached as JSON under ``$EDGE_CACHE_DIR/profiles`` (default
``~/.cache/edge/profiles``), one file per model sha256, backend and thread count.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .fileio import write_atomic
from .measure import profile_heads
from .preprocess import random_inputs
from .runner import ModelRunner
from .wire import WireTensor
from .wire.encodings import CutEncoder

__all__ = ["HeadProfile", "cache_dir", "codec_profile", "load_or_profile", "profile_path"]

logger = logging.getLogger(__name__)

PROFILE_VERSION = 2


@dataclass(frozen=True, slots=True)
class HeadProfile:
    """Median head latency per cut on one device configuration."""

    model_sha256: str
    backend: str
    threads: int
    head_ms: tuple[float, ...]
    """One value per cut, 0..N."""
    runs: int
    warmup: int
    label: str = ""
    """Set when the device is emulated (for example a time-dilated runner)."""
    version: int = PROFILE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> HeadProfile:
        data = json.loads(text)
        data["head_ms"] = tuple(float(x) for x in data["head_ms"])
        return cls(**data)


def cache_dir() -> Path:
    """``$EDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/edge``, else ``~/.cache/edge``."""
    if os.environ.get("EDGE_CACHE_DIR"):
        return Path(os.environ["EDGE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "edge"
    return Path.home() / ".cache" / "edge"


def profile_path(
    sha256: str, backend: str, threads: int, *, label: str = "", root: Path | None = None
) -> Path:
    """Where the profile for one model, backend and thread count lives."""
    name = f"{sha256}-{backend}-{threads}" + (f"-{label}" if label else "")
    return (root if root is not None else cache_dir()) / "profiles" / f"{name}.json"


def load_or_profile(
    runner: ModelRunner,
    *,
    label: str = "",
    refresh: bool = False,
    runs: int = 9,
    warmup: int = 2,
    progress: bool = True,
    root: Path | None = None,
) -> HeadProfile:
    """The cached head profile for ``runner``'s model, backend and threads; measured and saved if missing."""
    graph = runner.graph
    path = profile_path(graph.sha256, runner.backend, runner.threads, label=label, root=root)
    if not refresh:
        cached = _read(path, graph.sha256, runner.backend, runner.threads, graph.num_operators + 1)
        if cached is not None:
            logger.info("head profile from %s", path)
            return cached
    head = profile_heads(runner, runs=runs, warmup=warmup, progress=progress)
    profile = HeadProfile(graph.sha256, runner.backend, runner.threads, tuple(head), runs, warmup, label)
    _write(path, profile.to_json())
    logger.info("head profile saved to %s", path)
    return profile


def _read(path: Path, sha256: str, backend: str, threads: int, cuts: int) -> HeadProfile | None:
    try:
        profile = HeadProfile.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as err:
        logger.warning("ignoring unreadable profile %s: %s", path, err)
        return None
    if (profile.version, profile.model_sha256, profile.backend, profile.threads, len(profile.head_ms)) != (
        PROFILE_VERSION,
        sha256,
        backend,
        threads,
        cuts,
    ):
        logger.warning("ignoring profile %s: it describes another model or configuration", path)
        return None
    return profile


def _write(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def codec_profile(
    runner: ModelRunner, codec: str, *, runs: int = 3, encoder: CutEncoder | None = None
) -> tuple[list[float], list[float]]:
    """For every cut 0..N, on the activations of a seeded input: the share of its bytes ``codec`` leaves
    (compressed over raw; 1.0 for a cut that sends nothing) and the median ms to compress and
    decompress them, which the planner adds to the cut's cost. A calibrated codec's ``encoder``
    encodes the cuts it has a codec for; the others go raw."""
    from .wire import decode, encode, encodings

    def pack(t: WireTensor, k: int) -> WireTensor:
        if encoder is None:
            return encodings.compress(t, codec)
        return encoder.compress(t, k, graph.sha256, _Everything())[0]  # what each request sends

    graph = runner.graph
    activations = runner.activations(random_inputs(graph, 0))
    ratios, times = [], []
    for cut in graph.cuts():
        tensors = [encode(t.name, activations[t.name]) for t in cut.tensors]
        raw = sum(t.nbytes for t in tensors)
        samples = []
        packed = tensors
        if encoder is not None:  # each table once, inline, so this process holds it
            for t in tensors:
                decode(encoder.compress(t, cut.index, graph.sha256, ())[0])
        for _ in range(runs):
            started = time.perf_counter()
            packed = [pack(t, cut.index) for t in tensors]
            for t in packed:
                decode(t)
            samples.append((time.perf_counter() - started) * 1000.0)
        ratios.append(sum(t.nbytes for t in packed) / raw if raw else 1.0)
        times.append(statistics.median(samples) if tensors else 0.0)
    return ratios, times


class _Everything:
    """A receiver that holds every codec table: frames name theirs by id."""

    def __contains__(self, item: object) -> bool:
        return True
