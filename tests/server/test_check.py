"""`edge-server --check` checks what the start needs: the TLS files (a key that does not match its
certificate, a key given as the CA, an expired certificate) and the model directory (missing, or
with nothing it can serve). Each is one line naming the file, exit 2; a good set passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from certs import CA

from edge import models


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "--check", "--host", "127.0.0.1", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, Path]:
    ca = CA(tmp_path / "pki")
    good = ca.issue("edge-server", server=True)
    other = ca.issue("other", server=True)
    old = ca.issue("old", server=True, expired=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "digits_tiny.tflite").write_bytes(models.model_path("digits_tiny").read_bytes())
    return {"ca": ca.pem, "cert": good.cert, "key": good.key, "other_key": other.key, "old_cert": old.cert,
            "old_key": old.key, "models": tmp_path / "models", "tmp": tmp_path}  # fmt: skip


def test_a_good_set_passes(setup: dict[str, Path]) -> None:
    proc = _check("--models", str(setup["models"]), "--tls-cert", str(setup["cert"]), "--tls-key",
                  str(setup["key"]), "--tls-client-ca", str(setup["ca"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "message"),
    [
        ("cert", "other_key", None, "does not match the certificate"),
        ("cert", "key", "key", "holds no PEM certificate (it is a private key)"),
        ("old_cert", "old_key", None, "expired on"),
        ("key", "cert", None, "holds no PEM certificate (it is a private key)"),
    ],
)
def test_bad_tls_files_are_one_line(
    setup: dict[str, Path], cert: str, key: str, client_ca: str | None, message: str
) -> None:
    args = ["--models", str(setup["models"]), "--tls-cert", str(setup[cert]), "--tls-key", str(setup[key])]
    if client_ca is not None:
        args += ["--tls-client-ca", str(setup[client_ca])]
    proc = _check(*args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert "edge-server: error:" in lines[0]


def test_a_missing_or_empty_model_directory_fails_the_check(setup: dict[str, Path]) -> None:
    missing = _check("--models", str(setup["tmp"] / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr
    empty = setup["tmp"] / "empty"
    empty.mkdir()
    (empty / "broken.tflite").write_bytes(b"not a model")
    proc = _check("--models", str(empty))
    assert proc.returncode == 2 and "holds no servable .tflite file" in proc.stderr, proc.stderr


def test_an_empty_token_file_is_refused(setup: dict[str, Path]) -> None:
    """It refused every call, with no word of why."""
    tokens = setup["tmp"] / "tokens"
    tokens.write_text("# devices go here\n\n")
    proc = _check("--models", str(setup["models"]), "--auth-tokens", str(tokens))
    assert proc.returncode == 2 and "holds no DEVICE_ID TOKEN line" in proc.stderr, proc.stderr


def test_a_settings_file_takes_the_flags_own_names_too(setup: dict[str, Path]) -> None:
    """--grace sets grace_s: the file may say either (grace = 2 was an unknown key), not both."""
    config = setup["tmp"] / "s.toml"
    config.write_text(f'models = "{setup["models"]}"\ngrace = 2.5\nidle_timeout = 60\nwatch = 0\n')
    proc = _check("--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert '"grace_s": 2.5' in proc.stdout and '"idle_timeout_s": 60.0' in proc.stdout
    config.write_text(f'models = "{setup["models"]}"\ngrace = 2.5\ngrace_s = 3\n')
    both = _check("--config", str(config))
    assert both.returncode == 2 and "grace and grace_s are the same setting" in both.stderr


def test_the_message_bound_is_sized_from_the_served_models(setup: dict[str, Path]) -> None:
    """digits_tiny takes 1 KiB: a 16 MiB message is refused by gRPC before it is parsed (32 of them had
    cost 1.3 GB under the fixed 64 MiB bound), and a real request still goes through."""
    import re
    import time

    import grpc
    import numpy as np

    from edge.graph import ModelGraph
    from edge.protocol import pb, pb_grpc
    from server.dataplane import MIN_MESSAGE_BYTES, largest_message, message_limit

    graph = ModelGraph.from_file(setup["models"] / "digits_tiny.tflite")
    assert message_limit([graph], 64 * 1024 * 1024) == MIN_MESSAGE_BYTES >= 2 * largest_message(graph)
    log = setup["tmp"] / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--models", str(setup["models"]), "--host", "127.0.0.1", "--port", "0"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert "messages bounded at 1,048,576 bytes" in log.read_text()
        with grpc.insecure_channel(f"127.0.0.1:{found.group(1)}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            tensor = graph.inputs[0]
            big = pb.ModelInferRequest(model_name="digits_tiny")
            big.inputs.add(name=tensor.name, datatype="INT8", shape=list(tensor.shape))
            big.raw_input_contents.append(b"\0" * (16 * 1024 * 1024))
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(big, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            fine = pb.ModelInferRequest(model_name="digits_tiny")
            fine.inputs.add(name=tensor.name, datatype="INT8", shape=list(tensor.shape))
            fine.raw_input_contents.append(np.zeros(tensor.shape, np.int8).tobytes())
            assert len(stub.ModelInfer(fine, timeout=30).raw_output_contents) == 1
    finally:
        proc.kill()
        proc.wait(10)
