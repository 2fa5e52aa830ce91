#!/usr/bin/env python3
"""Messages per second the daemon answers in a burst: device alone, and cooperative at [queue] inflight W.

A real mosquitto (the shipped config), ``edge-server`` pinned to ``--server-core`` and the daemon
(``edge run`` with the generic-x86 profile: digits_resnet, cut 8) pinned to ``--daemon-core``. A
probe publishes ``-n`` JSON digit messages at once; the rate is messages over the time from the
first publish to the last answer. Rounds alternate the settings; figures are medians.

    python bench/daemon_burst.py
    python bench/daemon_burst.py -n 2000 --rounds 5 --inflight 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from daemon.daemon_harness import GENERIC, Broker, DaemonProcess, Probe, ServerProcess  # noqa: E402

from edge import models  # noqa: E402

TOPIC = "sensors/s1/digits"
SERVER_ENTRY = '[[edge.servers]]\naddress = "localhost:8001"\n'


def burst(
    workdir: Path, broker: Broker, inflight: int | None, server: ServerProcess, args: argparse.Namespace
) -> float:
    text = GENERIC.read_text()
    if inflight is None:
        text = text.replace(SERVER_ENTRY, "")  # the device alone
    else:
        text = text.replace("inflight = 2", f"inflight = {inflight}")
    workdir.mkdir(parents=True, exist_ok=True)
    profile = workdir / f"profile-{inflight}.toml"
    profile.write_text(text)
    daemon = DaemonProcess(workdir, profile, broker.address, [] if inflight is None else [server.address])
    daemon.start()
    assert daemon.proc is not None
    os.sched_setaffinity(daemon.proc.pid, {args.daemon_core})
    probe = Probe(broker, "generic-x86", name=f"burst-{inflight}-{time.monotonic_ns()}")
    try:
        sample = models.digits_sample().x
        messages = [
            (TOPIC, json.dumps({"id": f"b-{i}", "data": sample[i % 200].tolist()})) for i in range(args.n)
        ]
        started = time.perf_counter()
        probe.publish_many(messages)
        probe.wait_answered({f"b-{i}" for i in range(args.n)}, timeout=300)
        elapsed = time.perf_counter() - started
        fallbacks = sum(bool(doc.get("fallback")) for doc in probe.results)
        if inflight is not None and fallbacks:
            print(f"warning: {fallbacks} fallbacks at inflight {inflight}", file=sys.stderr)
        return args.n / elapsed
    finally:
        probe.close()
        daemon.terminate()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1000, help="messages per burst")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inflight", default="1,2,4")
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--daemon-core", type=int, default=0)
    args = p.parse_args()
    settings: list[int | None] = [None, *(int(w) for w in args.inflight.split(","))]
    rates: dict[int | None, list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The probe (this process) and the broker share the server's core: the daemon has its own.
        os.sched_setaffinity(0, {args.server_core})
        broker = Broker(work / "broker")
        broker.start()
        assert broker.proc is not None
        os.sched_setaffinity(broker.proc.pid, {args.server_core})
        server = ServerProcess(work / "server")
        server.start()
        assert server.proc is not None
        os.sched_setaffinity(server.proc.pid, {args.server_core})
        try:
            for r in range(args.rounds):
                for setting in settings:
                    rates[setting].append(burst(work / f"r{r}-{setting}", broker, setting, server, args))
        finally:
            server.kill()
            broker.stop()
    print(f"{args.n} messages a burst, median of {args.rounds} rounds (range)")
    print("| daemon | messages/s |")
    print("|---|---:|")
    for setting, values in rates.items():
        label = "device alone" if setting is None else f"cooperative, inflight {setting}"
        print(f"| {label} | {statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
