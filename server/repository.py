"""The models a server holds: every ``DIR/*.tflite``, named after its file stem."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge.backends import DEFAULT_BACKEND
from edge.errors import ConfigError, ModelNotFoundError, echo
from edge.graph import ModelGraph
from edge.runner import ModelRunner

__all__ = ["ModelRepository", "ServedModel"]

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
        cls, directory: str | Path, *, backend: str = DEFAULT_BACKEND, threads: int = 1, cache_size: int = 16
    ) -> ModelRepository:
        root = Path(directory)
        if not root.is_dir():
            raise ConfigError(f"model directory {root} does not exist or is not a directory")
        paths = sorted(root.glob("*.tflite"))
        if not paths:
            raise ConfigError(f"model directory {root} holds no .tflite files")
        return cls.from_files(paths, backend=backend, threads=threads, cache_size=cache_size)

    @classmethod
    def from_files(
        cls, paths: list[Path], *, backend: str = DEFAULT_BACKEND, threads: int = 1, cache_size: int = 16
    ) -> ModelRepository:
        models = {}
        for path in paths:
            graph = ModelGraph.from_file(path)
            runner = ModelRunner(graph, backend=backend, threads=threads, cache_size=cache_size)
            runner.warm(0)  # load the whole model now: a broken file fails at start, not mid-request
            models[path.stem] = ServedModel(name=path.stem, graph=graph, runner=runner)
            logger.info(
                "serving %s (%d operators, sha256 %s)", path.stem, graph.num_operators, graph.sha256[:12]
            )
        return cls(models)

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
