"""The shipped broker config as a Debian user installs it: a conf.d snippet under Debian's own
mosquitto.conf (which sets persistence_location, and includes conf.d). It must start there, and a
broker killed outright (SIGKILL) must keep what it acknowledged but for at most the last
autosave_interval messages (it lost 1,314 of 2,000 with autosave_interval 30 alone)."""

from __future__ import annotations

import getpass
import re
import signal
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from daemon.daemon_harness import MOSQUITTO, SHIPPED_BROKER, SHIPPED_BROKER_TLS
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from helpers import RefusedAddress, wait_for_port

DEBIAN_MAIN = """pid_file {dir}/mosquitto.pid
persistence true
persistence_location {dir}/store/
log_dest file {dir}/mosquitto.log
include_dir {dir}/conf.d
user {user}
"""


def _debian_broker(tmp_path: Path, *snippets: Path) -> tuple[Path, RefusedAddress]:
    """Debian's main config layout, with the shipped snippets copied into conf.d (on a free port)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "store").mkdir()
    held = RefusedAddress()  # mosquitto cannot take port 0: one the kernel gave, held until it starts
    port = held.port
    for snippet in snippets:
        text = snippet.read_text().replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
        (tmp_path / "conf.d" / snippet.name).write_text(text)
    main = tmp_path / "mosquitto.conf"
    main.write_text(DEBIAN_MAIN.format(dir=tmp_path, user=getpass.getuser()))
    return main, held


def _start(main: Path, held: RefusedAddress, log: Path) -> subprocess.Popen[bytes]:
    port = held.release()
    proc = subprocess.Popen(
        [str(MOSQUITTO), "-c", str(main)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for_port(port, proc, timeout=10, log=log)
    return proc


def test_the_snippet_starts_under_debians_main_config(tmp_path: Path) -> None:
    main, held = _debian_broker(tmp_path, SHIPPED_BROKER)
    proc = _start(main, held, tmp_path / "mosquitto.log")
    try:
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_tls_snippet_sets_no_persistence_location_either() -> None:
    for snippet in (SHIPPED_BROKER, SHIPPED_BROKER_TLS):
        assert not re.search(r"^\s*persistence_location", snippet.read_text(), re.M), snippet


def test_a_killed_broker_keeps_all_but_the_last_autosave_interval(tmp_path: Path) -> None:
    interval = int(re.search(r"^autosave_interval (\d+)", SHIPPED_BROKER.read_text(), re.M).group(1))
    assert re.search(r"^autosave_on_changes true", SHIPPED_BROKER.read_text(), re.M)
    main, held = _debian_broker(tmp_path, SHIPPED_BROKER)
    port = held.port
    log = tmp_path / "mosquitto.log"
    broker = _start(main, held, log)
    sent = 2000
    session = Properties(PacketTypes.CONNECT)
    session.SessionExpiryInterval = 3600
    try:
        daemon = paho.Client(CallbackAPIVersion.VERSION2, client_id="daemon", protocol=paho.MQTTv5)
        daemon.connect("127.0.0.1", port, clean_start=False, properties=session)
        daemon.loop_start()
        daemon.subscribe("sensors/t", qos=1)
        time.sleep(0.5)
        daemon.loop_stop()
        daemon.disconnect()  # offline: its session queues what the sensor sends
        sensor = paho.Client(CallbackAPIVersion.VERSION2, client_id="sensor", protocol=paho.MQTTv5)
        sensor.connect("127.0.0.1", port)
        sensor.loop_start()
        for info in [sensor.publish("sensors/t", f"m{i}", qos=1) for i in range(sent)]:
            info.wait_for_publish(10)  # acknowledged by the broker
        sensor.loop_stop()
        sensor.disconnect()
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
        broker = _start(main, held, log)
        got: list[bytes] = []
        back = paho.Client(CallbackAPIVersion.VERSION2, client_id="daemon", protocol=paho.MQTTv5)
        back.on_message = lambda client, userdata, message: got.append(message.payload)
        back.connect("127.0.0.1", port, clean_start=False, properties=session)
        back.loop_start()
        deadline, last, quiet_since = time.monotonic() + 20, -1, time.monotonic()
        while len(got) < sent and time.monotonic() < deadline and time.monotonic() - quiet_since < 2.0:
            if len(got) != last:
                last, quiet_since = len(got), time.monotonic()
            time.sleep(0.1)
        back.loop_stop()
        back.disconnect()
    finally:
        broker.kill()
        broker.wait(10)
    assert sent - interval <= len(set(got)) <= sent, f"{len(set(got))} of {sent} kept"
