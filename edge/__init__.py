"""Cooperative device-edge inference for quantized TFLite models."""

from __future__ import annotations

from .errors import EdgeError
from .graph import Cut, ModelGraph, TensorInfo, load_model
from .partition import Partition, split_model, write_split
from .runner import ModelRunner

__all__ = [
    "Cut",
    "EdgeError",
    "ModelGraph",
    "ModelRunner",
    "Partition",
    "TensorInfo",
    "load_model",
    "split_model",
    "write_split",
]

__version__ = "0.1.0"
