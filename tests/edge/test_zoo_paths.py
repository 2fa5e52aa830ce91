"""The zoo through everything that runs a model: a real server at every cut, the planner, inspect,
the repository, and a device whose backend refuses a half.

Covered: every cut of every runnable zoo model through a real in-process edge-server (outputs equal
the whole model's, bit for bit); `edge plan` on each; `edge inspect` naming the operators a
backend lacks, in text and JSON; `edge infer` and the server refusing a model whose whole cannot
run; a device whose backend cannot build heads (or tails) finishing on the whole model, flagged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.backends import BACKENDS
from edge.backends.litert import LiteRTBackend
from edge.cooperative import CooperativeRunner
from edge.errors import ConfigError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import REPO, ZOO_DIR, ZOO_RUNNABLE, seeded_inputs
from server.embedded import BackgroundServer
from server.repository import ModelRepository

RUNS = ZOO_RUNNABLE


def _edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def server() -> BackgroundServer:
    with BackgroundServer.from_files([ZOO_DIR / f"{name}.tflite" for name in RUNS], workers=1) as srv:
        yield srv


@pytest.mark.parametrize("name", RUNS)
def test_every_cut_through_a_server(name: str, server: BackgroundServer) -> None:
    graph = ModelGraph.from_file(ZOO_DIR / f"{name}.tflite")
    feeds = seeded_inputs(graph, 3)
    with ModelRunner(graph) as local:
        want = local.run(feeds)
    client = TailClient(server.address, timeout_s=10)
    with CooperativeRunner(ModelRunner(graph), client, model_name=name, policy=0) as device:
        for k in range(1, graph.num_operators):
            device.policy = type(device.policy)(k)
            result = device.infer(feeds)
            assert not result.fallback, f"{name} cut {k}: {result.fallback_reason}"
            assert result.offloaded or not graph.cut(k).tail_outputs
            for out, array in want.items():
                assert np.array_equal(result.outputs[out], array), f"{name} cut {k}: {out} differs"


@pytest.mark.parametrize("name", RUNS)
def test_plan_succeeds(name: str, tmp_path: Path) -> None:
    env = {"EDGE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = _edge("plan", str(ZOO_DIR / f"{name}.tflite"), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "choice" in json.loads(proc.stdout)


def test_inspect_names_what_a_backend_lacks() -> None:
    path = str(ZOO_DIR / "unknown_custom_op.tflite")
    proc = _edge("inspect", path, "--json")
    assert proc.returncode == 0, proc.stderr
    backends = {b["backend"]: b for b in json.loads(proc.stdout)["backends"]}
    assert set(backends) == set(BACKENDS)
    for entry in backends.values():
        assert entry["runs"] is False and entry["unsupported"] == ["CUSTOM:EdgeZooSoftArgmax"]
    text = _edge("inspect", path)
    assert text.returncode == 0
    assert "backend litert: cannot run it: litert has no kernel for CUSTOM:EdgeZooSoftArgmax" in " ".join(
        text.stdout.split()
    )
    fine = json.loads(_edge("inspect", str(ZOO_DIR / "ssd_detector.tflite"), "--json").stdout)
    assert {b["backend"]: b["unsupported"] for b in fine["backends"]} == {k: [] for k in BACKENDS}


def test_infer_refuses_a_model_the_device_cannot_run(tmp_path: Path) -> None:
    sample = tmp_path / "x.npy"
    np.save(sample, np.zeros((1, 16, 16, 3), np.float32))
    proc = _edge("infer", "--model", str(ZOO_DIR / "unknown_custom_op.tflite"), "--input", str(sample))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no kernel for CUSTOM:EdgeZooSoftArgmax" in lines[0], proc.stderr


def test_the_repository_lists_an_unrunnable_model_with_its_reason(tmp_path: Path) -> None:
    for name in ("unknown_custom_op", "fp16_weights"):
        (tmp_path / f"{name}.tflite").write_bytes((ZOO_DIR / f"{name}.tflite").read_bytes())
    repo = ModelRepository.from_directory(tmp_path)
    rows = {name: (state, reason) for name, state, reason in repo.index()}
    assert rows["fp16_weights"] == ("READY", "")
    state, reason = rows["unknown_custom_op"]
    assert (
        state == "UNAVAILABLE" and "no kernel for CUSTOM:EdgeZooSoftArgmax" in reason and "\n" not in reason
    )
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "m.tflite").write_bytes((ZOO_DIR / "unknown_custom_op.tflite").read_bytes())
    with pytest.raises(ConfigError, match="EdgeZooSoftArgmax"):
        ModelRepository.from_directory(only_bad)


class _WholeOnly(LiteRTBackend):
    """LiteRT that refuses to build anything but the whole model, as a device backend may refuse a
    half it cannot set up (XNNPACK set-up failing, a kernel missing): the halves fail, the model runs."""

    key = "litert-whole-only"
    whole = b""
    final: frozenset[str] = frozenset()
    refuse = "head"

    def _load(self, model: bytes, threads: int) -> object:
        interpreter = super()._load(model, threads)
        if model != self.whole:
            outputs = {d["name"] for d in interpreter.get_output_details()}
            is_head = bool(outputs - self.final)
            if (self.refuse == "head") == is_head:
                raise RuntimeError(f"failed to set up the {self.refuse} (refused for this test)")
        return interpreter


@pytest.fixture()
def refusing(monkeypatch: pytest.MonkeyPatch) -> type[_WholeOnly]:
    monkeypatch.setitem(BACKENDS, _WholeOnly.key, _WholeOnly)
    return _WholeOnly


@pytest.mark.parametrize("refuse", ["head", "tail"])
def test_a_half_the_device_cannot_build_falls_back_to_the_whole_model(
    refuse: str, refusing: type[_WholeOnly], server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = ModelGraph.from_file(ZOO_DIR / "fp16_weights.tflite")
    monkeypatch.setattr(refusing, "whole", graph.data)
    monkeypatch.setattr(refusing, "final", frozenset(t.name for t in graph.outputs))
    monkeypatch.setattr(refusing, "refuse", refuse)
    feeds = seeded_inputs(graph, 4)
    with ModelRunner(graph) as local:
        want = local.run(feeds)
    k = graph.num_operators // 2
    # A tail is built only after the server failed: a dead address makes the device finish it.
    address = server.address if refuse == "head" else "127.0.0.1:9"
    client = TailClient(address, timeout_s=5)
    runner = ModelRunner(graph, backend=refusing.key)
    with CooperativeRunner(runner, client, model_name="fp16_weights", policy=k) as device:
        for _ in range(2):  # the second time the broken half is known and not built again
            result = device.infer(feeds)
            assert result.fallback and not result.offloaded
            assert result.broken_cut == (refuse == "head")
            for name, array in want.items():
                assert np.array_equal(result.outputs[name], array)
    assert runner.half_loads == (1 if refuse == "head" else 2)


def test_a_model_whose_tensor_name_is_not_text_is_skipped_and_the_rest_served(tmp_path: Path) -> None:
    """It took the server down at start (a traceback) and froze the live repository."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edge import models

    model = flatbuffer_utils.read_model_from_bytearray(
        bytearray(models.model_path("digits_tiny").read_bytes())
    )
    model.subgraphs[0].tensors[3].name = b"bad\xff\xfename"
    (tmp_path / "binary.tflite").write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    (tmp_path / "digits_tiny.tflite").write_bytes(models.model_path("digits_tiny").read_bytes())
    repo = ModelRepository.from_directory(tmp_path)
    rows = {name: (state, reason) for name, state, reason in repo.index()}
    assert rows["digits_tiny"] == ("READY", "")
    assert rows["binary"][0] == "UNAVAILABLE" and "not valid UTF-8" in rows["binary"][1]
    repo.close()


def test_the_daemons_check_refuses_a_model_its_backend_cannot_run(tmp_path: Path) -> None:
    """Its fallback could never run: refused before any message is taken, in one line."""
    profile = tmp_path / "p.toml"
    text = (REPO / "firmware_config" / "generic-x86.toml").read_text()
    assert 'path = "digits_resnet"' in text
    profile.write_text(
        text.replace('path = "digits_resnet"', f'path = "{ZOO_DIR / "unknown_custom_op.tflite"}"')
    )
    proc = _edge("run", "--config", str(profile), "--check")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot run on litert" in lines[0] and "CUSTOM:EdgeZooSoftArgmax" in lines[0]
