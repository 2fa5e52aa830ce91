"""The interface every inference backend implements: load a model, run it, close it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from ..errors import BackendError, BackendRunError, TensorFormatError

__all__ = ["Backend", "InterpreterBackend", "TensorSpec"]

_MAX_ERROR_CHARS = 500
"""The most of a kernel's error text an error carries."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output of a loaded model, as the interpreter reports it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float = 0.0
    zero_point: int = 0


class Backend(ABC):
    """A loaded model that runs on one interpreter. Safe to call from several threads."""

    key: ClassVar[str]

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on ``feeds`` (keyed by input tensor name); outputs keyed by tensor name."""

    @abstractmethod
    def close(self) -> None:
        """Release the interpreter."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class InterpreterBackend(Backend):
    """A backend built on a TFLite-style ``Interpreter`` class (LiteRT and tflite-runtime share one API)."""

    def __init__(self, model: bytes, *, threads: int = 1, batch: int = 1) -> None:
        if threads < 1:
            raise BackendError(f"threads must be at least 1, not {threads}")
        self.threads = threads
        try:
            with _quiet_native_info():
                self._interpreter = self._load(model, threads)
                if batch > 1:
                    _resize_batch(self._interpreter, batch)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise BackendError(f"{self.key} could not load the model: {err}") from err
        self.inputs = tuple(_spec(d) for d in self._interpreter.get_input_details())
        self.outputs = tuple(_spec(d) for d in self._interpreter.get_output_details())
        self._input_index = {d["name"]: d["index"] for d in self._interpreter.get_input_details()}
        self._output_index = [(d["name"], d["index"]) for d in self._interpreter.get_output_details()]
        self._specs = {s.name: s for s in self.inputs}
        if batch > 1 and any(s.shape[:1] != (batch,) for s in self.outputs):
            raise BackendError(
                f"the model does not batch: its outputs are {[list(s.shape) for s in self.outputs]}"
            )
        # Guards the interpreter (its input and output tensors are shared between set, invoke and get)
        # and _errors_seen.
        self._lock = threading.Lock()
        self._errors_seen = ""

    @abstractmethod
    def _load(self, model: bytes, threads: int) -> Any:
        """Create the interpreter."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check(feeds)
        with self._lock:
            try:
                for name, index in self._input_index.items():
                    self._interpreter.set_tensor(index, feeds[name])
                self._interpreter.invoke()
                return {name: self._interpreter.get_tensor(index) for name, index in self._output_index}
            except (ValueError, RuntimeError) as err:
                raise BackendRunError(
                    f"{self.key} failed to run the model on these inputs: {self._this_call(str(err))}"
                ) from err

    def _this_call(self, text: str) -> str:
        """This call's error alone, bounded. The interpreter's error reporter never clears its buffer,
        so each failure's text holds every earlier one (227 KB after 2,000 refusals, and one caller's
        error in the next caller's message). Called with the lock held."""
        seen = self._errors_seen
        self._errors_seen = text
        if seen and text.startswith(seen):
            text = text[len(seen) :]
        text = " ".join(text.split())
        return text if len(text) <= _MAX_ERROR_CHARS else f"{text[: _MAX_ERROR_CHARS - 1]}…"

    def close(self) -> None:
        self._interpreter = None

    def _check(self, feeds: Mapping[str, np.ndarray]) -> None:
        missing = [name for name in self._specs if name not in feeds]
        if missing:
            raise TensorFormatError(f"missing input tensor(s): {', '.join(missing)}")
        for name, array in feeds.items():
            spec = self._specs.get(name)
            if spec is None:
                raise TensorFormatError(
                    f"unexpected input tensor {name!r}; the model takes {list(self._specs)}"
                )
            if array.dtype != spec.dtype or tuple(array.shape) != spec.shape:
                raise TensorFormatError(
                    f"input {name!r} must be {spec.dtype.name}{list(spec.shape)}, "
                    f"got {array.dtype.name}{list(array.shape)}"
                )


def _resize_batch(interpreter: Any, batch: int) -> None:
    """Every input's leading dimension (1) becomes ``batch``; a model whose inputs are not [1, ...] does not batch."""
    for detail in interpreter.get_input_details():
        shape = [int(d) for d in detail["shape"]]
        if not shape or shape[0] != 1:
            raise BackendError(f"the model does not batch: input {detail['name']!r} has shape {shape}")
        interpreter.resize_tensor_input(detail["index"], [batch, *shape[1:]], strict=False)


# The native runtime prints this to fd 2 for every interpreter it creates.
_NATIVE_NOISE = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)
# Guards the process-wide redirection of fd 2 below.
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_native_info() -> Iterator[None]:
    """Hold back the runtime's per-interpreter INFO line; pass anything else it prints through to stderr."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().splitlines(keepends=True)
                if line.strip() not in _NATIVE_NOISE
            ]
            if kept:
                os.write(2, b"".join(kept))


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        name=detail["name"],
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )
