"""Inference backends, one module each, chosen by key."""

from __future__ import annotations

from typing import Literal

from ..errors import BackendUnavailableError
from .base import Backend, TensorSpec
from .litert import LiteRTBackend
from .tflite_runtime import TFLiteRuntimeBackend

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "BackendName", "TensorSpec", "create_backend"]

BackendName = Literal["litert", "tflite-runtime"]
"""The backends' keys: the settings of both sides take their choices from it."""
BACKENDS: dict[BackendName, type[Backend]] = {
    "litert": LiteRTBackend,
    "tflite-runtime": TFLiteRuntimeBackend,
}
DEFAULT_BACKEND: BackendName = "litert"


def create_backend(key: str, model: bytes, *, threads: int = 1, batch: int = 1) -> Backend:
    """Load ``model`` (.tflite bytes) on the backend named ``key``; ``batch`` > 1 resizes every
    input's leading dimension to it (BackendError if the model does not batch)."""
    for name, cls in BACKENDS.items():
        if name == key:
            return cls(model, threads=threads, batch=batch)  # type: ignore[call-arg]
    raise BackendUnavailableError(f"unknown backend {key!r}; choose one of: {', '.join(BACKENDS)}")
