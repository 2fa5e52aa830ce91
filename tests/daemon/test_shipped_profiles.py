"""Every shipped device profile, as written, against TLS edge servers and a TLS Mosquitto.

For each profile in ``firmware_config/`` this starts what its site would run: edge servers with
TLS (and mutual TLS when the profile presents a client certificate), Mosquitto with the shipped
``edge.conf`` and ``edge-tls.conf`` (a password per device, a client certificate when the profile
has one), a throwaway CA and the files the profile names under ``/etc/edge/``. The daemon runs
``edge run --config PROFILE --broker ... --server ...``: the profile is changed only in where
its ``/etc/edge/`` files live, and the addresses come from the documented overrides, which keep
the profile's TLS settings and credentials.

Each server's certificate names only what the profile checks it against: ``server_name`` when
the profile sets one, otherwise the address it dials. The broker's names no address when the
profile says ``verify_hostname = false``.

The planner needs the device to be slower than the server to offload, and here both share one
CPU: the device's head profile is measured here and cached 50 times slower, as the device
would measure itself next to an edge server (a margin wide enough that a noisy link estimate
on a loaded loopback does not tip the plan to the device). Everything else is real. A message on every
sensor topic of the profile must get a cooperative result (sent to a server, no fallback) with
the top-k of the whole model run locally; then the first server is killed, and the next
message must be answered through the second server, still over TLS.

Profiles are covered on the backend they name: the tflite-runtime one (raspberry-pi-4) runs
in the suite's tflite-runtime venv (tests/run.sh), the others in the LiteRT suite.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
from certs import CA
from daemon.daemon_harness import Broker, BrokerTLS, DaemonProcess, Probe, ServerProcess
from PIL import Image

from edge import models
from edge.daemon import load, resolve
from edge.daemon.config import SensorConfig
from edge.daemon.messages import dequantize, top_k
from edge.daemon.payloads import decode
from edge.runner import ModelRunner
from helpers import REPO, slow_device_profile

PROFILES = sorted(path.stem for path in (REPO / "firmware_config").glob("*.toml"))
SLOWER = 50.0
PASSWORD = "correct horse battery staple"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shipped" in metafunc.fixturenames:
        backends = metafunc.config.getoption("--backends").split(",")
        names = [n for n in PROFILES if _backend(n) in backends]
        metafunc.parametrize("shipped", names)


def _backend(name: str) -> str:
    return str(tomllib.loads((REPO / "firmware_config" / f"{name}.toml").read_text())["runtime"]["backend"])


def test_every_shipped_profile_is_covered_on_one_backend() -> None:
    """The union of the two runs is every profile: none falls between the backends."""
    assert set(PROFILES) >= {"generic-x86", "raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano"}
    assert {_backend(n) for n in PROFILES} <= {"litert", "tflite-runtime"}


class Site:
    """The files a profile names under /etc/edge/, made under ``root`` for a throwaway CA."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.ca = CA(root / "ca")
        shipped = (REPO / "firmware_config" / f"{name}.toml").read_text()
        self.text = shipped.replace("/etc/edge/", f"{root}/etc/edge/")
        self.data = tomllib.loads(self.text)
        self.device_id = str(self.data["device_id"])
        for named in sorted(set(re.findall(rf"{re.escape(str(root))}/etc/edge/[\w./-]+", self.text))):
            self._make(Path(named))
        self.profile = root / f"{name}.toml"
        self.profile.write_text(self.text)

    def _make(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name == "ca.pem":
            path.write_bytes(self.ca.pem.read_bytes())
        elif path.name == "mqtt-password":
            path.write_text(PASSWORD + "\n")
        elif path.suffix in (".pem", ".key"):
            if not path.exists():
                pair = self.ca.issue(path.stem, server=False)
                path.with_suffix(".pem").write_bytes(pair.cert.read_bytes())
                path.with_suffix(".key").write_bytes(pair.key.read_bytes())
        else:
            raise AssertionError(f"the profile names a file this test does not know how to make: {path}")

    @property
    def servers(self) -> list[dict[str, Any]]:
        return list(self.data.get("edge", {}).get("servers", []))

    def server_options(self, i: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the names its certificate carries, edge-server's TLS flags) for the profile's i-th server."""
        tls = self.servers[i].get("tls")
        if tls is None:
            return (), ()
        host = self.servers[i]["address"].rsplit(":", 1)[0]
        # The override dials 127.0.0.1; without server_name that is the name checked.
        names = (tls["server_name"],) if "server_name" in tls else (host, "127.0.0.1")
        pair = self.ca.issue(f"server-{i}", server=True, names=names)
        flags: tuple[str, ...] = ("--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
        if "cert_file" in tls:
            flags += ("--tls-client-ca", str(self.ca.pem))
        return names, flags

    def broker_tls(self) -> BrokerTLS | None:
        mqtt = self.data["mqtt"]
        tls = mqtt.get("tls")
        if tls is None:
            return None
        names = (mqtt["host"],) + (() if tls.get("verify_hostname") is False else ("127.0.0.1",))
        pair = self.ca.issue("broker", server=True, names=names)
        passwords = self.root / "mosquitto" / "passwd"
        passwords.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mosquitto_passwd", "-c", "-b", str(passwords), str(mqtt["username"]), PASSWORD],
            check=True,
            capture_output=True,
        )
        return BrokerTLS(
            ca=self.ca.pem,
            cert=pair.cert,
            key=pair.key,
            passwords=passwords,
            require_certificate="cert_file" in tls,
        )


def seed_slow_device(profile_file: Path, cache: Path) -> None:
    """Measure the device's head profile here, and cache it ``SLOWER`` times slower."""
    resolved = resolve(load(profile_file), profile_file)
    runtime = resolved.profile.runtime
    runner = ModelRunner(resolved.graph, backend=runtime.backend, threads=runtime.threads)
    try:
        slow_device_profile(runner, cache, SLOWER)
    finally:
        runner.close()


def concrete(topic: str) -> str:
    return topic.replace("+", "site-a").replace("#", "x")


def payload(sensor: SensorConfig, shape: tuple[int, ...], i: int, message_id: str) -> bytes:
    """A real held-out digit (or, for a three-channel model, the digit in every channel)."""
    digit = models.digits_sample().x_float[i, :, :, 0]
    if sensor.format == "json":
        ints = models.digits_sample().x[i]
        return json.dumps({"id": message_id, "data": ints.tolist()}).encode()
    if sensor.format == "raw":
        assert shape == (1, 32, 32, 1), "a raw sensor this test does not know"
        if sensor.dtype == "float32":
            return digit.astype(np.float32).reshape(shape).tobytes()
        assert sensor.dtype is None, sensor.dtype  # the model input's own type: int8
        return models.digits_sample().x[i].astype(np.int8).tobytes()
    pixels = (digit * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels, mode="L").resize((shape[2], shape[1]))
    buf = io.BytesIO()
    image.convert("RGB" if shape[-1] == 3 else "L").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def site(tmp_path: Path, shipped: str) -> Iterator[Site]:
    yield Site(tmp_path / "site", shipped)


def test_a_shipped_profile_gets_cooperative_results_over_tls(
    site: Site, tmp_path: Path, shipped: str
) -> None:
    resolved = resolve(load(site.profile), site.profile)
    profile, graph = resolved.profile, resolved.graph
    assert profile.edge.servers, f"{shipped} names no edge server"
    served = (resolved.model_path.stem,)
    servers: list[ServerProcess] = []
    broker = Broker(tmp_path / "broker", tls=site.broker_tls())
    cache = tmp_path / "cache"
    seed_slow_device(site.profile, cache)
    probe: Probe | None = None
    daemon: DaemonProcess | None = None
    try:
        for i in range(len(site.servers)):
            _, flags = site.server_options(i)
            server = ServerProcess(tmp_path / f"server-{i}", served=served, options=flags)
            server.start()
            servers.append(server)
        broker.start()
        probe = Probe(broker, site.device_id)
        mqtt_address = f"127.0.0.1:{broker.tls_port if broker.tls_port is not None else broker.port}"
        daemon = DaemonProcess(tmp_path, site.profile, mqtt_address, [s.address for s in servers])
        daemon.start(timeout=180, env={"EDGE_CACHE_DIR": str(cache)})

        runner = ModelRunner(graph)
        output = graph.outputs[0]
        shape = tuple(graph.inputs[0].shape)

        def expected(sensor: SensorConfig, body: bytes) -> list[dict[str, Any]]:
            feeds = decode(body, sensor, graph.inputs).feeds
            out = runner.run(feeds)[output.name]
            return top_k(dequantize(out, output).reshape(-1), profile.results.top_k, profile.model.labels)

        def send_each(tag: str) -> dict[str, list[dict[str, Any]]]:
            assert probe is not None
            wanted: dict[str, list[dict[str, Any]]] = {}
            for n, sensor in enumerate(profile.sensors):
                message_id = f"{tag}-{n}"
                body = payload(sensor, shape, n, message_id)
                probe.publish(concrete(sensor.topic), body, properties={"id": message_id})
                wanted[message_id] = expected(sensor, body)
            answered = probe.wait_answered(set(wanted), timeout=60)
            for message_id, top in wanted.items():
                doc = answered[message_id][0]
                assert "error" not in doc, doc
                link = [
                    line for line in daemon.text().splitlines() if "edge.link" in line or "autosplit" in line
                ]
                assert doc["fallback"] is False and doc["bytes_sent"] > 0, (doc, link[-5:])
                assert doc["cut"] < graph.num_operators, doc
                assert doc["top_k"] == top, message_id
            return answered

        send_each("first")
        if len(servers) > 1:
            servers[0].kill()
            send_each("second")  # over TLS to the next server, which names itself differently
        assert "Traceback" not in daemon.text()
    finally:
        if daemon is not None:
            daemon.kill()
        if probe is not None:
            probe.close()
        broker.stop()
        for server in servers:
            server.kill()
