"""Inference backends, one module each, chosen by key."""

from __future__ import annotations

from ..errors import BackendUnavailableError
from .base import Backend, TensorSpec
from .litert import LiteRTBackend
from .tflite_runtime import TFLiteRuntimeBackend

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "TensorSpec", "create_backend"]

BACKENDS: dict[str, type[Backend]] = {
    LiteRTBackend.key: LiteRTBackend,
    TFLiteRuntimeBackend.key: TFLiteRuntimeBackend,
}
DEFAULT_BACKEND = LiteRTBackend.key


def create_backend(key: str, model: bytes, *, threads: int = 1, batch: int = 1) -> Backend:
    """Load ``model`` (.tflite bytes) on the backend named ``key``; ``batch`` > 1 resizes every
    input's leading dimension to it (BackendError if the model does not batch)."""
    cls = BACKENDS.get(key)
    if cls is None:
        raise BackendUnavailableError(f"unknown backend {key!r}; choose one of: {', '.join(BACKENDS)}")
    return cls(model, threads=threads, batch=batch)  # type: ignore[call-arg]
