"""tflite-runtime: the older interpreter, for devices LiteRT does not support. Needs numpy < 2."""

from __future__ import annotations

from typing import Any

from ..errors import BackendUnavailableError
from .base import InterpreterBackend

__all__ = ["TFLiteRuntimeBackend"]


class TFLiteRuntimeBackend(InterpreterBackend):
    key = "tflite-runtime"

    def _load(self, model: bytes, threads: int) -> Any:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as err:
            raise BackendUnavailableError(
                "backend 'tflite-runtime' needs the tflite-runtime package (with numpy < 2): "
                "pip install 'edge-coop[tflite-runtime]'"
            ) from err
        return Interpreter(model_content=model, num_threads=threads)
