#!/usr/bin/env python3
"""edge-server's memory and health under each hostile caller of issue 21, one after another.

A real server process (digits_resnet, tokens on, metrics on loopback), and for each attack: its RSS
before, at its peak (sampled every 20 ms from /proc) and 2 s after, and the slowest answer a health
Check got while it ran (one every 50 ms). Run: ``python bench/hostile_rss.py [--json]``.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge import models
from edge.protocol import pb, pb_grpc

TOKEN = "device-token-0123456789abcdef"
MODEL = "digits_resnet"


def _rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


class _Watch:
    """RSS and health latency sampled while an attack runs."""

    def __init__(self, pid: int, address: str) -> None:
        self.pid, self.address = pid, address
        self.peak = 0.0
        self.slowest_health_ms = 0.0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._rss, daemon=True),
            threading.Thread(target=self._health, daemon=True),
        ]

    def __enter__(self) -> _Watch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _rss(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib(self.pid))
            time.sleep(0.02)

    def _health(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                except grpc.RpcError:
                    pass
                self.slowest_health_ms = max(self.slowest_health_ms, (time.perf_counter() - started) * 1000)
                time.sleep(0.05)


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="serving_default_image:0", datatype="INT8", shape=[1, 32, 32, 1])
    request.raw_input_contents.append(np.zeros((1, 32, 32, 1), np.int8).tobytes())
    return request


def unread_stream(address: str) -> None:
    with grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        request = _request()

        def requests():  # type: ignore[no-untyped-def]
            for i in range(50_000):
                request.id = str(i)
                yield request

        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            requests(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60
        )
        time.sleep(6)
        call.cancel()


def huge_counts(address: str) -> None:
    message = pb.ModelInferRequest(model_name=MODEL)
    for i in range(500_000):
        message.parameters[f"p{i}"].int64_param = i
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(5):
            try:
                stub.ModelInfer(message, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
            except grpc.RpcError:
                pass


def big_messages(address: str) -> None:
    big = _request()
    big.raw_input_contents[0] = b"\0" * (16 << 20)
    errors: list[str] = []

    def send() -> None:
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            try:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    big, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30
                )
            except grpc.RpcError as err:
                errors.append(err.code().name)

    threads = [threading.Thread(target=send) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def watch_streams(address: str) -> None:
    channels, calls = [], []
    for _ in range(300):
        channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        channels.append(channel)
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        try:
            next(call)
            calls.append(call)
        except grpc.RpcError:
            pass
    time.sleep(2)
    for call in calls:
        call.cancel()
    for channel in channels:
        channel.close()


def half_open_metrics(metrics_port: int) -> None:
    socks = []
    for _ in range(300):
        try:
            socks.append(socket.create_connection(("127.0.0.1", metrics_port), timeout=5))
        except OSError:
            break
    time.sleep(3)
    for sock in socks:
        sock.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "models").mkdir()
    (tmp / "models" / f"{MODEL}.tflite").write_bytes(models.model_path(MODEL).read_bytes())
    (tmp / "tokens").write_text(f"dev1 {TOKEN}\n")
    log = tmp / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--models", str(tmp / "models"), "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", "--auth-tokens", str(tmp / "tokens")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.05)
        address = f"127.0.0.1:{m.group(1)}"
        metrics_port = int(re.search(r"metrics on http://[\d.]+:(\d+)", log.read_text()).group(1))  # type: ignore[union-attr]
        time.sleep(1)
        attacks: dict[str, Callable[[], None]] = {
            "a stream whose answers are never read (50,000 written)": lambda: unread_stream(address),
            "500,000 request parameters, 5 times": lambda: huge_counts(address),
            "32 concurrent 16 MiB messages": lambda: big_messages(address),
            "300 health Watch streams without a token": lambda: watch_streams(address),
            "300 half-open metrics connections": lambda: half_open_metrics(metrics_port),
        }
        rows = []
        for name, attack in attacks.items():
            before = _rss_mib(proc.pid)
            with _Watch(proc.pid, address) as watch:
                attack()
            time.sleep(2)
            rows.append({"attack": name, "rss_before_mib": round(before, 1), "rss_peak_mib": round(watch.peak, 1),
                         "rss_after_mib": round(_rss_mib(proc.pid), 1),
                         "slowest_health_ms": round(watch.slowest_health_ms, 1)})  # fmt: skip
            if not args.json:
                r = rows[-1]
                print(f"{name}: RSS {r['rss_before_mib']} -> peak {r['rss_peak_mib']} -> {r['rss_after_mib']} MiB; "
                      f"slowest health Check {r['slowest_health_ms']} ms", flush=True)  # fmt: skip
        if args.json:
            print(json.dumps(rows, indent=1))
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
