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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import BackendError, BackendUnavailableError, UnsupportedModelError
from ..graph import ModelGraph

__all__ = ["CUSTOM_OPS", "Support", "check_support", "model_operators", "require_runnable"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
    return sorted(graph.operator_names)


def check_support(graph: ModelGraph, backend: str) -> Support:
    """Whether ``backend`` can run ``graph``: loaded there when it is installed, else judged by the
    custom ops it registers."""
    from . import create_backend

    try:
        with create_backend(backend, graph.data):
            return _support(graph, backend, loaded=True)
    except BackendUnavailableError:
        return _support(graph, backend, loaded=None)
    except BackendError as err:
        return _support(graph, backend, loaded=False, refusal=err)


def require_runnable(graph: ModelGraph, backend: str, load: Callable[[], T] | None = None) -> T | None:
    """``load()``, the caller's own load of the whole model on ``backend`` (by default one made and
    closed here); when the backend refuses it, UnsupportedModelError in one line naming what it
    lacks: the device could never fall back, nor the server serve it."""
    from . import create_backend

    try:
        if load is None:
            create_backend(backend, graph.data).close()
            return None
        return load()
    except BackendUnavailableError:
        raise
    except BackendError as err:
        support = _support(graph, backend, loaded=False, refusal=err)
        raise UnsupportedModelError(f"{graph.source} cannot run on {backend}: {support.reason}") from err


def _support(
    graph: ModelGraph, backend: str, *, loaded: bool | None, refusal: BackendError | None = None
) -> Support:
    """What the custom-op table says, and what the backend's refusal names, as one Support."""
    known = CUSTOM_OPS.get(backend, frozenset())
    unsupported = [
        op for op in model_operators(graph) if op.startswith("CUSTOM:") and op[len("CUSTOM:") :] not in known
    ]
    reason = ""
    if refusal is not None:
        text = str(refusal)
        for pattern in _UNRESOLVED:
            for found in pattern.findall(text):
                name = found.rstrip(".")
                op = name if name.isupper() else f"CUSTOM:{name}"
                if op not in unsupported:
                    unsupported.append(op)
        reason = " ".join(text.split())[:_MAX_REASON]
    if unsupported:
        reason = f"{backend} has no kernel for {', '.join(unsupported)}"
    return Support(backend, tuple(unsupported), loaded, reason)
