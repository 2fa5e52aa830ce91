"""The deployment files: what ``edge export mlserver`` writes, and the KServe manifests.

Covered: the manifests parse, name each other (runtime, model format, ports, protocol) and carry
the Prometheus annotations; the exported settings name the runtime class, which exists and is an
``mlserver.MLModel`` in MLServer's venv; the exported ports are the ones the manifests open; a
second export into the same directory adds its models' extensions; bad cuts are refused.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from edge import models, wire
from edge.errors import ConfigError
from edge.graph import ModelGraph
from edge.wire import packed
from helpers import MLSERVER, REPO
from server.export import RUNTIME, write_mlserver

KSERVE = REPO / "firmware_config" / "kserve"


def _load(name: str) -> dict:
    (document,) = list(yaml.safe_load_all((KSERVE / name).read_text()))
    return document


def test_the_kserve_manifests_parse_and_name_each_other(tmp_path: Path) -> None:
    runtime = _load("servingruntime.yaml")
    service = _load("inferenceservice.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    spec = runtime["spec"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]
    (container,) = spec["containers"]
    assert container["command"] == ["mlserver", "start", "/mnt/models"]
    write_mlserver(ModelGraph.from_file(models.model_path("digits_resnet")), tmp_path)
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert [p["containerPort"] for p in container["ports"]] == [settings["grpc_port"]]
    assert [p["containerPort"] for p in model["ports"]] == [settings["grpc_port"]]
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(settings["metrics_port"])
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"


def test_the_exported_runtime_class_exists_in_mlservers_venv(tmp_path: Path) -> None:
    write_mlserver(ModelGraph.from_file(models.model_path("digits_resnet")), tmp_path, cuts=[8])
    for path in tmp_path.glob("*/model-settings.json"):
        assert json.loads(path.read_text())["implementation"] == RUNTIME
    module, _, name = RUNTIME.rpartition(".")
    python = MLSERVER.parent / "python"
    check = f"import mlserver, {module} as m; assert issubclass(m.{name}, mlserver.MLModel); print('ok')"
    out = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_exports_into_one_directory_add_up(tmp_path: Path) -> None:
    write_mlserver(ModelGraph.from_file(models.model_path("digits_resnet")), tmp_path, cuts=[8, 12])
    write_mlserver(ModelGraph.from_file(models.model_path("digits_tiny")), tmp_path, cuts=[2])
    extensions = json.loads((tmp_path / "settings.json").read_text())["extensions"]
    assert extensions == [
        *wire.EXTENSIONS,
        packed.EXTENSION,
        f"{wire.CUT_MODEL_PREFIX}digits_resnet@8",
        f"{wire.CUT_MODEL_PREFIX}digits_resnet@12",
        f"{wire.CUT_MODEL_PREFIX}digits_tiny@2",
    ]
    names = sorted(json.loads(p.read_text())["name"] for p in tmp_path.glob("*/model-settings.json"))
    assert names == ["digits_resnet", "digits_resnet@12", "digits_resnet@8", "digits_tiny", "digits_tiny@2"]


@pytest.mark.parametrize("cut", [-1, 17, 99])
def test_a_cut_that_sends_nothing_or_does_not_exist_is_refused(tmp_path: Path, cut: int) -> None:
    with pytest.raises(ConfigError, match=r"cuts must be 0\.\.16"):
        write_mlserver(ModelGraph.from_file(models.model_path("digits_resnet")), tmp_path, cuts=[cut])
