"""The daemon tests' harness: a real Mosquitto broker, a real edge server, the daemon as a process, a probe.

Every wait is bounded; every process is stopped by its own pid.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge import models
from helpers import REPO, RefusedAddress, wait_for_port

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
GENERIC = REPO / "firmware_config" / "generic-x86.toml"
SHIPPED_BROKER = REPO / "firmware_config" / "mosquitto" / "edge.conf"
SHIPPED_BROKER_TLS = REPO / "firmware_config" / "mosquitto" / "edge-tls.conf"


@dataclass(frozen=True)
class BrokerTLS:
    """What the shipped TLS listener (edge-tls.conf) needs: the files it names, and whether it asks
    every client for a certificate."""

    ca: Path
    cert: Path
    key: Path
    passwords: Path
    require_certificate: bool = False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=timeout)


class Broker:
    """A mosquitto process with the shipped config (firmware_config/mosquitto/edge.conf) on a free
    loopback port, persistent across restarts (sessions, queued QoS 1).

    With ``tls``, the shipped TLS listener (edge-tls.conf) too, on another free port (``tls_port``).
    """

    def __init__(self, workdir: Path, tls: BrokerTLS | None = None) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
        self.binary: str = MOSQUITTO
        self.workdir = workdir
        # Its ports are held (bound, not listening) until it starts: mosquitto cannot take port 0
        # and say which it took, and a test may need the address before the broker is up.
        self._held = [RefusedAddress()]
        self.port = self._held[0].port
        self.address = f"127.0.0.1:{self.port}"
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        workdir.mkdir(parents=True, exist_ok=True)
        # The shipped broker config, on this test's port and directory.
        lines = []
        for line in SHIPPED_BROKER.read_text().splitlines():
            if line.startswith("listener 1883"):
                line = f"listener {self.port} 127.0.0.1"
            lines.append(line)
        # What Debian's main mosquitto.conf adds around the conf.d snippet: where the store goes.
        lines.append(f"persistence_location {workdir}/")
        self.tls_port: int | None = None
        if tls is not None:
            self._held.append(RefusedAddress())
            self.tls_port = self._held[-1].port
            files = {
                "cafile": tls.ca,
                "certfile": tls.cert,
                "keyfile": tls.key,
                "password_file": tls.passwords,
            }
            for line in SHIPPED_BROKER_TLS.read_text().splitlines():
                key = line.split(" ", 1)[0]
                if line.startswith("listener 8883"):
                    line = f"listener {self.tls_port} 127.0.0.1"
                elif key in files:
                    line = f"{key} {files[key]}"
                elif key == "require_certificate":
                    line = f"require_certificate {str(tls.require_certificate).lower()}"
                lines.append(line)
        lines += [
            # Run as root, mosquitto would switch to the 'mosquitto' user and lose write access here.
            f"user {getpass.getuser()}",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for held in self._held:
            held.release()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.proc, timeout=10, log=self.log)
        if self.tls_port is not None:
            wait_for_port(self.tls_port, self.proc, timeout=10, log=self.log)

    def stop(self) -> None:
        """SIGTERM: mosquitto writes its persistence file on the way out."""
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class ServerProcess:
    """A real ``edge-server`` serving digits_resnet (or ``served``), restartable on the same port.

    ``options`` are more ``edge-server`` flags, such as TLS.
    """

    def __init__(
        self, workdir: Path, served: tuple[str, ...] = ("digits_resnet",), options: tuple[str, ...] = ()
    ) -> None:
        self.models = workdir / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        for name in served:
            shutil.copy(models.model_path(name), self.models / f"{name}.tflite")
        self.options = options
        self._held = RefusedAddress()  # the port, held until it starts (the address is known before)
        self.port = self._held.port
        self.address = f"127.0.0.1:{self.port}"
        self.log = workdir / "edge-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._held.release()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "server",
                    "--models",
                    str(self.models),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *self.options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self.proc, timeout=30, log=self.log)

    def kill(self) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL)
            self.proc = None


class DaemonProcess:
    """``python -m edge run --config PROFILE --broker ... --server ...`` as a subprocess; with
    ``broker`` None and no ``servers``, the profile's own."""

    def __init__(self, workdir: Path, profile: Path, broker: str | None, servers: list[str]) -> None:
        self.profile = profile
        self.broker = broker
        self.servers = servers
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        command = [
            sys.executable,
            "-m",
            "edge",
            "-v",
            "run",
            "--config",
            str(self.profile),
        ]
        if self.broker is not None:
            command += ["--broker", self.broker]
        for server in self.servers:
            command += ["--server", server]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})}
            )
        self.starts += 1
        proc = self.proc
        wait_until(
            lambda: self.text().count(" ready: ") >= self.starts or proc.poll() is not None,
            timeout,
            "daemon ready",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        proc, self.proc = self.proc, None
        return _stop(proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test froze it
            _stop(self.proc, signal.SIGKILL)
            self.proc = None


class Probe:
    """An MQTT client on its own persistent session: publishes sensor messages, collects what the daemon says."""

    def __init__(self, broker: Broker, device_id: str, name: str = "probe") -> None:
        self.device_id = device_id
        self._lock = threading.Lock()
        self.results: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.stats: list[dict[str, Any]] = []
        self.retained: dict[str, bytes] = {}
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"{name}-{broker.port}", protocol=paho.MQTTv5
        )
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._subscribed = threading.Event()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("probe could not subscribe")

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        # Retain-as-published: a retained message keeps its flag even when it arrives live.
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        client.subscribe([(f"edge/{self.device_id}/#", options), ("homeassistant/#", options)])
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            if message.retain:
                self.retained[message.topic] = bytes(message.payload)
            kind = message.topic.rsplit("/", 1)[-1]
            if kind in ("results", "errors", "stats"):
                getattr(self, kind).append(json.loads(message.payload))

    def publish(self, topic: str, payload: bytes | str, *, properties: dict[str, str] | None = None) -> None:
        props = None
        if properties:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = list(properties.items())
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"broker did not confirm publish on {topic}"

    def publish_many(self, messages: list[tuple[str, bytes | str]]) -> None:
        """Publish without waiting between messages, then wait until the broker has them all."""
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published(), "broker did not confirm a publish"

    def answered(self) -> dict[str, list[dict[str, Any]]]:
        """Results and errors by message id (a list: duplicates show up)."""
        with self._lock:
            out: dict[str, list[dict[str, Any]]] = {}
            for doc in self.results + self.errors:
                out.setdefault(str(doc.get("id")), []).append(doc)
            return out

    def wait_answered(self, ids: set[str], timeout: float = 30.0) -> dict[str, list[dict[str, Any]]]:
        wait_until(
            lambda: ids <= set(self.answered()), timeout, f"answers to {len(ids)} messages", interval=0.05
        )
        return self.answered()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def session_backlog(
    broker: Broker, client_id: str, topic: str = "sensors/backlog/digits", timeout_s: float = 15.0
) -> list[str]:
    """Resume ``client_id``'s session without acking: the ids the broker still holds for it.

    What an unclean run left unacknowledged is delivered again here. To know that everything
    held has arrived, a marker is published to ``topic`` (one the session subscribes to) after
    the session is resumed: the broker delivers a session's messages in order, so once the
    marker is seen nothing held before it is still on its way. An empty list means every
    message was acknowledged.
    """
    seen: list[str] = []
    marker = f"backlog-marker-{time.monotonic_ns()}"
    arrived = threading.Event()
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True
    )

    def on_message(c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
        try:
            found = str(json.loads(message.payload)["id"])
        except (ValueError, KeyError, TypeError):
            found = f"{message.topic}#{message.mid}"
        if found == marker:
            arrived.set()
        else:
            seen.append(found)

    connected = threading.Event()
    client.on_message = on_message
    client.on_connect = lambda c, u, flags, rc, props: connected.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 1000
    client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
    client.loop_start()
    publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    try:
        assert connected.wait(timeout_s), "the session did not resume"
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        publisher.publish(topic, json.dumps({"id": marker, "data": []}), qos=1).wait_for_publish(timeout_s)
        assert arrived.wait(timeout_s), f"the marker published to {topic} never reached the session"
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        client.loop_stop()
        client.disconnect()
    return seen
