"""Device profiles: the shipped ones validate, and every mistake is named by file, key and problem."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from edge.cli import main
from edge.daemon import apply_overrides, available, find, load, resolve
from edge.daemon.config import AutoSplitConfig, DeviceProfile, FixedSplitConfig
from edge.daemon.profiles import parse
from edge.errors import ConfigError
from helpers import MINIMAL_PROFILE, REPO

PROFILES = sorted((REPO / "firmware_config").glob("*.toml"))

MINIMAL = MINIMAL_PROFILE


def test_the_four_profiles_ship() -> None:
    assert {p.stem for p in PROFILES} == {
        "raspberry-pi-4",
        "raspberry-pi-5",
        "jetson-orin-nano",
        "generic-x86",
    }


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_each_shipped_profile_validates_against_its_model(path: Path) -> None:
    profile = load(path)
    resolved = resolve(profile, path)
    assert resolved.graph.num_operators > 0
    assert profile.sensors and profile.client_id == f"edge-{profile.device_id}"
    if path.stem == "generic-x86":
        assert isinstance(profile.split, FixedSplitConfig) and resolved.cut == 8
        assert profile.sensors[0].topic == "sensors/+/digits"
        assert resolved.model_name == "digits_resnet"
    else:
        assert isinstance(profile.split, AutoSplitConfig) and resolved.cut is None


def test_profiles_are_found_by_name_and_a_wrong_name_lists_them(tmp_path: Path) -> None:
    assert find("generic-x86") == REPO / "firmware_config" / "generic-x86.toml"
    assert find("generic-x86.toml") == REPO / "firmware_config" / "generic-x86.toml"
    assert "raspberry-pi-5" in available()
    local = tmp_path / "generic-x86.toml"
    local.write_text(MINIMAL)
    assert find("generic-x86", search=(tmp_path, REPO / "firmware_config")) == local  # /etc/edge comes first
    with pytest.raises(ConfigError) as err:
        find("raspberry-pi-3")
    assert "raspberry-pi-3" in str(err.value) and "available: generic-x86, jetson-orin-nano" in str(err.value)


def _models(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models inside a field's annotation (through unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def test_every_field_is_documented() -> None:
    undocumented: list[str] = []
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [DeviceProfile]
    while todo:
        model = todo.pop()
        seen.add(model)
        for name, field in model.model_fields.items():
            if not field.description:
                undocumented.append(f"{model.__name__}.{name}")
            todo += [m for m in _models(field.annotation) if m not in seen]
    assert undocumented == []
    assert len(seen) >= 14


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (("[mqtt]", "[mqtt]\ncolour = 'red'"), "mqtt.colour", "unknown key"),
        (('device_id = "dev-1"', 'device_id = "dev-1"\nextra = 1'), "extra", "unknown key"),
        (('host = "localhost"', 'host = "localhost"\nport = "high"'), "mqtt.port", "valid integer"),
        (('host = "localhost"', 'host = "localhost"\nport = "1883"'), "mqtt.port", "valid integer"),
        (('host = "localhost"', 'host = "localhost"\nport = 70000'), "mqtt.port", "65535"),
        (('host = "localhost"', 'host = "bad host"'), "mqtt.host", "not a host name"),
        (("[mqtt]", "[results]\ntop_k = 0\n[mqtt]"), "results.top_k", "greater than or equal to 1"),
        (
            ('host = "localhost"', 'host = "localhost"\n[[edge.servers]]\naddress = "h:99999"'),
            "edge.servers[0].address",
            "out of range",
        ),
        (('format = "json"', 'format = "xml"'), "sensors[0].format", "'json', 'raw' or 'image'"),
        (("k = 8", "k = -1"), "split.k", "0 or more"),
        (("k = 8", ""), "split.k", "required key is missing"),
        (('type = "fixed"', 'type = "sometimes"'), "split", "does not match any of the expected tags"),
        (('type = "fixed"\nk = 8', 'type = "auto"\nobjective = "speed"'), "split.objective", "'latency'"),
        (('type = "fixed"\nk = 8', 'type = "auto"\nk = 3'), "split.k", "unknown key"),
        (('topic = "sensors/+/digits"', 'topic = "sensors/#/digits"'), "sensors[0].topic", "'#' must be"),
        (('topic = "sensors/+/digits"', 'topic = "edge/#"'), "sensors[0].topic", "the daemon's own topic"),
        (('device_id = "dev-1"', 'device_id = "dev/1"'), "device_id", "letters, digits"),
        # A trailing newline passed the old "$"-anchored pattern, and the daemon never connected.
        (('device_id = "dev-1"', 'device_id = "dev-1\\n"'), "device_id", "letters, digits"),
        (
            ('topic = "sensors/+/digits"', 'topic = "sensors/+/dig\\nits"'),
            "sensors[0].topic",
            "control characters",
        ),
        (
            ('topic = "sensors/+/digits"', f'topic = "sensors/{"x" * 70_000}"'),
            "sensors[0].topic",
            "MQTT allows 65,535",
        ),
        (
            ("[mqtt]", f'[topics]\nresults = "edge/{"r" * 65_500}/{{device_id}}"\n[mqtt]'),
            "topics.results",
            "MQTT allows 65,535",
        ),
        (('host = "localhost"', 'host = "localhost"\npassword = "x"'), "mqtt", "a password needs a username"),
        (
            ('device_id = "dev-1"', 'device_id = "dev-1"\n[runtime]\ncpu_latency_us = -1'),
            "runtime.cpu_latency_us",
            "0",
        ),
        (
            (
                'host = "localhost"',
                'host = "localhost"\n[[edge.servers]]\naddress = "h:1"\nstreaming = "maybe"',
            ),
            "edge.servers[0].streaming",
            "bool",
        ),
    ],
)
def test_a_mistake_names_file_key_and_problem(edit: tuple[str, str], key: str, problem: str) -> None:
    old, new = edit
    assert old in MINIMAL
    with pytest.raises(ConfigError) as err:
        parse(MINIMAL.replace(old, new, 1), source="/etc/edge/dev.toml")
    message = str(err.value)
    assert message.startswith("/etc/edge/dev.toml: ")
    assert f": {key}: " in message or f": {key} " in message
    assert problem in message
    assert "\n" not in message


def test_toml_syntax_errors_give_the_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse('device_id = "x"\n[split\n', source="p.toml")
    assert str(err.value).startswith("p.toml:2: invalid TOML: ")


def test_a_model_mismatch_is_named_when_planned(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(MINIMAL.replace("k = 8", "k = 99"))
    with pytest.raises(ConfigError, match=r"p\.toml: split\.k: cut 99 is out of range"):
        resolve(load(path), path)
    path.write_text(MINIMAL.replace('path = "digits_resnet"', 'path = "digits_resnet"\nlabels = ["a", "b"]'))
    with pytest.raises(ConfigError, match=r"p\.toml: model\.labels: 2 labels for 10 output classes"):
        resolve(load(path), path)
    path.write_text(MINIMAL.replace('path = "digits_resnet"', 'path = "no_such_model"'))
    with pytest.raises(ConfigError, match=r"p\.toml: model\.path: "):
        resolve(load(path), path)


def test_a_relative_model_path_is_relative_to_the_profile(tmp_path: Path) -> None:
    (tmp_path / "m.tflite").write_bytes((REPO / "edge" / "models" / "digits_tiny.tflite").read_bytes())
    path = tmp_path / "p.toml"
    path.write_text(MINIMAL.replace('path = "digits_resnet"', 'path = "m.tflite"').replace("k = 8", "k = 2"))
    resolved = resolve(load(path), path)
    assert resolved.model_path == tmp_path / "m.tflite" and resolved.model_name == "m"


def test_overrides_replace_broker_and_servers_and_keep_the_rest() -> None:
    path = REPO / "firmware_config" / "raspberry-pi-5.toml"
    profile = load(path)
    changed = apply_overrides(profile, broker="127.0.0.1:1999", servers=["10.1.1.1:9000"], source=str(path))
    assert changed.mqtt.host == "127.0.0.1" and changed.mqtt.port == 1999
    assert changed.mqtt.username == profile.mqtt.username and changed.mqtt.tls == profile.mqtt.tls
    assert [s.address for s in changed.edge.servers] == ["10.1.1.1:9000"]
    assert changed.edge.servers[0].tls == profile.edge.servers[0].tls
    assert apply_overrides(profile, broker="nohost").mqtt.port == 1883
    with pytest.raises(ConfigError, match=r"--broker nohost:99999: .*out of range"):
        apply_overrides(profile, broker="nohost:99999")
    assert [s.address for s in apply_overrides(profile, servers=["10.1.1.1"]).edge.servers] == [
        "10.1.1.1:8001"
    ]
    with pytest.raises(ConfigError, match=r"--server 10\.1\.1\.1:0: .*out of range"):
        apply_overrides(profile, servers=["10.1.1.1:0"])


def test_each_server_override_keeps_its_own_servers_tls() -> None:
    """jetson-orin-nano checks each server's certificate against its own name: the i-th --server
    keeps the i-th server's settings, and one past the list is set up like the first."""
    profile = load(REPO / "firmware_config" / "jetson-orin-nano.toml")
    names = [s.tls.server_name for s in profile.edge.servers if s.tls is not None]
    assert names == ["edge-1.factory.example", "edge-2.factory.example"]
    changed = apply_overrides(profile, servers=["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    assert [s.address for s in changed.edge.servers] == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    assert [s.tls for s in changed.edge.servers] == [
        *[s.tls for s in profile.edge.servers],
        profile.edge.servers[0].tls,
    ]
    assert [s.streaming for s in changed.edge.servers] == [True, True, True]


def test_password_is_kept_through_overrides_and_hidden_by_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        MINIMAL.replace('host = "localhost"', 'host = "localhost"\nusername = "u"\npassword = "s3cret"')
    )
    changed = apply_overrides(load(path), broker="h:1")
    assert changed.mqtt.password is not None and changed.mqtt.password.get_secret_value() == "s3cret"
    assert main(["run", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out


def test_check_prints_the_resolved_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", "generic-x86", "--check", "--broker", "mq:1884", "--server", "e:1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    resolved = shown["resolved"]
    assert resolved["cut"] == 8 and resolved["broker"] == "mq:1884" and resolved["edge_servers"] == ["e:1"]
    assert resolved["topics"]["results"] == "edge/generic-x86/results"
    assert resolved["inputs"][0]["shape"] == [1, 32, 32, 1]


def test_check_fails_with_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL.replace("[mqtt]", "[mqtt]\nqos = 2"))
    assert main(["run", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: mqtt.qos: unknown key" in err
    assert main(["run", "--config", "nowhere", "--check"]) == 2
    assert "available: " in capsys.readouterr().err


def test_transport_and_cpu_latency_settings_reach_the_profile() -> None:
    text = MINIMAL.replace('device_id = "dev-1"', 'device_id = "dev-1"\n[runtime]\ncpu_latency_us = 0')
    text += '[[edge.servers]]\naddress = "a:1"\n[[edge.servers]]\naddress = "b:2"\nstreaming = false\n'
    profile = parse(text, source="p.toml")
    assert profile.runtime.cpu_latency_us == 0
    assert [s.streaming for s in profile.edge.servers] == [True, False]
    assert parse(MINIMAL, source="p.toml").runtime.cpu_latency_us is None


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ('host = "localhost"', 'host = "localhost"\nusername = "u"\npassword_file = "/nonexistent/pw"'),
            "mqtt.password_file: cannot read /nonexistent/pw",
        ),
        (
            ('host = "localhost"', 'host = "localhost"\n[mqtt.tls]\nca_file = "/nonexistent/ca.pem"'),
            "mqtt.tls.ca_file: cannot read /nonexistent/ca.pem",
        ),
        (
            (
                'host = "localhost"',
                'host = "localhost"\n[[edge.servers]]\naddress = "h:1"\n[edge.servers.tls]\nca_file = "/nonexistent/e.pem"',
            ),
            "edge.servers[0].tls: cannot read TLS file /nonexistent/e.pem",
        ),
    ],
)
def test_check_finds_what_start_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], expected: str
) -> None:
    old, new = edit
    path = tmp_path / "p.toml"
    path.write_text(MINIMAL.replace(old, new, 1))
    assert main(["run", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: {expected}" in err, err


def test_check_loads_the_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The backend must be installed and able to load the model; tflite-runtime is absent from the main
    test environment (it needs numpy < 2), present in its own."""
    path = tmp_path / "p.toml"
    path.write_text(
        MINIMAL.replace('device_id = "dev-1"', 'device_id = "dev-1"\n[runtime]\nbackend = "tflite-runtime"')
    )
    installed = importlib.util.find_spec("tflite_runtime") is not None
    assert main(["run", "--config", str(path), "--check"]) == (0 if installed else 2)
    if not installed:
        assert f"{path}: runtime.backend: backend 'tflite-runtime' needs" in capsys.readouterr().err


def test_a_metrics_port_in_use_stops_the_daemon_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = tmp_path / "p.toml"
        path.write_text(MINIMAL + f"[metrics]\nenabled = true\nport = {taken.getsockname()[1]}\n")
        assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot serve metrics on 127.0.0.1:" in err, err
