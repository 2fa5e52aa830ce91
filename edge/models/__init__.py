"""The example models shipped with the package, and their held-out digits sample.

Built by ``tools/build_models.py``; nothing is downloaded at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, echo

__all__ = ["DEFAULT_MODEL", "DigitsSample", "digits_sample", "model_path", "names", "resolve"]

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "digits_resnet"


@dataclass(frozen=True, slots=True)
class DigitsSample:
    """Held-out handwritten digits: ``x`` int8 [n, 32, 32, 1] as the models take them, ``y`` labels."""

    x: np.ndarray
    y: np.ndarray
    x_float: np.ndarray


def names() -> list[str]:
    """The shipped models, by name."""
    return sorted(p.stem for p in HERE.glob("*.tflite"))


def model_path(name: str) -> Path:
    path = HERE / f"{name}.tflite"
    if not path.is_file():
        raise ModelFormatError(f"no shipped model named {name!r}; shipped: {', '.join(names()) or 'none'}")
    return path


def resolve(spec: str | Path) -> Path:
    """A model given as a path, or as the name of a shipped model."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix == "" and (HERE / f"{spec}.tflite").is_file():
        return HERE / f"{spec}.tflite"
    shown = str(spec) if str(spec).isprintable() else echo(str(spec))  # a newline must not split the line
    raise ModelFormatError(
        f"{shown}: no such file, and no shipped model by that name (shipped: {', '.join(names())})"
    )


def digits_sample() -> DigitsSample:
    with np.load(HERE / "digits_test.npz") as data:
        return DigitsSample(x=data["x"], y=data["y"], x_float=data["x_float"])
