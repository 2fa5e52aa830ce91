#!/usr/bin/env python3
"""Footprint of ``edge run``: memory (VmRSS, VmHWM) and cold start to the first published result.

Starts a private mosquitto on a free loopback port and an edge server in this process
(``server.embedded.BackgroundServer``), then runs the daemon as a subprocess, the way
systemd would, with a shipped profile:

1. a first run creates the daemon's persistent session, then stops (SIGTERM);
2. one sensor message is published while the daemon is down, so it waits in the session;
3. for each cold start: spawn ``python -m edge run``, time the first result on the results
   topic (from spawn: interpreter, imports, profile, model, broker, subscription, inference),
   and time READY (the log's ``ready:`` line);
4. then a burst of messages, and the process's VmRSS and VmHWM from /proc.

A benchmark, not a test: it prints figures and asserts nothing about them.

    python tools/daemon_footprint.py [--profile generic-x86] [--runs 5] [--messages 500] [--local] [--json]
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edge import models
from edge.daemon import find, load
from server.embedded import BackgroundServer

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.002)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class Broker:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        config = workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
            f"persistence true\npersistence_location {workdir}/\nmax_queued_messages 0\n"
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait(listening, 10, "mosquitto")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Probe:
    """Publishes sensor messages; timestamps the daemon's results as they arrive."""

    def __init__(self, port: int, device_id: str) -> None:
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, str]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edge/{device_id}/results", qos=1)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("probe subscription")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = time.time()  # wall clock, to compare with the daemon's log timestamps
        with self.lock:
            self.arrivals.append((now, json.loads(message.payload)["id"]))

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def arrived(self, message_id: str) -> float | None:
        with self.lock:
            return next((t for t, i in self.arrivals if i == message_id), None)

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for _, i in self.arrivals if i.startswith(prefix))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="generic-x86", help="profile name or file (default: %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="cold starts to time (default: %(default)s)")
    p.add_argument("--messages", type=int, default=500, help="messages in the burst (default: %(default)s)")
    p.add_argument("--local", action="store_true", help="no edge server: the daemon runs the whole model")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()

    profile_path = find(args.profile)
    profile = load(profile_path)
    topic = (
        next(s.topic for s in profile.sensors if s.format == "json")
        .replace("+", "bench")
        .replace("#", "bench")
    )
    sample = models.digits_sample()

    def message(message_id: str, i: int) -> str:
        return json.dumps({"id": message_id, "data": sample.x[i % len(sample.x)].tolist()})

    with tempfile.TemporaryDirectory(prefix="edge-footprint-") as tmp:
        broker = Broker(Path(tmp))
        server = None if args.local else BackgroundServer.from_files([models.model_path("digits_resnet")])
        if server is not None:
            server.start()
        probe = Probe(broker.port, profile.device_id)
        command = [sys.executable, "-m", "edge", "-v", "run", "--config", str(profile_path)]
        command += ["--broker", f"127.0.0.1:{broker.port}"]
        if server is not None:
            command += ["--server", server.address]
        else:
            local = Path(tmp) / f"{profile_path.stem}-local.toml"
            local.write_text(_without_servers(profile_path.read_text()))
            command[command.index(str(profile_path))] = str(local)
        log_path = Path(tmp) / "daemon.log"

        def spawn() -> subprocess.Popen[bytes]:
            with log_path.open("ab") as log:
                return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

        def ready_count() -> int:
            return log_path.read_text(errors="replace").count(" ready: ")

        try:
            # The first run creates the persistent session that later messages wait in.
            daemon = spawn()
            wait(lambda: ready_count() >= 1, 60, "the first run to be ready")
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)

            phases: dict[str, list[float]] = {"to_connecting": [], "to_ready": [], "to_first_result": []}
            for run in range(args.runs):
                message_id = f"cold-{run}"
                probe.publish(topic, message(message_id, run))  # waits in the session
                before = ready_count()
                spawned = time.time()
                daemon = spawn()
                wait(
                    lambda message_id=message_id: probe.arrived(message_id) is not None,
                    60,
                    "the first result",
                )
                wait(lambda before=before: ready_count() > before, 10, "the ready line")
                first = probe.arrived(message_id)
                assert first is not None
                # The log holds the first run's lines too: cold start `run` is the (run + 2)-th.
                connecting, ready = _log_times(log_path, run + 2)
                phases["to_connecting"].append(connecting - spawned)
                phases["to_ready"].append(ready - spawned)
                phases["to_first_result"].append(first - spawned)
                if run < args.runs - 1:
                    daemon.send_signal(signal.SIGTERM)
                    daemon.wait(30)

            idle = proc_status(daemon.pid)
            burst_started = time.perf_counter()
            for n in range(args.messages):
                probe.client.publish(topic, message(f"burst-{n}", n), qos=1)
            wait(lambda: probe.count("burst-") >= args.messages, 120, "the burst's results")
            burst_s = time.perf_counter() - burst_started
            loaded = proc_status(daemon.pid)
            daemon.send_signal(signal.SIGTERM)
            status = daemon.wait(30)
        finally:
            probe.client.loop_stop()
            if server is not None:
                server.stop()
            broker.close()

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    figures = {
        "profile": str(profile_path),
        "mode": "local" if args.local else "cooperative",
        "cold_starts": args.runs,
        "spawn_to_connecting_s": spread(phases["to_connecting"]),
        "spawn_to_ready_s": spread(phases["to_ready"]),
        "spawn_to_first_result_s": spread(phases["to_first_result"]),
        "rss_idle_mib": round(idle["VmRSS"] / 1024, 1),
        "rss_after_burst_mib": round(loaded["VmRSS"] / 1024, 1),
        "hwm_mib": round(loaded["VmHWM"] / 1024, 1),
        "burst_messages": args.messages,
        "burst_msgs_per_s": round(args.messages / burst_s, 1),
        "exit_status": status,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"edge run --config {args.profile} ({figures['mode']}), {args.runs} cold starts, medians (min-max):"
    )
    for key, label in [
        ("spawn_to_connecting_s", "spawn -> connecting (imports, profile, model)"),
        ("spawn_to_ready_s", "spawn -> READY (connected, subscribed)"),
        ("spawn_to_first_result_s", "spawn -> first result published"),
    ]:
        v = figures[key]
        print(f"  {label:<48} {v['median']:.3f} s ({v['min']:.3f}-{v['max']:.3f})")
    print(
        f"  VmRSS idle {figures['rss_idle_mib']} MiB; after {args.messages} messages "
        f"{figures['rss_after_burst_mib']} MiB; VmHWM {figures['hwm_mib']} MiB"
    )
    print(f"  burst: {figures['burst_msgs_per_s']} messages/s; exit status after SIGTERM: {status}")
    return 0


def _without_servers(text: str) -> str:
    """The profile's TOML without its [[edge.servers]] tables: everything runs on the device."""
    kept, skipping = [], False
    for line in text.splitlines():
        header = line.strip()
        if header.startswith("["):
            skipping = header.startswith(("[[edge.servers]]", "[edge.servers."))
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _log_times(log_path: Path, nth: int) -> tuple[float, float]:
    """Wall-clock times of the n-th (from 1) 'connecting to' and 'ready:' lines in the daemon's log."""

    def stamp(marker: str) -> float:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if marker in line]
        when = datetime.strptime(lines[nth - 1][:23], "%Y-%m-%d %H:%M:%S,%f")
        return when.timestamp()

    return stamp(" connecting to "), stamp(" ready: ")


if __name__ == "__main__":
    sys.exit(main())
