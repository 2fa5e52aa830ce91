"""Slow links: a real TLS edge-server behind a real delay proxy (RTT 200 ms), and a plaintext one at
RTT 400 ms. Connecting takes several round trips (TCP, TLS, HTTP/2 settings), more than gRPC's
100 ms minimum connect timeout that the device used to set; the connection now has a deadline of
its own (--connect-timeout, default 5 s), apart from each request's.

Covered: `edge infer` over TLS at RTT 200 ms and plaintext at RTT 400 ms offloads every request
(and, with the old 100 ms connect limit given back as --connect-timeout 0.1, falls back: the
check can fail); `edge plan` sees the server through the slow link; a TailClient's first request
is not charged for connecting (its deadline is shorter than the set-up and it still succeeds); a
burst of 24 pipelined requests over the TLS link goes stacked, each with the whole model's outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slowlink import MODEL, slow_links

from edge import models
from edge.credentials import TLSOptions
from edge.transport import TailClient

CUT = 8


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    with slow_links(tmp_path_factory.mktemp("slow")) as found:
        yield found


def _infer(link: dict[str, object], which: str, *extra: str) -> subprocess.CompletedProcess[str]:
    tls = ["--tls-ca", str(link["ca"])] if which == "tls" else []
    return subprocess.run(
        [sys.executable, "-m", "edge", "infer", "--model", MODEL, "--server", str(link[which]),
         "--split-at", str(CUT), "--timeout", "5", "--input", str(link["x"]), *tls, *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("which", ["tls", "plain"])
def test_infer_offloads_over_a_slow_link(link: dict[str, object], which: str) -> None:
    for _ in range(3):
        proc = _infer(link, which)
        assert proc.returncode == 0, proc.stderr
        assert "fallback" not in proc.stderr, proc.stderr


def test_the_old_100_ms_connect_limit_falls_back(link: dict[str, object]) -> None:
    proc = _infer(link, "tls", "--connect-timeout", "0.1")
    assert proc.returncode == 0 and "fallback" in proc.stderr and "connect" in proc.stderr, proc.stderr


def test_plan_sees_the_server_over_a_slow_tls_link(link: dict[str, object]) -> None:
    tmp = Path(str(link["tmp"]))
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "plan", MODEL, "--server", str(link["tls"]), "--tls-ca", str(link["ca"]),
         "--timeout", "10", "--json"],
        capture_output=True, text=True, timeout=300, env={"EDGE_CACHE_DIR": str(tmp / "cache"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["server_reachable"] is True, plan
    assert plan["link"]["rtt_ms"] >= 150, plan["link"]


def test_connecting_does_not_count_against_a_request_deadline(link: dict[str, object]) -> None:
    """Set-up takes at least 3 round trips here (600 ms); a 0.45 s request deadline holds the request's
    own round trip (200 ms) but not the set-up as well."""
    graph_inputs = {"serving_default_image:0": models.digits_sample().x[:1]}
    from edge.graph import ModelGraph
    from edge.runner import ModelRunner
    from edge.wire import MODEL_SHA256, SPLIT_POINT

    graph = ModelGraph.from_file(models.model_path(MODEL))
    with ModelRunner(graph) as runner:
        cut = runner.run_head(CUT, graph_inputs).cut
    client = TailClient(
        str(link["tls"]), tls=TLSOptions(ca_file=Path(str(link["ca"]))), timeout_s=0.45, streaming=False
    )
    with client:
        started = time.perf_counter()
        result = client.infer(MODEL, cut, parameters={MODEL_SHA256: graph.sha256, SPLIT_POINT: CUT})
        assert time.perf_counter() - started > 0.6  # the set-up really was slower than the deadline
        assert result.outputs


def test_a_burst_over_the_slow_tls_link_goes_stacked_and_each_gets_its_own_outputs(
    link: dict[str, object],
) -> None:
    """24 requests submitted at once over TLS at RTT 200 ms: two go alone, the rest wait for the first
    answer and go stacked (at most 8 a message); each equals the whole model's outputs for its input."""
    import numpy as np

    from edge import wire
    from edge.graph import ModelGraph
    from edge.runner import ModelRunner
    from helpers import same_outputs, seeded_inputs

    graph = ModelGraph.from_file(models.model_path(MODEL))
    inputs = [seeded_inputs(graph, 300 + i) for i in range(24)]
    with ModelRunner(graph) as runner:
        expected = [runner.run(x) for x in inputs]
        cuts = [dict(runner.run_head(CUT, x).cut) for x in inputs]
    tls = TLSOptions(ca_file=Path(str(link["ca"])))
    with TailClient(str(link["tls"]), tls=tls, timeout_s=30.0) as client:
        futures = [client.submit(MODEL, c, parameters={wire.SPLIT_POINT: CUT}) for c in cuts]
        results = [f.result(timeout=120) for f in futures]
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        assert same_outputs(result.outputs, want), i
    sizes = [int(r.parameters.get(wire.BATCH_SIZE, 1)) for r in results]
    assert 1 < max(sizes) <= 8, sizes
    assert np.mean(sizes) > 2, sizes  # most of the burst went stacked
