"""Device profiles: what they measure, and how the cache keys them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edge.measure import candidate_cuts, interpolate, profile_heads, profile_tails
from edge.profiler import HeadProfile, cache_dir, load_or_profile, profile_path
from edge.runner import ModelRunner


@pytest.fixture()
def runner(graphs):
    with ModelRunner(graphs["digits_tiny"], threads=1) as r:
        yield r


def test_cache_dir_honours_edge_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    assert profile_path("ab12", "litert", 2).parent == tmp_path / "profiles"
    monkeypatch.delenv("EDGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "edge"


@pytest.mark.parametrize(
    "other",
    [
        ("ff00", "litert", 1, ""),
        ("ab12", "tflite-runtime", 1, ""),
        ("ab12", "litert", 4, ""),
        ("ab12", "litert", 1, "dilated4x"),
    ],
)
def test_profile_path_keys_on_model_backend_threads_and_label(tmp_path, other):
    base = profile_path("ab12", "litert", 1, root=tmp_path)
    assert base.name == "ab12-litert-1.json"
    sha, backend, threads, label = other
    assert profile_path(sha, backend, threads, label=label, root=tmp_path) != base


def test_profiles_cover_every_cut(runner):
    n = runner.graph.num_operators
    head = profile_heads(runner, runs=3, warmup=1, progress=False)
    tail = profile_tails(runner, runs=3, warmup=1)
    assert len(head) == len(tail) == n + 1
    assert head[0] == 0.0 and tail[n] == 0.0
    assert all(h > 0 for h in head[1:]) and all(t > 0 for t in tail[:n])


def test_cache_is_used_for_the_same_key(runner, tmp_path):
    n = runner.graph.num_operators
    path = profile_path(runner.graph.sha256, runner.backend, runner.threads, root=tmp_path)
    marked = HeadProfile(runner.graph.sha256, runner.backend, runner.threads, (0.0,) + (123.0,) * n, 5, 1)
    path.parent.mkdir(parents=True)
    path.write_text(marked.to_json())
    assert load_or_profile(runner, root=tmp_path, progress=False) == marked
    # Another label is another device: measured, not read from the marked file.
    other = load_or_profile(runner, root=tmp_path, label="dilated4x", runs=3, warmup=1, progress=False)
    assert other.head_ms[1:] != marked.head_ms[1:]
    assert profile_path(
        runner.graph.sha256, runner.backend, runner.threads, label="dilated4x", root=tmp_path
    ).exists()


def test_refresh_measures_again(runner, tmp_path):
    first = load_or_profile(runner, root=tmp_path, runs=3, warmup=1, progress=False)
    path = profile_path(runner.graph.sha256, runner.backend, runner.threads, root=tmp_path)
    data = json.loads(path.read_text())
    data["head_ms"] = [0.0] + [999.0] * runner.graph.num_operators
    path.write_text(json.dumps(data))
    assert load_or_profile(runner, root=tmp_path, progress=False).head_ms[1] == 999.0
    again = load_or_profile(runner, root=tmp_path, refresh=True, runs=3, warmup=1, progress=False)
    assert again.head_ms[1] != 999.0 and len(again.head_ms) == len(first.head_ms)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: "not json",
        lambda d: json.dumps({**d, "model_sha256": "0" * 64}),
        lambda d: json.dumps({**d, "threads": 7}),
        lambda d: json.dumps({**d, "head_ms": d["head_ms"][:-1]}),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "runs"}),
    ],
)
def test_unusable_cache_files_are_measured_again(runner, tmp_path, corrupt):
    first = load_or_profile(runner, root=tmp_path, runs=3, warmup=1, progress=False)
    path = profile_path(runner.graph.sha256, runner.backend, runner.threads, root=tmp_path)
    data = json.loads(path.read_text())
    data["head_ms"] = [0.0] + [999.0] * runner.graph.num_operators
    path.write_text(corrupt(data))
    again = load_or_profile(runner, root=tmp_path, runs=3, warmup=1, progress=False)
    assert 999.0 not in again.head_ms
    assert HeadProfile.from_json(Path(path).read_text()) == again
    assert again.model_sha256 == first.model_sha256


@pytest.mark.parametrize("name", ["digits_resnet", "digits_tiny", "mobilenetv2_035"])
def test_candidate_cuts_are_the_front_of_bytes_against_depth(name: str, graphs) -> None:
    graph = graphs[name]
    n = graph.num_operators
    chosen = candidate_cuts(graph)
    assert chosen[0] == 0 and chosen[-1] == n
    for k in range(1, n):
        earlier = min(graph.cut(j).nbytes for j in range(k))
        if k in chosen:
            assert graph.cut(k).nbytes < earlier
        else:  # dominated: an earlier cut sends no more, with less on the device
            assert graph.cut(k).nbytes >= earlier or not graph.cut(k).tail_outputs


def test_interpolate_spreads_by_operator_weight() -> None:
    # Five operators; cuts 0, 2 and 5 measured.
    got = interpolate({0: 0.0, 2: 4.0, 5: 10.0}, [1.0, 3.0, 0.0, 2.0, 4.0])
    assert got == [0.0, 1.0, 4.0, 4.0, 6.0, 10.0]


def test_interpolate_keeps_a_failed_anchor_and_skips_it() -> None:
    got = interpolate({0: 8.0, 2: math.inf, 4: 0.0}, [1.0, 1.0, 1.0, 1.0])
    assert got == [8.0, 6.0, math.inf, 2.0, 0.0]


def test_interpolate_without_weights_is_linear() -> None:
    assert interpolate({0: 0.0, 4: 8.0}, [0.0, 0.0, 0.0, 0.0]) == [0.0, 2.0, 4.0, 6.0, 8.0]
