"""``edge run`` end to end: a real mosquitto, real edge servers, the daemon as a subprocess.

The claims: every message gets exactly one answer (after de-duplication by id) while the
edge server, the broker or the daemon itself dies and comes back; malformed payloads get
error results without holding up the rest; SIGTERM drains and leaves nothing unacknowledged.
"""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from daemon.daemon_harness import (
    GENERIC,
    Broker,
    DaemonProcess,
    Probe,
    ServerProcess,
    session_backlog,
    wait_until,
)
from PIL import Image

from edge import models
from edge.daemon.messages import dequantize
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from helpers import RefusedAddress

TOPIC = "sensors/s1/digits"
EDGE_SERVER = '[[edge.servers]]\naddress = "localhost:8001"\n'


def local_profile() -> str:
    """The generic-x86 profile without its edge server: the daemon runs every message itself."""
    text = GENERIC.read_text()
    assert EDGE_SERVER in text
    return text.replace(EDGE_SERVER, "")


DEVICE_CLIENT_ID = "edge-generic-x86"


@pytest.fixture(scope="module")
def reference() -> Callable[[int], list[dict[str, object]]]:
    """The top-3 the daemon must publish for held-out digit i, from the whole model run here."""
    graph = ModelGraph.from_file(models.model_path("digits_resnet"))
    sample = models.digits_sample()
    runner = ModelRunner(graph)
    cache: dict[int, list[dict[str, object]]] = {}

    def top3(i: int) -> list[dict[str, object]]:
        if i not in cache:
            out = runner.run({graph.inputs[0].name: sample.x[i : i + 1]})[graph.outputs[0].name]
            logits = dequantize(out, graph.outputs[0]).reshape(-1)
            probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            order = np.argsort(-logits, kind="stable")[:3]
            cache[i] = [
                {
                    "index": int(k),
                    "label": str(int(k)),
                    "logit": float(logits[k]),
                    "probability": float(probabilities[k]),
                }
                for k in order
            ]
        return cache[i]

    return top3


def digit_json(i: int, message_id: str) -> str:
    return json.dumps({"id": message_id, "data": models.digits_sample().x[i].tolist()})


def publish_digits(probe: Probe, prefix: str, count: int, offset: int = 0) -> dict[str, int]:
    """``count`` JSON digit messages with ids ``prefix-N``; returns id -> sample index."""
    sent = {}
    for n in range(count):
        i = (offset + n) % 200
        message_id = f"{prefix}-{n}"
        probe.publish(TOPIC, digit_json(i, message_id))
        sent[message_id] = i
    return sent


def check_once(
    probe: Probe, sent: dict[str, int], reference: Callable[[int], list[dict[str, object]]]
) -> None:
    """Every id answered, each by the right result, nothing answered that was not asked."""
    answered = probe.answered()
    assert set(answered) == set(sent)
    for message_id, docs in answered.items():
        for doc in docs:  # redelivered copies, if any, must agree
            assert doc["top_k"] == reference(sent[message_id]), message_id
            assert doc["topic"] == TOPIC


def png(i: int, size: tuple[int, int] = (32, 32), mode: str = "L") -> bytes:
    pixels = (models.digits_sample().x_float[i, :, :, 0] * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels, mode="L").resize(size).convert(mode)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_every_format_gets_one_result_through_a_failover_server(
    broker: Broker,
    edge_server: ServerProcess,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
    refused: RefusedAddress,
) -> None:
    dead = refused.address  # nothing listens here: the daemon must fail over to the live server
    daemon = daemon_factory([dead, edge_server.address])
    daemon.start()
    sample = models.digits_sample()
    sent = publish_digits(probe, "json", 10)
    probe.publish(TOPIC, json.dumps({"id": "json-float", "data": sample.x_float[3].reshape(-1).tolist()}))
    probe.publish("sensors/s1/digits/raw", sample.x[4].tobytes(), properties={"id": "raw-int8"})
    probe.publish(
        "sensors/s1/digits/raw",
        sample.x_float[5].astype("<f4").tobytes(),
        properties={"id": "raw-float32", "dtype": "float32", "shape": "32,32,1"},
    )
    probe.publish("sensors/s1/digits/image", png(6), properties={"id": "png"})
    probe.publish("sensors/s1/digits/image", png(7, (64, 64), "RGB"), properties={"id": "png-rgb-64"})
    probe.publish("sensors/s1/digits", json.dumps({"data": sample.x[8].tolist()}))  # no id: topic#mid
    ids = set(sent) | {"json-float", "raw-int8", "raw-float32", "png", "png-rgb-64"}
    answered = probe.wait_answered(ids)
    wait_until(lambda: len(probe.results) >= len(ids) + 1, 10, "the result of the message without an id")

    assert not probe.errors
    for message_id, i in sent.items():
        (doc,) = answered[message_id]
        assert doc["top_k"] == reference(i)
        assert doc["cut"] == 8 and doc["fallback"] is False and doc["bytes_sent"] == 2048
        assert set(doc["timings"]) == {"head_ms", "transfer_ms", "queue_ms", "tail_ms", "e2e_ms"}
    # The same digit sent as reals, as raw int8 and as raw float32 gives the same answer.
    assert answered["json-float"][0]["top_k"] == reference(3)
    assert answered["raw-int8"][0]["top_k"] == reference(4)
    assert answered["raw-float32"][0]["top_k"] == reference(5)
    assert answered["png"][0]["top_k"][0]["label"] == str(sample.y[6])
    assert answered["png-rgb-64"][0]["top_k"][0]["label"] == str(sample.y[7])
    (anonymous,) = [d for d in probe.results if d["id"].startswith(f"{TOPIC}#")]
    assert anonymous["top_k"] == reference(8)
    assert probe.retained["edge/generic-x86/availability"] == b"online"


def test_malformed_payloads_get_error_results_and_do_not_block(
    broker: Broker,
    edge_server: ServerProcess,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
) -> None:
    daemon = daemon_factory([edge_server.address])
    daemon.start()
    sample = models.digits_sample()
    corrupt_png = bytearray(png(1))
    corrupt_png[40:80] = b"\x00" * 40
    bad = [
        ("bad-json", "sensors/s1/digits", b'{"id": "bad-json", "data": [1, 2', {}),
        ("short-raw", "sensors/s1/digits/raw", sample.x[0].tobytes()[:-3], {"id": "short-raw"}),
        (
            "odd-dtype",
            "sensors/s1/digits/raw",
            sample.x[0].tobytes(),
            {"id": "odd-dtype", "dtype": "complex-ish"},
        ),
        ("corrupt-png", "sensors/s1/digits/image", bytes(corrupt_png), {"id": "corrupt-png"}),
        ("wrong-shape", "sensors/s1/digits", json.dumps({"id": "wrong-shape", "data": [[1, 2], [3, 4]]}), {}),
        ("not-numbers", "sensors/s1/digits", json.dumps({"id": "not-numbers", "data": ["a", "b"]}), {}),
        ("gif", "sensors/s1/digits/image", _gif(), {"id": "gif"}),
    ]
    good: dict[str, int] = {}
    for n, (_name, topic, payload, props) in enumerate(bad):
        probe.publish(topic, payload, properties=props)
        good[f"good-{n}"] = n
        probe.publish(TOPIC, digit_json(n, f"good-{n}"))
    wait_until(lambda: len(probe.errors) >= len(bad), 30, "an error for each malformed message")
    probe.wait_answered(set(good))

    errors = {e["id"]: e for e in probe.errors}
    assert None in errors  # bad JSON: no id could be read
    assert set(errors) - {None} == {name for name, *_ in bad} - {"bad-json"}
    assert "not valid JSON" in errors[None]["error"]
    assert "needs 1024" in errors["short-raw"]["error"]
    assert "unknown dtype 'complex-ish'" in errors["odd-dtype"]["error"]
    assert "not a readable PNG or JPEG" in errors["corrupt-png"]["error"]
    assert "shape" in errors["wrong-shape"]["error"]
    assert "numbers" in errors["not-numbers"]["error"]
    assert "GIF" in errors["gif"]["error"]
    for name, i in good.items():
        (doc,) = probe.answered()[name]
        assert doc["top_k"] == reference(i)
    assert daemon.proc is not None and daemon.proc.poll() is None
    # Errors are acknowledged too: after a clean stop, the broker holds nothing for the daemon.
    assert daemon.terminate() == 0
    assert session_backlog(broker, DEVICE_CLIENT_ID) == []


def test_edge_server_killed_and_restarted(
    broker: Broker,
    edge_server: ServerProcess,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
) -> None:
    daemon = daemon_factory([edge_server.address])
    daemon.start()
    sent = publish_digits(probe, "before", 15)
    probe.wait_answered(set(sent))

    edge_server.kill()
    during = publish_digits(probe, "during", 15, offset=15)
    sent.update(during)
    probe.wait_answered(set(sent))
    assert all(probe.answered()[i][0]["fallback"] for i in during)

    edge_server.start()
    after: dict[str, int] = {}

    def offloaded_again() -> bool:
        message_id = f"after-{len(after)}"
        after[message_id] = len(after) % 200
        probe.publish(TOPIC, digit_json(after[message_id], message_id))
        wait_until(lambda: message_id in probe.answered(), 10, message_id)
        return probe.answered()[message_id][0]["fallback"] is False

    wait_until(offloaded_again, 30, "the daemon to use the restarted edge server", interval=0.2)
    sent.update(after)
    check_once(probe, sent, reference)  # bit-identical answers, offloaded or not
    assert any(doc["fallback"] for docs in probe.answered().values() for doc in docs)


def test_broker_restart_loses_nothing(
    broker: Broker,
    edge_server: ServerProcess,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
) -> None:
    daemon = daemon_factory([edge_server.address])
    daemon.start()
    sent = {f"first-{n}": n for n in range(100)}
    probe.publish_many([(TOPIC, digit_json(i, message_id)) for message_id, i in sent.items()])
    wait_until(lambda: len(probe.results) >= 1, 30, "the first result")
    broker.restart()  # mid-run: messages, results and acks in flight are cut off
    wait_until(lambda: daemon.text().count("connected to") >= 2, 60, "the daemon to reconnect")
    wait_until(lambda: probe.client.is_connected(), 30, "the probe to reconnect")
    sent.update(publish_digits(probe, "second", 20, offset=60))
    probe.wait_answered(set(sent), timeout=60)
    check_once(probe, sent, reference)
    assert "session resumed" in daemon.text()
    assert daemon.terminate() == 0
    assert session_backlog(broker, DEVICE_CLIENT_ID) == []


def test_daemon_killed_mid_run_loses_nothing(
    broker: Broker,
    edge_server: ServerProcess,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
) -> None:
    daemon = daemon_factory([edge_server.address])
    daemon.start()
    sent = publish_digits(probe, "a", 30)
    wait_until(lambda: len(probe.results) >= 1, 30, "the first result")
    daemon.signal(signal.SIGSTOP)  # frozen mid-run: what it holds now is received but unacknowledged
    answered_before = set(probe.answered())
    sent.update(publish_digits(probe, "b", 30, offset=30))
    daemon.kill()
    assert answered_before < set(sent)

    daemon.start()  # same client id, persistent session: the broker delivers what was not acknowledged
    probe.wait_answered(set(sent), timeout=60)
    check_once(probe, sent, reference)
    assert daemon.terminate() == 0
    assert session_backlog(broker, DEVICE_CLIENT_ID) == []


def test_sigterm_drains_and_exits_zero(
    tmp_path: Path,
    broker: Broker,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
) -> None:
    # An edge server that accepts connections and never answers: the first request waits for its
    # deadline, the circuit opens, and the rest finish locally; 200 messages keep the queue full
    # when SIGTERM arrives.
    profile = tmp_path / "slow.toml"
    profile.write_text(GENERIC.read_text().replace("timeout_s = 2.0", "timeout_s = 0.25"))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        daemon = daemon_factory([f"127.0.0.1:{silent.getsockname()[1]}"], profile=profile)
        daemon.start()
        sent = {f"queued-{n}": n for n in range(200)}
        probe.publish_many([(TOPIC, digit_json(i, message_id)) for message_id, i in sent.items()])
        wait_until(lambda: len(probe.results) >= 1, 30, "the first result")
        assert daemon.terminate() == 0

    wait_until(lambda: probe.retained.get("edge/generic-x86/availability") == b"offline", 10, "offline")
    drained = re.search(r"\((\d+) drained at shutdown\)", daemon.text())
    assert drained is not None and int(drained.group(1)) > 0
    assert re.search(r"stopping: finishing \d+ queued and \d+ in-flight message", daemon.text())
    answered = set(probe.answered())
    backlog = session_backlog(broker, DEVICE_CLIENT_ID)
    # Each message was either answered and acknowledged, or left for the next run; none both, none lost.
    assert answered | set(backlog) == set(sent)
    assert not answered & set(backlog)
    for message_id in answered:
        (doc,) = probe.answered()[message_id]
        assert doc["fallback"] is True and doc["top_k"] == reference(sent[message_id])


def test_stats_and_home_assistant_discovery(
    tmp_path: Path, broker: Broker, probe: Probe, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    profile = tmp_path / "stats.toml"
    text = GENERIC.read_text()
    text = text.replace("[stats]\ninterval_s = 30.0", "[stats]\ninterval_s = 0.5")
    text = text.replace(
        "[home_assistant]\nenabled = false", '[home_assistant]\nenabled = true\nname = "Test box"'
    )
    text = text.replace(EDGE_SERVER, "")  # no edge server: all local
    profile.write_text(text)
    daemon = daemon_factory([], profile=profile)
    daemon.start()
    sent = publish_digits(probe, "s", 5)
    probe.wait_answered(set(sent))
    wait_until(lambda: any(s["processed"] >= 5 for s in probe.stats), 10, "stats counting 5 results")

    stats = next(s for s in probe.stats if s["processed"] >= 5)
    assert stats["errors"] == 0 and stats["fallbacks"] == 0 and stats["p50_ms"] > 0
    assert {"queue_depth", "uptime_s", "duplicates"} <= set(stats)
    assert all(probe.answered()[i][0]["cut"] == 17 for i in sent)  # local: the whole model is the head
    label = json.loads(probe.retained["homeassistant/sensor/generic-x86/label/config"])
    assert label["state_topic"] == "edge/generic-x86/results"
    assert label["availability_topic"] == "edge/generic-x86/availability"
    assert label["device"]["name"] == "Test box"
    latency = json.loads(probe.retained["homeassistant/sensor/generic-x86/latency/config"])
    assert latency["state_topic"] == "edge/generic-x86/stats" and latency["unit_of_measurement"] == "ms"
    assert (
        label["origin"]["name"] == "edge-coop"
        and label["origin"]["sw_version"] == label["device"]["sw_version"]
    )

    # Home Assistant restarted: it says "online" on its status topic and expects discovery again.
    for topic in (
        "homeassistant/sensor/generic-x86/label/config",
        "homeassistant/sensor/generic-x86/latency/config",
    ):
        probe.retained.pop(topic)
    probe.publish("homeassistant/status", "online")
    wait_until(
        lambda: (
            "homeassistant/sensor/generic-x86/label/config" in probe.retained
            and "homeassistant/sensor/generic-x86/latency/config" in probe.retained
        ),
        10,
        "discovery published again",
    )
    # The status message was a cue, not a sensor message: no result and no error document for it.
    assert not any(e.get("topic") == "homeassistant/status" for e in probe.errors)


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (32, 32)).save(buf, "GIF")
    data = buf.getvalue()
    assert struct.unpack("<3s", data[:3])[0] == b"GIF"
    return data


def test_systemd_notify_ready_watchdog_stopping(
    tmp_path: Path,
    broker: Broker,
    probe: Probe,
    edge_server: ServerProcess,
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    """The daemon speaks sd_notify on $NOTIFY_SOCKET: READY once subscribed, WATCHDOG pings, STOPPING."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        daemon = daemon_factory([edge_server.address])
        daemon.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        states = [sock.recv(256).decode()]
        assert states == ["READY=1"]  # the first thing said, and only once subscribed
        assert " ready: " in daemon.text()
        states += [sock.recv(256).decode() for _ in range(3)]
        assert states[1:] == ["WATCHDOG=1"] * 3
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        while (state := sock.recv(256).decode()) == "WATCHDOG=1":
            pass
        assert state == "STOPPING=1"
        assert daemon.terminate() == 0


def test_poison_messages_each_get_an_error_and_do_not_stall_the_daemon(
    tmp_path: Path,
    broker: Broker,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
) -> None:
    """100 of every kind of message that once escaped the error path, then a good one."""
    profile = tmp_path / "local.toml"  # no edge server: all local
    profile.write_text(local_profile())
    daemon = daemon_factory([], profile=profile)
    daemon.start()
    sample = models.digits_sample()
    raw = sample.x[0].tobytes()
    kinds: dict[str, tuple[str, bytes | str, dict[str, str]]] = {
        "deep": ("sensors/s1/digits", '{"data": ' + "[" * 1000 + "]" * 1000 + "}", {}),
        "rank": ("sensors/s1/digits/raw", raw, {"shape": ",".join(["1"] * 65)}),
        "long-id": ("sensors/s1/digits", json.dumps({"id": "x" * 10_000, "data": [0] * 1024}), {}),
        "dtype": ("sensors/s1/digits/raw", raw, {"dtype": "V99999999999999999999"}),
    }
    sent: list[str] = []
    for kind, (topic, payload, props) in kinds.items():
        for n in range(100):
            message_id = f"{kind}-{n}"
            sent.append(message_id)
            probe.publish(
                topic, payload, properties={**props, "id": message_id} if kind != "long-id" else props
            )
    probe.publish(TOPIC, digit_json(5, "good"))
    probe.wait_answered({"good"}, timeout=120)
    wait_until(lambda: len(probe.errors) >= len(sent), 60, "an error document for every poison message")
    assert len(probe.errors) == len(sent)
    by_id: dict[str | None, list[str]] = {}
    for doc in probe.errors:
        by_id.setdefault(doc["id"], []).append(doc["error"])
    for kind in ("deep", "rank", "dtype"):
        for n in range(100):
            (error,) = by_id[f"{kind}-{n}"]
            assert {"deep": "nested deeper", "rank": "65 dimensions", "dtype": "unknown dtype"}[kind] in error
    assert len(by_id[None]) == 100 and all("characters; at most 256" in e for e in by_id[None])
    (good,) = probe.answered()["good"]
    assert good["top_k"] == reference(5)
    wait_until(lambda: any(s["errors"] >= len(sent) for s in probe.stats), 30, "stats counting the errors")


def test_a_reused_id_with_another_payload_is_an_error_and_2d_json_is_taken(
    tmp_path: Path,
    broker: Broker,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
) -> None:
    profile = tmp_path / "local.toml"  # no edge server: all local
    profile.write_text(local_profile())
    daemon = daemon_factory([], profile=profile)
    daemon.start()
    sample = models.digits_sample()
    probe.publish(TOPIC, digit_json(1, "same"))
    probe.wait_answered({"same"})
    probe.publish(TOPIC, digit_json(1, "same"))  # the same payload again: a duplicate, acknowledged
    probe.publish(TOPIC, digit_json(2, "same"))  # another payload under the same id
    two_d = sample.x[3].reshape(32, 32).tolist()
    probe.publish(TOPIC, json.dumps({"id": "two-d", "data": two_d}))
    probe.wait_answered({"two-d"})
    wait_until(lambda: len(probe.answered()["same"]) >= 2, 30, "an answer to the conflicting reuse")
    docs = probe.answered()["same"]
    assert len(docs) == 2 and docs[0]["top_k"] == reference(1)
    assert "answered already, for another payload" in docs[1]["error"]
    (doc,) = probe.answered()["two-d"]
    assert doc["top_k"] == reference(3)


def test_a_burst_of_2000_against_the_shipped_broker_config_is_answered_whole(
    tmp_path: Path, broker: Broker, probe: Probe, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Past a stock mosquitto's max_queued_messages (1,000), at full speed, while the daemon is online."""
    assert "max_queued_messages 100000" in broker.config.read_text()
    profile = tmp_path / "local.toml"  # no edge server: all local, the fastest the daemon goes
    text = local_profile()
    profile.write_text(text.replace("[stats]\ninterval_s = 30.0", "[stats]\ninterval_s = 0.5"))
    daemon = daemon_factory([], profile=profile)
    daemon.start()
    sent = {f"burst-{n}" for n in range(2000)}
    probe.publish_many([(TOPIC, digit_json(n % 200, f"burst-{n}")) for n in range(2000)])
    answered = probe.wait_answered(sent, timeout=180)
    assert sent <= set(answered)
    assert all(len(answered[i]) == 1 for i in sent)
    assert "dropped" not in broker.log.read_text()
    # The burst outran the daemon: it counted and said so.
    wait_until(lambda: any(s["behind"] > 0 for s in probe.stats), 40, "stats reporting the backlog")
    assert "falling behind" in daemon.text()


def test_a_shared_subscription_splits_the_messages_between_daemons(
    tmp_path: Path, broker: Broker, probe: Probe, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Two daemons on $share/pool/...: every message answered once, by one of them, and both work."""
    base = local_profile()
    watchers = []
    for name in ("pool-a", "pool-b"):
        text = base.replace('device_id = "generic-x86"', f'device_id = "{name}"')
        text = text.replace('topic = "sensors/+/digits"\n', 'topic = "$share/pool/sensors/+/digits"\n', 1)
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        watchers.append(Probe(broker, name, name=f"watch-{name}"))
        daemon_factory([], profile=path).start()
    try:
        sent = {f"shared-{n}" for n in range(200)}
        probe.publish_many([(TOPIC, digit_json(n % 200, f"shared-{n}")) for n in range(200)])
        wait_until(
            lambda: sent <= set(watchers[0].answered()) | set(watchers[1].answered()),
            60,
            "every message answered",
        )
        a, b = (set(w.answered()) & sent for w in watchers)
        assert a and b and not a & b and a | b == sent
    finally:
        for w in watchers:
            w.close()


def test_daemon_metrics_are_scraped_over_http(
    tmp_path: Path, broker: Broker, probe: Probe, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    import re
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    profile = tmp_path / "metrics.toml"
    text = local_profile()
    profile.write_text(text + "\n[metrics]\nenabled = true\nport = 0\n")
    daemon = daemon_factory([], profile=profile)
    daemon.start()
    sent = publish_digits(probe, "m", 5)
    probe.publish(TOPIC, b'{"id": "broken", "data": [1,')
    probe.wait_answered(set(sent))
    wait_until(lambda: len(probe.errors) >= 1, 30, "the error document")
    found = re.search(r"metrics on (http://\S+/metrics)", daemon.text())
    assert found is not None, daemon.text()
    with urllib.request.urlopen(found.group(1), timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert values[("edge_daemon_messages_total", (("outcome", "result"),))] == 5
    assert values[("edge_daemon_messages_total", (("outcome", "error"),))] == 1
    assert values[("edge_daemon_results_total", (("where", "local"),))] == 5
    assert values[("edge_daemon_cut", ())] == 17
    assert values[("edge_daemon_e2e_seconds_count", ())] == 5


def test_the_watchdog_rule_no_progress_while_messages_wait(tmp_path: Path, broker: Broker) -> None:
    """White-box, with a real broker connection: messages waiting and none answered for
    limits.stall_s makes the daemon unhealthy (no more WATCHDOG=1); an answer makes it healthy."""
    from edge.daemon import load, open_device, resolve
    from edge.daemon.ledger import Source
    from edge.daemon.mqtt import build_client
    from edge.daemon.service import Daemon, _Inbound

    path = tmp_path / "stall.toml"
    path.write_text(local_profile() + "\n[limits]\nstall_s = 0.2\n")
    resolved = resolve(load(path), path)
    client = build_client(resolved.profile, source=str(path))
    daemon = Daemon(resolved, open_device(resolved), client)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        daemon._ready.set()
        assert daemon._healthy()
        sensor = resolved.profile.sensors[0]
        item = _Inbound(Source(0, 1), sensor, TOPIC, digit_json(0, "w").encode(), False, {})
        daemon._last_progress = time.monotonic()
        daemon._queue.put(item)
        assert daemon._healthy()  # waiting, but not for long yet
        time.sleep(0.3)
        assert not daemon._healthy()
        daemon._process(daemon._queue.get())
        assert daemon._healthy()
    finally:
        client.loop_stop()
        client.disconnect()
        daemon.device.close()


def test_a_pipelined_burst_is_answered_in_arrival_order_bit_for_bit(
    tmp_path: Path,
    broker: Broker,
    edge_server: ServerProcess,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
    reference: Callable[[int], list[dict[str, object]]],
) -> None:
    """[queue] inflight = 4: messages overlap on one stream, and a malformed one among them is
    answered in its turn; results come out in the order the messages went in."""
    text = GENERIC.read_text()
    assert "inflight = 2" in text
    profile = tmp_path / "pipelined.toml"
    profile.write_text(text.replace("inflight = 2", "inflight = 4"))
    daemon = daemon_factory([edge_server.address], profile=profile)
    daemon.start()
    messages: list[tuple[str, bytes | str]] = []
    sent: dict[str, int] = {}
    for n in range(200):
        if n % 50 == 25:
            messages.append((TOPIC, json.dumps({"id": f"bad-{n}", "data": [1, 2, 3]})))
            continue
        sent[f"p-{n}"] = n % 200
        messages.append((TOPIC, digit_json(n % 200, f"p-{n}")))
    probe.publish_many(messages)
    answered = probe.wait_answered(set(sent) | {f"bad-{n}" for n in range(25, 200, 50)}, timeout=120)
    order = [doc["id"] for doc in probe.results]
    assert order == list(sent)  # arrival order
    for message_id, i in sent.items():
        (doc,) = answered[message_id]
        assert doc["top_k"] == reference(i), message_id
        assert doc["cut"] == 8 and doc["fallback"] is False
    assert len(probe.errors) == 4
    assert "up to 4 messages in flight" in daemon.text()
