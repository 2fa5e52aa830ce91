"""The OIP model repository extension, through tritonclient against a real server.

Covered: RepositoryIndex lists the served models as READY, and unloaded or broken ones as
UNAVAILABLE with a reason; without --model-control, load and unload are FAILED_PRECONDITION; with
it, an unloaded model is refused (and a directory scan does not bring it back) until it is loaded
again, and a model copied in is served on a load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from edge import models
from server.dataplane import DataPlane
from server.embedded import BackgroundServer
from server.grpc_service import EdgeServer
from server.repository import ModelRepository


def _server(root: Path, control: bool) -> BackgroundServer:
    dataplane = DataPlane(ModelRepository.from_directory(root), model_control=control)
    return BackgroundServer(EdgeServer(dataplane))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "tiny.tflite").write_bytes(models.model_path("digits_tiny").read_bytes())
    (tmp_path / "broken.tflite").write_bytes(b"not a model" * 10)
    return tmp_path


def _index(client: triton.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}


def test_the_index_and_refusals_without_model_control(root: Path) -> None:
    with _server(root, control=False) as server:
        client = triton.InferenceServerClient(server.address)
        assert _index(client) == {
            "tiny": ("READY", ""),
            "broken": (
                "UNAVAILABLE",
                "the file failed to load: not a TFLite flatbuffer (no TFL3 identifier in its header)",
            ),
        }
        for call in (client.unload_model, client.load_model):
            with pytest.raises(InferenceServerException) as err:
                call("tiny")
            assert (
                "FAILED_PRECONDITION" in str(err.value.status()) and "--model-control" in err.value.message()
            )
        assert client.is_model_ready("tiny")


def test_unload_and_load_with_model_control(root: Path) -> None:
    with _server(root, control=True) as server:
        client = triton.InferenceServerClient(server.address)
        client.unload_model("tiny")
        assert not client.is_model_ready("tiny")
        assert _index(client)["tiny"] == ("UNAVAILABLE", "unloaded")
        server.server.dataplane.refresh()  # a scan of the directory does not bring it back
        assert not client.is_model_ready("tiny")
        client.load_model("tiny")
        assert client.is_model_ready("tiny")
        (root / "resnet.tflite").write_bytes(models.model_path("digits_resnet").read_bytes())
        client.load_model("resnet")
        assert client.is_model_ready("resnet") and _index(client)["resnet"] == ("READY", "")
        with pytest.raises(InferenceServerException) as err:
            client.load_model("nowhere")
        assert "NOT_FOUND" in str(err.value.status())


def test_only_an_admin_token_may_load_or_unload(root: Path, tmp_path: Path) -> None:
    """With tokens, any token holder could unload any model; now only a token marked admin may."""
    from server.security import Security

    tokens = tmp_path / "tokens"
    tokens.write_text("dev1 device-token-0123456789abcdef\nops admin-token-0123456789abcdef admin\n")
    security = Security(tokens=tokens)
    dataplane = DataPlane(ModelRepository.from_directory(root), model_control=True)
    with BackgroundServer(EdgeServer(dataplane, interceptors=security.interceptors())) as server:
        device = triton.InferenceServerClient(server.address)
        device_auth = {"authorization": "Bearer device-token-0123456789abcdef"}
        with pytest.raises(InferenceServerException) as err:
            device.unload_model("tiny", headers=device_auth)
        assert "PERMISSION_DENIED" in str(err.value.status()) and "admin" in err.value.message()
        assert device.is_model_ready("tiny", headers=device_auth)  # still served
        admin_auth = {"authorization": "Bearer admin-token-0123456789abcdef"}
        device.unload_model("tiny", headers=admin_auth)
        assert not device.is_model_ready("tiny", headers=admin_auth)
        device.load_model("tiny", headers=admin_auth)
        assert device.is_model_ready("tiny", headers=device_auth)
        device.close()
