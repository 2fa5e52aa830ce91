"""Backends: the registry, clear errors, thread settings, and the stderr filter around interpreter creation."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from edge.backends import BACKENDS, create_backend
from edge.backends.base import _quiet_native_info
from edge.errors import BackendError, BackendUnavailableError, TensorFormatError
from edge.graph import ModelGraph
from helpers import seeded_inputs


def test_registry_keys() -> None:
    assert set(BACKENDS) == {"litert", "tflite-runtime"}


def test_unknown_backend_is_named() -> None:
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'onnx'.*litert"):
        create_backend("onnx", b"")


@pytest.mark.parametrize(
    ("key", "module", "message"),
    [
        ("tflite-runtime", "tflite_runtime", "backend 'tflite-runtime' needs the tflite-runtime package"),
        ("litert", "ai_edge_litert.interpreter", "backend 'litert' needs the ai-edge-litert package"),
    ],
)
def test_missing_library_is_reported_by_name(key: str, module: str, message: str) -> None:
    """Whatever is installed here: the library is hidden from the import system in a child process."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # makes any import of it fail\n"
        "from edge import models\n"
        "from edge.backends import create_backend\n"
        "from edge.errors import BackendUnavailableError\n"
        "data = models.model_path('digits_tiny').read_bytes()\n"
        "try:\n"
        f"    create_backend({key!r}, data)\n"
        "except BackendUnavailableError as err:\n"
        "    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(message), proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("threads", [2, 4])
def test_threads_do_not_change_results(graphs: dict[str, ModelGraph], threads: int) -> None:
    graph = graphs["digits_resnet"]
    feeds = seeded_inputs(graph, 0)
    with (
        create_backend("litert", graph.data, threads=1) as one,
        create_backend("litert", graph.data, threads=threads) as many,
    ):
        a, b = one.run(feeds), many.run(feeds)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_threads_and_bad_inputs(graphs: dict[str, ModelGraph]) -> None:
    graph = graphs["digits_tiny"]
    with pytest.raises(BackendError, match="threads"):
        create_backend("litert", graph.data, threads=0)
    with create_backend("litert", graph.data) as backend:
        name = graph.inputs[0].name
        with pytest.raises(TensorFormatError, match="missing input"):
            backend.run({})
        with pytest.raises(TensorFormatError, match="must be int8"):
            backend.run({name: np.zeros(graph.inputs[0].shape, np.float32)})


def test_stderr_filter_passes_other_output_through(capfd: pytest.CaptureFixture[str]) -> None:
    with _quiet_native_info():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"ERROR: something the runtime wants you to see\n")
    err = capfd.readouterr().err
    assert "something the runtime wants you to see" in err
    assert "XNNPACK" not in err


def test_a_kernel_error_is_this_calls_alone(backend: str) -> None:
    """The interpreter's error reporter keeps every earlier error: each refusal's text grew by the last
    one's (227 KB after 2,000), and one caller's error showed in the next one's message."""
    from model_builder import shape_tensor_model

    from edge.errors import BackendRunError
    from edge.graph import ModelGraph
    from edge.partition import split_model

    part = split_model(ModelGraph(shape_tensor_model()), 3)  # its tail reshapes to the shape it is sent
    messages = []
    with create_backend(backend, part.tail) as tail:
        for i in range(60):
            with pytest.raises(BackendRunError) as err:
                tail.run(
                    {"b": np.zeros((1, 4, 4, 2), np.float32), "s": np.array([1, 2, 3, 100 + i], np.int32)}
                )
            messages.append(str(err.value))
    assert max(len(m) for m in messages) <= len(messages[0]) + 8
    for i, message in enumerate(messages):
        assert str(6 * (100 + i)) in message and "\n" not in message
        assert i == 0 or str(6 * (100 + i - 1)) not in message, message
