"""edge-server's Prometheus metrics, scraped over HTTP from a real server process and parsed.

Covered: requests counted by model, cut and status (OK and a refusal); the compute histogram
holds one sample per answered request; bytes in and out; the in-flight gauge back at zero; a
stacked request of 3 samples is one request whose batch size is 3; in a process of several, the
tail-cache counts written as increments, a runner that counts from 0 again adding its own; the
answers one process tallies export the same samples as prometheus-client's own metrics would.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from server_metrics import scrape, serve_with_metrics

from edge import models
from edge.errors import RemoteError
from edge.runner import ModelRunner
from edge.transport import TailClient
from helpers import seeded_inputs

MODEL = "digits_resnet"


def test_metrics_count_what_the_server_did(tmp_path: Path, graphs: dict) -> None:
    proc, url, port, _ = serve_with_metrics(tmp_path)
    try:
        graph = graphs[MODEL]
        x = seeded_inputs(graph, 0)
        with ModelRunner(graph) as runner:
            cut = runner.run_head(8, x).cut
        with TailClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
            client.wait_ready(30.0)
            for _ in range(5):
                client.infer(MODEL, cut, parameters={"split_point": 8})
            try:
                client.infer(MODEL, cut, parameters={"split_point": 999})
            except RemoteError:
                pass
        samples = scrape(url)
        ok = (("cut", "8"), ("model", MODEL), ("status", "OK"))
        bad = (("cut", ""), ("model", MODEL), ("status", "INVALID_ARGUMENT"))
        assert samples[("edge_requests_total", ok)] == 5
        assert samples[("edge_requests_total", bad)] == 1
        assert samples[("edge_compute_seconds_count", (("cut", "8"), ("model", MODEL)))] == 5
        sent = sum(a.nbytes for a in cut.values())
        assert samples[("edge_received_bytes_total", (("model", MODEL),))] == 5 * sent
        assert samples[("edge_sent_bytes_total", (("model", MODEL),))] == 5 * 10
        assert samples[("edge_requests_in_flight", ())] == 0
        assert samples[("edge_compute_waiting", ())] == 0
        assert samples[("edge_batch_size_count", (("model", MODEL),))] == 5
        assert samples[("edge_batch_size_sum", (("model", MODEL),))] == 5  # each alone
        # The tail of cut 8 was loaded once, then found loaded four times.
        assert samples[("edge_tail_loads_total", (("model", MODEL),))] == 1
        assert samples[("edge_tail_cache_hits_total", (("model", MODEL),))] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_refusals_are_counted_and_shutdown_is_logged(tmp_path: Path, graphs: dict) -> None:
    """Calls refused for want of a token count in edge_refused_total; SIGTERM says so in the log."""
    tokens = tmp_path / "tokens"
    tokens.write_text("dev1 device-token-0123456789abcdef\n")
    proc, url, port, log = serve_with_metrics(tmp_path, "--auth-tokens", str(tokens))
    try:
        graph = graphs[MODEL]
        with ModelRunner(graph) as runner:
            cut = runner.run_head(8, seeded_inputs(graph, 0)).cut
        for token in (None, "not-a-known-token-0123", "not-a-known-token-4567"):
            with TailClient(f"127.0.0.1:{port}", timeout_s=10.0, token=token, streaming=False) as client:
                try:
                    client.infer(MODEL, cut, parameters={"split_point": 8})
                except RemoteError as err:
                    assert err.status == "UNAUTHENTICATED"
        samples = scrape(url)
        assert samples[("edge_refused_total", (("reason", "no_token"),))] == 1
        assert samples[("edge_refused_total", (("reason", "unknown_token"),))] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "edge-server: stopping" in text and "edge-server: stopped after" in text, text[-1500:]


def test_the_shipped_dashboard_and_scrape_config_name_metrics_that_exist() -> None:
    """Every metric the Grafana dashboard queries is one the server or the daemon exports."""
    import json

    from edge.daemon.metrics import DaemonMetrics
    from helpers import REPO
    from server.metrics import ServerMetrics

    exported = set()
    for registry in (ServerMetrics().registry, DaemonMetrics().registry):
        for family in registry.collect():
            exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket"}
    dashboard = json.loads((REPO / "firmware_config" / "monitoring" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(edge_[a-z0-9_]+)", target["expr"])
    }
    assert queried and queried <= exported, queried - exported
    assert "edge-server" in (REPO / "firmware_config" / "monitoring" / "prometheus.yml").read_text()


def test_a_metrics_port_in_use_is_one_error_and_exit_2(tmp_path: Path) -> None:
    import socket

    (tmp_path / f"{MODEL}.tflite").write_bytes(models.model_path(MODEL).read_bytes())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "server", "--models", str(tmp_path), "--host", "127.0.0.1",
             "--port", "0", "--metrics-port", str(taken.getsockname()[1])],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-server: error:")]
    assert len(errors) == 1 and "cannot serve metrics on 127.0.0.1:" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_half_open_connections_cannot_take_the_metrics_threads(tmp_path: Path) -> None:
    """300 connections that never send a request made 312 threads (one each, no timeout). Now the
    endpoint holds a bounded number, closes the rest as they come, and still answers a scrape."""
    import socket

    proc, url, _, _ = serve_with_metrics(tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:"), url  # loopback by default: no TLS, no token there
        host, metrics_port = url.split("//")[1].split("/")[0].split(":")
        idle = []
        for _ in range(300):
            try:
                idle.append(socket.create_connection((host, int(metrics_port)), timeout=5))
            except OSError:
                break
        time.sleep(0.5)
        threads = int(Path(f"/proc/{proc.pid}/status").read_text().split("Threads:")[1].split()[0])
        assert threads < 60, f"{threads} threads with {len(idle)} idle metrics connections"
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert ("edge_requests_in_flight", ()) in scrape(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_stacked_request_counts_its_samples_as_computed_together(tmp_path: Path, graphs: dict) -> None:
    import numpy as np

    proc, url, port, _ = serve_with_metrics(tmp_path)
    try:
        graph = graphs[MODEL]
        with ModelRunner(graph) as runner:
            cuts = [runner.run_head(8, seeded_inputs(graph, seed)).cut for seed in (1, 2, 3)]
        stacked = {name: np.concatenate([c[name] for c in cuts]) for name in cuts[0]}
        with TailClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
            client.wait_ready(30.0)
            client.infer(MODEL, stacked, parameters={"split_point": 8, "edge_stack": 3})
        samples = scrape(url)
        assert samples[("edge_requests_total", (("cut", "8"), ("model", MODEL), ("status", "OK")))] == 1
        assert samples[("edge_batch_size_count", (("model", MODEL),))] == 1
        assert samples[("edge_batch_size_sum", (("model", MODEL),))] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_process_of_several_writes_the_tail_cache_counts_as_increments() -> None:
    """``ServerMetrics(multiprocess=True)``: each refresh adds what the served runners counted since
    the last; a runner that counts from 0 again (a replaced model, even at a freed runner's address)
    adds its own counts, never a negative step (which prometheus-client refuses, ending the refresh)."""
    from types import SimpleNamespace

    from server.metrics import ServerMetrics

    metrics = ServerMetrics(multiprocess=True)
    runner = SimpleNamespace(half_hits=5, half_loads=1)
    served = [("m", runner)]
    metrics.watch(lambda: 3, lambda: served, lambda: 2)

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "m"})

    metrics.refresh()
    assert (value("edge_tail_cache_hits_total"), value("edge_tail_loads_total")) == (5, 1)
    assert metrics.registry.get_sample_value("edge_compute_waiting") == 3
    assert metrics.registry.get_sample_value("edge_requests_in_flight") == 2  # written, not read live
    metrics.refresh()  # nothing new
    assert (value("edge_tail_cache_hits_total"), value("edge_tail_loads_total")) == (5, 1)
    runner.half_hits, runner.half_loads = 2, 1  # counts from 0 again, at the same address
    metrics.refresh()
    assert (value("edge_tail_cache_hits_total"), value("edge_tail_loads_total")) == (7, 2)


def test_answers_tallied_in_one_process_export_what_prometheus_clients_own_metrics_would() -> None:
    """One process tallies each answer in plain Python and builds the metric families when scraped; a
    process of several counts into prometheus-client's Counter and Histogram. The same answers give
    the same samples in both (every sample but the ``_created`` times, which only the latter has):
    values exactly on bucket bounds (a bound holds its own value), past the last bound, several models,
    cuts and statuses, error answers (counted, with no times or sizes)."""
    from server.metrics import ServerMetrics

    answers = [
        ("a", "8", "OK", 0.0001, 0.00025, 0.0005, 1, 100, 10),
        ("a", "8", "OK", 0.00011, 0.0025, 2.5, 8, 200, 20),
        ("a", "12", "OK", 0.0, 3.0, 7.0, 300, 50, 5),
        ("a", "12", "RESOURCE_EXHAUSTED", 0.0, 0.0, 0.0, 1, 0, 0),
        ("b", "whole", "OK", 1.0, 0.05, 0.1, 3, 7, 1),
        ("(unknown)", "", "NOT_FOUND", 0.0, 0.0, 0.0, 1, 0, 0),
        ("a", "8", "OK", 0.001, 0.001, 0.001, 2, 1, 1),
    ]

    def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        for answer in answers:
            model, cut, status, queue_s, compute_s, total_s, batch, bytes_in, bytes_out = answer
            metrics.answered(
                model, cut, status, queue_s=queue_s, compute_s=compute_s, total_s=total_s, batch=batch,
                bytes_in=bytes_in, bytes_out=bytes_out,
            )  # fmt: skip
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.registry.collect()
            for s in family.samples
            if not s.name.endswith("_created") and s.name != "edge_refused_total"
        }

    tallied, counted = samples(ServerMetrics()), samples(ServerMetrics(multiprocess=True))
    assert tallied == counted
    assert tallied[("edge_requests_total", (("cut", "8"), ("model", "a"), ("status", "OK")))] == 3
    assert tallied[("edge_compute_seconds_bucket", (("cut", "8"), ("le", "0.00025"), ("model", "a")))] == 1
    assert tallied[("edge_batch_size_bucket", (("le", "+Inf"), ("model", "a")))] == 4
    assert tallied[("edge_batch_size_bucket", (("le", "256.0"), ("model", "a")))] == 3
