"""Which operators of a model a backend cannot run, found before any request needs them.

Two sources, in this order of trust:
- **Loading.** When the backend's library is installed, the whole model is loaded on it, which
  resolves every operator and prepares every kernel (XNNPACK included). Whatever it refuses is
  named from its error.
- **The custom-op table.** Custom operators are resolved by name, and each runtime registers
  only a few; any other custom op is unsupported there. This is all that can be said of a
  backend that is not installed here: builtin operators it lacks show only when it loads.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from ..errors import BackendError, BackendUnavailableError, UnsupportedModelError
from ..graph import ModelGraph

__all__ = ["CUSTOM_OPS", "Support", "check_support", "model_operators", "require_runnable"]

logger = logging.getLogger(__name__)

CUSTOM_OPS: dict[str, frozenset[str]] = {
    # The builtin op resolver's custom ops; LiteRT's XNNPACK delegate also claims MediaPipe's
    # transposed convolution and pooling ops, which no kernel outside it implements.
    "litert": frozenset(
        {
            "TFLite_Detection_PostProcess",
            "Mfcc",
            "AudioSpectrogram",
            "Convolution2DTransposeBias",
            "MaxPoolingWithArgmax2D",
            "MaxUnpooling2D",
        }
    ),
    "tflite-runtime": frozenset({"TFLite_Detection_PostProcess", "Mfcc", "AudioSpectrogram"}),
}

_UNRESOLVED = (
    re.compile(r"unresolved custom op: ([\w./-]+)"),
    re.compile(r"find op for builtin opcode '([\w./-]+)'"),
    re.compile(r"find custom op for name '([\w./-]+)'"),
)
_MAX_REASON = 300


@dataclass(frozen=True, slots=True)
class Support:
    """What ``backend`` makes of a model."""

    backend: str
    unsupported: tuple[str, ...]
    """Operators it cannot run (``CUSTOM:name`` for custom ones)."""
    loaded: bool | None
    """True when the whole model loaded on it, False when loading failed, None when not tried
    (the backend is not installed here: only the custom-op table speaks)."""
    reason: str = ""
    """Why it cannot run the model, in one line ("" when it can)."""

    @property
    def runs(self) -> bool | None:
        """Whether the backend runs the whole model: None when that could not be tried here."""
        if self.unsupported or self.loaded is False:
            return False
        return self.loaded

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "runs": self.runs,
            "checked": "loaded" if self.loaded is not None else "custom-op table (not installed)",
            "unsupported": list(self.unsupported),
            "reason": self.reason or None,
        }


def model_operators(graph: ModelGraph) -> list[str]:
    """Every distinct operator of the model, in all its subgraphs."""
    from ..graph import opcode_name

    codes = graph.model.operatorCodes or []
    names = {opcode_name(codes[op.opcodeIndex]) for g in graph.model.subgraphs for op in g.operators or []}
    return sorted(names)


_CACHE: dict[tuple[str, str], Support] = {}
# Guards _CACHE (the dict only: loading happens outside it).
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64


def check_support(graph: ModelGraph, backend: str, *, load: bool = True) -> Support:
    """Whether ``backend`` can run ``graph``, loading it there when ``load`` and installed (the
    answer is kept per model and backend)."""
    key = (graph.sha256, backend)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None and (cached.loaded is not None or not load):
        return cached
    known = CUSTOM_OPS.get(backend, frozenset())
    unsupported = [
        op for op in model_operators(graph) if op.startswith("CUSTOM:") and op[len("CUSTOM:") :] not in known
    ]
    loaded: bool | None = None
    reason = ""
    if load:
        from . import create_backend

        try:
            with create_backend(backend, graph.data):
                loaded = True
        except BackendUnavailableError:
            loaded = None
        except BackendError as err:
            loaded = False
            text = str(err)
            for pattern in _UNRESOLVED:
                for found in pattern.findall(text):
                    name = found.rstrip(".")
                    op = name if name.isupper() else f"CUSTOM:{name}"
                    if op not in unsupported:
                        unsupported.append(op)
            reason = " ".join(text.split())[:_MAX_REASON]
    if unsupported:
        reason = f"{backend} has no kernel for {', '.join(unsupported)}"
    support = Support(backend, tuple(unsupported), loaded, reason)
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = support
    return support


def require_runnable(graph: ModelGraph, backend: str) -> None:
    """UnsupportedModelError, in one line, when ``backend`` cannot run the whole of ``graph``: the
    device could never fall back, nor the server serve it."""
    support = check_support(graph, backend)
    if support.runs is False:
        raise UnsupportedModelError(f"{graph.source} cannot run on {backend}: {support.reason}")
