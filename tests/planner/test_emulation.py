"""The benchmark's pure parts and its delay proxy, on loopback and without root."""

from __future__ import annotations

import asyncio

import pytest

from edge.emulation.dilation import DilatedRunner
from edge.emulation.netns import EmulationError
from edge.emulation.proxy import DelayProxy
from edge.emulation.report import summarize
from edge.emulation.sweep import scenarios_from
from edge.runner import ModelRunner
from helpers import seeded_inputs


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("delay_s", [0.0, 0.002])
def test_proxy_forwards_every_byte_in_order(delay_s):
    async def scenario() -> tuple[bytes, bytes, DelayProxy]:
        upstream = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        proxy = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), delay_s)
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        # Many small writes interleaved with one large one: order must survive the delay queue.
        sent = b"".join(i.to_bytes(4, "big") for i in range(5000)) + bytes(range(256)) * 2000
        for offset in range(0, len(sent), 7919):
            writer.write(sent[offset : offset + 7919])
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(sent)), timeout=30)
        writer.close()
        await proxy.close()
        upstream.close()
        await upstream.wait_closed()
        return sent, got, proxy

    sent, got, proxy = asyncio.run(scenario())
    assert got == sent
    assert proxy.up.bytes == proxy.down.bytes == len(sent)


def test_proxy_holds_each_chunk_for_its_delay():
    async def scenario() -> DelayProxy:
        upstream = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        proxy = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), 0.005)
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for _ in range(5):
            writer.write(b"ping")
            await reader.readexactly(4)
        writer.close()
        await proxy.close()
        upstream.close()
        return proxy

    proxy = asyncio.run(scenario())
    # A chunk never leaves before its release time (arrival + delay); lateness is never negative.
    assert proxy.up.chunks == proxy.down.chunks == 5
    assert min(proxy.up.late_s + proxy.down.late_s) >= 0.0


def test_dilated_runner_keeps_outputs_and_labels_its_profile(graphs):
    graph = graphs["digits_tiny"]
    feeds = seeded_inputs(graph, 0)
    with ModelRunner(graph) as plain, DilatedRunner(graph, factor=4.0) as slow:
        for name, array in plain.run(feeds).items():
            assert (slow.run(feeds)[name] == array).all()
            assert (slow.run_head(graph.num_operators, feeds).outputs[name] == array).all()
        assert slow.profile_label == "dilated4x"
    with pytest.raises(ValueError):
        DilatedRunner(graph, factor=0.5)


def test_scenario_grid_and_subsets():
    grid = scenarios_from([1, 10, 100], [5, 40], [1, 4])
    assert len(grid) == 12 and len({s.key for s in grid}) == 12
    assert [s.key for s in scenarios_from([1, 10, 100], [5, 40], [1, 4], ["10mbit-40ms-4x"])] == [
        "10mbit-40ms-4x"
    ]
    with pytest.raises(EmulationError, match="unknown scenario"):
        scenarios_from([1], [5], [1], ["3mbit-5ms-1x"])


def _cut(index: int, median: float, *, pruned: bool = False, fallbacks: int = 0) -> dict:
    return {"index": index, "median_ms": median, "pruned": pruned, "fallbacks": fallbacks}


@pytest.mark.parametrize(
    ("choice", "ratio", "best"),
    [
        (3, 1.0, 3),  # the planner found the best cut
        (4, 12.0 / 10.0, 3),  # 20% slower than the best
        (0, 40.0 / 10.0, 3),
    ],
)
def test_summary_compares_choice_with_best(choice, ratio, best):
    result = {
        "num_operators": 4,
        "choice": choice,
        # Cut 1 was pruned (pilots only) and cut 2 fell back: neither can be "best".
        "cuts": [
            _cut(0, 40.0),
            _cut(1, 5.0, pruned=True),
            _cut(2, 1.0, fallbacks=1),
            _cut(3, 10.0),
            _cut(4, 12.0),
        ],
    }
    s = summarize("x", result)
    assert (s.best, s.best_ms) == (best, 10.0)
    assert s.ratio == pytest.approx(ratio)
    assert s.speedup_vs_device == pytest.approx(12.0 / s.chosen_ms)
    assert s.speedup_vs_server == pytest.approx(40.0 / s.chosen_ms)


def test_the_sweeps_device_measures_each_cut_as_the_plan_sends_it(monkeypatch, tmp_path) -> None:
    """The sweep's device process, on loopback (no root, no namespace) against a real server, with the
    lossy int4 codec (half the bytes of an int8 cut), measuring cuts 0, 8 and 16: each measured cut
    goes as the plan sends it, through the codec (fewer bytes than the cut's own) or raw (exactly
    them). Cut 16 sends 64 bytes: halving them saves far less than the 10 % a lossy codec must win
    by on any loopback link, so it goes raw, where it used to go through the codec whatever the plan
    said."""
    from edge import models
    from edge.emulation import device
    from edge.graph import ModelGraph
    from server.embedded import BackgroundServer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the device's profile, measured afresh
    path = models.model_path("digits_resnet")
    graph = ModelGraph.from_file(path)
    n = graph.num_operators
    results: list[dict] = []
    monkeypatch.setattr(
        device, "_emit", lambda kind, **fields: results.append(fields) if kind == "result" else None
    )
    with BackgroundServer.from_files([path]) as server:
        argv = ["--model", str(path), "--server", server.address, "--codec", "int4", "--adapt", "2",
                "--requests", "2", "--pilots", "1", "--gap-ms", "0", "--prune", "1000", "--cuts", "8", "16"]  # fmt: skip
        assert device.main(argv) == 0
    result = results[0]["result"]
    rows = {row["index"]: row for row in result["cuts"]}
    assert set(rows) >= {0, 8, 16, n}
    assert result["choice_coded"] is rows[result["choice"]]["coded"]
    for k, row in rows.items():
        assert not row["fallbacks"], row
        raw = graph.cut(k).nbytes
        assert row["bytes_sent"] < raw if row["coded"] else row["bytes_sent"] == raw, (k, row)
    assert rows[16]["coded"] is False and rows[n]["coded"] is False
