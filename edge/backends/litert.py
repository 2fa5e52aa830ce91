"""LiteRT (``ai-edge-litert``): the default backend."""

from __future__ import annotations

from typing import Any

from ..errors import BackendUnavailableError
from .base import InterpreterBackend

__all__ = ["LiteRTBackend"]


class LiteRTBackend(InterpreterBackend):
    key = "litert"

    def _load(self, model: bytes, threads: int) -> Any:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as err:
            raise BackendUnavailableError(
                "backend 'litert' needs the ai-edge-litert package: pip install ai-edge-litert"
            ) from err
        return Interpreter(model_content=model, num_threads=threads)
