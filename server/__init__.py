"""The edge server: runs whole models and tails over the Open Inference Protocol."""

__version__ = "0.1.0"
