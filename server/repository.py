"""The models a server holds: every ``DIR/*.tflite``, named after its file stem.

Policy for what is in the directory: the suffix is matched whatever its case; a symlink is
followed when it ends at a regular file inside the directory, and skipped otherwise; FIFOs,
devices and files over the size limit are skipped without being read; a file that fails to
load is skipped with one log line, and the others are served.
"""

from __future__ import annotations

import logging
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge.backends import DEFAULT_BACKEND
from edge.backends.support import require_runnable
from edge.errors import ConfigError, EdgeError, ModelFormatError, ModelNotFoundError, echo
from edge.graph import ModelGraph
from edge.runner import ModelRunner

__all__ = ["DEFAULT_MAX_MODEL_BYTES", "MODEL_SUFFIX", "ModelRepository", "ServedModel", "check_model_file"]

MODEL_SUFFIX = ".tflite"
"""Matched whatever its case: ``m.TFLITE`` is served as ``m``."""
DEFAULT_MAX_MODEL_BYTES = 1024 * 1024 * 1024

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ServedModel:
    """One served model: its graph, and a runner holding its whole form and cached tails."""

    name: str
    graph: ModelGraph
    runner: ModelRunner


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What a model file was when it was loaded: a changed stamp means a changed file."""

    path: Path
    mtime_ns: int
    size: int


@dataclass(frozen=True, slots=True)
class _LoadOptions:
    """How a directory's models are loaded, for every scan."""

    backend: str
    threads: int
    cache_size: int
    replicas: int
    max_model_bytes: int


class ModelRepository:
    """Named models, loaded up front so the first request does not pay for parsing.

    A repository made from a directory can :meth:`refresh` itself: a model copied in is loaded,
    a removed one stops being served, and a replaced one is loaded beside the old and swapped in
    whole; requests already holding the old one finish on it, and it is closed at the next refresh.
    """

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self._models = models
        self._stamps: dict[str, _Stamp] = {}
        self._failed: dict[Path, tuple[int, int, str]] = {}
        """Files that failed to load, by (mtime, size), with why in one bounded line: not tried, nor
        logged, again until they change."""
        self._retired: list[ServedModel] = []
        self._unloaded: set[str] = set()
        """Names unloaded on request: not loaded again by a scan until loaded on request."""
        self._root: Path | None = None
        self._options: _LoadOptions | None = None
        # Guards the swap of _models (readers take the dict as it is: each swap is one assignment).
        self._lock = threading.Lock()

    @classmethod
    def from_directory(
        cls,
        directory: str | Path,
        *,
        backend: str = DEFAULT_BACKEND,
        threads: int = 1,
        cache_size: int = 16,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        replicas: int = 1,
    ) -> ModelRepository:
        """Every model file in ``directory`` that passes :func:`check_model_file`; the others are
        skipped with one log line each. Refuses to start with none."""
        root = Path(directory)
        if not root.is_dir():
            raise ConfigError(f"model directory {root} does not exist or is not a directory")
        repository = cls({})
        repository._root = root
        repository._options = _LoadOptions(backend, threads, cache_size, replicas, max_model_bytes)
        skipped = repository._scan()
        if not repository._models:
            found = (
                f"; skipped {'; '.join(skipped[:3])}" + (" …" if len(skipped) > 3 else "") if skipped else ""
            )
            raise ConfigError(f"model directory {root} holds no servable .tflite file{found}")
        return repository

    def refresh(self) -> list[str]:
        """Look at the directory again; returns the names added, replaced or removed."""
        if self._root is None:
            return []
        with self._lock:
            retired, self._retired = self._retired, []
        for model in retired:
            model.runner.close()
        before = dict(self._stamps)
        self._scan()
        return sorted(n for n in set(before) | set(self._stamps) if before.get(n) != self._stamps.get(n))

    def index(self) -> list[tuple[str, str, str]]:
        """(name, state, reason) of every model this repository knows: READY when served,
        UNAVAILABLE when unloaded or when its file failed to load."""
        rows = [(m.name, "READY", "") for m in self]
        rows += [(name, "UNAVAILABLE", "unloaded") for name in sorted(self._unloaded)]
        rows += [
            (path.stem, "UNAVAILABLE", f"the file failed to load: {why}")
            for path, (_, _, why) in sorted(self._failed.items())
        ]
        return sorted(rows)

    def unload(self, name: str) -> None:
        """Stop serving ``name``; requests already holding it finish on it."""
        with self._lock:
            if name not in self._models:
                raise ModelNotFoundError(f"model {echo(name)} is not served here")
            models = dict(self._models)
            self._retired.append(models.pop(name))
            self._models = models
            self._unloaded.add(name)
        logger.info("unloaded %s", name)

    def load(self, name: str) -> None:
        """Serve ``name`` from its file (again, after an unload, or newly copied in); other changes in
        the directory are taken too, as a :meth:`refresh` would."""
        if self._root is None:
            raise ConfigError("this repository was made from files, not a directory: nothing to load from")
        with self._lock:
            self._unloaded.discard(name)
        self._scan()
        if name not in self._models:
            raise ModelNotFoundError(f"no loadable {echo(name)}.tflite in the model directory")

    def _scan(self) -> list[str]:
        assert self._root is not None and self._options is not None
        root, options = self._root, self._options
        try:
            candidates = sorted(p for p in root.iterdir() if p.suffix.lower() == MODEL_SUFFIX)
        except OSError as err:
            logger.error("cannot list %s: %s", root, err.strerror or err)
            return []
        models = dict(self._models)
        stamps: dict[str, _Stamp] = {}
        skipped: list[str] = []
        retired: list[ServedModel] = []
        failed: dict[Path, tuple[int, int, str]] = {}
        for path in candidates:
            name = path.stem
            if name in self._unloaded:
                continue
            try:
                seen = path.lstat()
                known = self._failed.get(path)
                if known is not None and known[:2] == (seen.st_mtime_ns, seen.st_size):
                    failed[path] = known
                    if name in self._stamps and name in models:
                        stamps[name] = self._stamps[name]
                    continue
            except OSError:
                pass
            try:
                if name in stamps:
                    raise ConfigError(f"{path.name}: another file already serves the name {name!r}")
                check_model_file(path, root, options.max_model_bytes)
                info = path.stat()
                stamp = _Stamp(path, info.st_mtime_ns, info.st_size)
                if self._stamps.get(name) == stamp and name in models:
                    stamps[name] = stamp
                    continue
                loaded = _load(
                    path,
                    backend=options.backend,
                    threads=options.threads,
                    cache_size=options.cache_size,
                    replicas=options.replicas,
                )
            except EdgeError as err:
                logger.warning("skipping %s: %s", path.name, err)
                skipped.append(f"{path.name} ({err})")
                try:
                    seen = path.lstat()
                    failed[path] = (seen.st_mtime_ns, seen.st_size, " ".join(str(err).split())[:_MAX_REASON])
                except OSError:
                    pass
                if name in self._stamps and name in models:
                    stamps[name] = self._stamps[name]  # a bad replacement: keep serving what was there
                continue
            if name in models:
                retired.append(models[name])
                logger.info("replaced %s", name)
            models[name] = loaded
            stamps[name] = stamp
        for name in [n for n in models if n not in stamps]:
            retired.append(models.pop(name))
            logger.info("stopped serving %s: its file is gone", name)
        with self._lock:
            self._models, self._stamps, self._failed = models, stamps, failed
            self._retired.extend(retired)
        return skipped

    @classmethod
    def from_files(
        cls,
        paths: list[Path],
        *,
        backend: str = DEFAULT_BACKEND,
        threads: int = 1,
        cache_size: int = 16,
        replicas: int = 1,
    ) -> ModelRepository:
        return cls(
            {
                Path(path).stem: _load(
                    Path(path), backend=backend, threads=threads, cache_size=cache_size, replicas=replicas
                )
                for path in paths
            }
        )

    def find(self, name: str) -> ServedModel | None:
        """The model served under ``name``, or None."""
        return self._models.get(name)

    def get(self, name: str) -> ServedModel:
        model = self.find(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"model {echo(name)} is not served here (served: {known})")
        return model

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()) + self._retired, {}
            self._retired = []
        for model in models:
            model.runner.close()


def check_model_file(path: Path, root: Path, max_bytes: int) -> None:
    """What the server opens as a model: a regular file (not a FIFO or a device, which would hang or
    never end), inside ``root`` once symlinks are followed, at most ``max_bytes`` long, with the
    TFLite identifier in its header. Checked before the file is read whole."""
    try:
        resolved = path.resolve(strict=True)
        info = resolved.stat()
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"cannot open: {getattr(err, 'strerror', None) or err}") from err
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError("not a regular file")
    if not resolved.is_relative_to(root.resolve()):
        raise ConfigError(f"a link to {resolved}, outside the model directory")
    if info.st_size > max_bytes:
        raise ConfigError(f"{info.st_size:,} bytes; the limit is {max_bytes:,} (--max-model-bytes)")
    try:
        with resolved.open("rb") as f:
            header = f.read(8)
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror or err}") from err
    if len(header) < 8 or header[4:8] != b"TFL3":
        raise ModelFormatError("not a TFLite flatbuffer (no TFL3 identifier in its header)")


_MAX_REASON = 300


def _load(path: Path, *, backend: str, threads: int, cache_size: int, replicas: int = 1) -> ServedModel:
    graph = ModelGraph.from_file(path)
    runner = ModelRunner(graph, backend=backend, threads=threads, cache_size=cache_size, replicas=replicas)
    try:
        # The whole model loaded now: a broken file fails at start, not mid-request, in one line.
        require_runnable(graph, backend, lambda: runner.warm(0))
    except BaseException:
        runner.close()
        raise
    logger.info("serving %s (%d operators, sha256 %s)", path.stem, graph.num_operators, graph.sha256[:12])
    return ServedModel(name=path.stem, graph=graph, runner=runner)
