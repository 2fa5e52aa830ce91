"""The models a server holds: every ``DIR/*.tflite``, named after its file stem.

Policy for what is in the directory: the suffix is matched whatever its case; a symlink is
followed when it ends at a regular file inside the directory, and skipped otherwise; FIFOs,
devices and files over the size limit are skipped without being read; a file that fails to
load is skipped with one log line, and the others are served.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge.backends import DEFAULT_BACKEND
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


class ModelRepository:
    """Named models, loaded up front so the first request does not pay for parsing."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self._models = models

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
        candidates = sorted(p for p in root.iterdir() if p.suffix.lower() == MODEL_SUFFIX)
        models: dict[str, ServedModel] = {}
        skipped: list[str] = []
        for path in candidates:
            try:
                check_model_file(path, root, max_model_bytes)
                if path.stem in models:
                    raise ConfigError(f"{path.name}: another file already serves the name {path.stem!r}")
                models[path.stem] = _load(
                    path, backend=backend, threads=threads, cache_size=cache_size, replicas=replicas
                )
            except EdgeError as err:
                logger.warning("skipping %s: %s", path.name, err)
                skipped.append(f"{path.name} ({err})")
        if not models:
            found = (
                f"; skipped {'; '.join(skipped[:3])}" + (" …" if len(skipped) > 3 else "") if skipped else ""
            )
            raise ConfigError(f"model directory {root} holds no servable .tflite file{found}")
        return cls(models)

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

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"model {echo(name)} is not served here (served: {known})")
        return model

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def close(self) -> None:
        for model in self._models.values():
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


def _load(path: Path, *, backend: str, threads: int, cache_size: int, replicas: int = 1) -> ServedModel:
    graph = ModelGraph.from_file(path)
    runner = ModelRunner(graph, backend=backend, threads=threads, cache_size=cache_size, replicas=replicas)
    try:
        runner.warm(0)  # load the whole model now: a broken file fails at start, not mid-request
    except BaseException:
        runner.close()
        raise
    logger.info("serving %s (%d operators, sha256 %s)", path.stem, graph.num_operators, graph.sha256[:12])
    return ServedModel(name=path.stem, graph=graph, runner=runner)
