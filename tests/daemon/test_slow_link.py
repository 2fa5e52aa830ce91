"""The daemon over a slow TLS link: a real mosquitto, a TLS edge-server behind a delay proxy at RTT
200 ms, the daemon as a process. Its first messages arrive while the connection is still being
set up; every one must be offloaded (cut 8, no fallback), none finished locally while connecting.
It failed before the connection had a deadline of its own (gRPC's 100 ms connect minimum)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon.daemon_harness import GENERIC, Broker, DaemonProcess, Probe
from slowlink import slow_links

from edge import models

EDGE_SERVER = '[[edge.servers]]\naddress = "localhost:8001"\n'


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    with slow_links(tmp_path_factory.mktemp("slow")) as found:
        yield found


def test_a_tls_daemon_over_rtt_200_ms_offloads_from_its_first_message(
    tmp_path: Path, broker: Broker, probe: Probe, link: dict[str, object]
) -> None:
    text = GENERIC.read_text()
    assert EDGE_SERVER in text
    server = f'[[edge.servers]]\naddress = "{link["tls"]}"\ntls = {{ ca_file = "{link["ca"]}" }}\n'
    profile = tmp_path / "slow.toml"
    profile.write_text(text.replace(EDGE_SERVER, server).replace("timeout_s = 2.0", "timeout_s = 5.0"))
    daemon = DaemonProcess(tmp_path, profile, broker.address, [])
    daemon.start()
    try:
        sample = models.digits_sample()
        ids = {f"slow-{i}" for i in range(6)}
        for i in range(6):
            probe.publish("sensors/s1/digits", json.dumps({"id": f"slow-{i}", "data": sample.x[i].tolist()}))
        answered = probe.wait_answered(ids, timeout=60)
        assert not probe.errors
        for message_id in ids:
            (doc,) = answered[message_id]
            assert doc["cut"] == 8 and doc["fallback"] is False, (doc, daemon.text()[-2000:])
    finally:
        daemon.kill()
