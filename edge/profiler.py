"""Measure how long each half of every cut takes on this machine, and cache the result.

The device profiles heads (:func:`profile_heads`), the server tails (:func:`profile_tails`).
Each cut gets ``warmup`` unmeasured runs, then the median of ``runs`` measured ones; the
first runs also build the half, so building is never measured. All cuts are measured in
``passes`` sweeps and each keeps its smallest median: a burst of load from elsewhere on the
machine inflates one sweep's few cuts, not the profile. By definition the head at K = 0 and
the tail at K = N cost nothing, and the head at K = N is the whole model.

Device profiles are cached as JSON under ``$EDGE_CACHE_DIR/profiles`` (default
``~/.cache/edge/profiles``), one file per model sha256, backend and thread count.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .graph import TensorInfo
from .runner import ModelRunner

__all__ = [
    "HeadProfile",
    "cache_dir",
    "load_or_profile",
    "profile_heads",
    "profile_path",
    "profile_tails",
    "random_tensors",
]

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1


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


def random_tensors(tensors: Iterable[TensorInfo], seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random array for each tensor, in its dtype and shape."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in tensors:
        if np.issubdtype(t.dtype, np.integer):
            info = np.iinfo(t.dtype)
            out[t.name] = rng.integers(info.min, info.max, size=t.shape, endpoint=True).astype(t.dtype)
        elif t.dtype == np.bool_:
            out[t.name] = rng.integers(0, 1, size=t.shape, endpoint=True).astype(np.bool_)
        else:
            out[t.name] = rng.random(t.shape).astype(t.dtype)
    return out


def _median_ms(call: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000.0)
    return float(statistics.median(samples))


def profile_heads(
    runner: ModelRunner,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    runs: int = 11,
    warmup: int = 2,
    passes: int = 2,
    progress: bool = True,
) -> list[float]:
    """Median head latency (ms) at every cut 0..N, measured with ``runner``'s backend and threads."""
    graph = runner.graph
    feeds = feeds if feeds is not None else random_tensors(graph.inputs, seed=0)
    n = graph.num_operators
    jobs: Iterable[int] = [k for _ in range(passes) for k in range(1, n + 1)]
    if progress:
        from rich.console import Console
        from rich.progress import track

        jobs = track(jobs, description="profiling heads", transient=True, console=Console(stderr=True))
    head = [0.0] + [float("inf")] * n
    for k in jobs:
        head[k] = min(head[k], _median_ms(lambda k=k: runner.run_head(k, feeds), runs, warmup))  # type: ignore[misc]
    logger.info("profiled %d heads of %s: whole model %.3f ms", n, graph.source, head[n])
    return head


def profile_tails(
    runner: ModelRunner, *, runs: int = 11, warmup: int = 2, passes: int = 2, seed: int = 0
) -> list[float]:
    """Median tail latency (ms) at every cut 0..N, on seeded random cut tensors."""
    graph = runner.graph
    n = graph.num_operators
    tail = [0.0] * (n + 1)
    cuts = [k for k in range(n) if graph.cut(k).tail_outputs]
    feeds = {k: random_tensors(graph.cut(k).tensors, seed=seed + k) for k in cuts}
    for k in cuts:
        tail[k] = float("inf")
    for k in [k for _ in range(passes) for k in cuts]:
        median = _median_ms(lambda k=k: runner.run_tail(k, feeds[k]), runs, warmup)  # type: ignore[misc]
        tail[k] = min(tail[k], median)
    logger.info("profiled %d tails of %s: whole model %.3f ms", n, graph.source, tail[0])
    return tail


def load_or_profile(
    runner: ModelRunner,
    *,
    label: str = "",
    refresh: bool = False,
    runs: int = 11,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
