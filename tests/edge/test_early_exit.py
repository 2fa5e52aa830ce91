"""Early exit: digits_resnet_exit's exit classifier, computed in the head, answers what it is sure of.

Covered:
- the exit is found (computed in the head from cut 11 on), and digits_resnet has none;
- at every cut whose head computes the exit (11..20), through a real edge server, on 20 held-out
  digits with the threshold at their median confidence: an exited answer is exactly the whole
  model's exit output and sends nothing; an escalated one is exactly the whole model's outputs
  (both), answered by the server;
- with no server, the same two cases run on the device (the head, then the tail only if needed);
- a fixed cut before the exit is refused; ``auto`` only plans cuts from the exit on;
- ``edge calibrate --exit`` on the first 100 held-out digits and ``edge cascade eval`` on the other
  100 through a server: at least 75 % answered on the device, at most 0.5 pp lost, and at least 3x
  fewer bytes per request than always offloading at the exit's cut.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge import models
from edge.cascade import EarlyExit, exit_outputs
from edge.cli import main
from edge.cooperative import CooperativeRunner
from edge.errors import EdgeError
from edge.graph import ModelGraph
from edge.runner import ModelRunner
from edge.transport import TailClient

MODEL = "digits_resnet_exit"


@pytest.fixture(scope="module")
def graph() -> ModelGraph:
    return ModelGraph.from_file(models.model_path(MODEL))


@pytest.fixture(scope="module")
def exit_name(graph: ModelGraph) -> str:
    (name,) = exit_outputs(graph)
    return name


def test_the_exit_is_found(graph: ModelGraph, exit_name: str) -> None:
    assert exit_outputs(graph) == {exit_name: 11}
    assert graph.cut(11).nbytes < sum(t.nbytes for t in graph.inputs)
    assert exit_outputs(ModelGraph.from_file(models.model_path("digits_resnet"))) == {}


def _check(router: EarlyExit, graph: ModelGraph, exit_name: str, *, remote: bool) -> set[str]:
    sample = models.digits_sample()
    seen = set()
    with ModelRunner(graph) as whole:
        for i in range(20):
            x = {graph.inputs[0].name: sample.x[i : i + 1]}
            want = whole.run(x)
            result = router.infer(x)
            seen.add(result.answered_by)
            if result.answered_by == "device-exit":
                assert result.confidence >= router.pressure.threshold and result.bytes_sent == 0
                assert set(result.outputs) == {exit_name}
                assert np.array_equal(result.outputs[exit_name], want[exit_name]), i
            else:
                assert result.answered_by == ("server" if remote else "device-big"), result.answered_by
                assert result.confidence < router.pressure.threshold
                assert set(result.outputs) == set(want)
                assert all(np.array_equal(result.outputs[k], v) for k, v in want.items()), i
                assert (result.bytes_sent > 0) == remote
    return seen


def _median_confidence(graph: ModelGraph, exit_name: str, router: EarlyExit) -> float:
    sample = models.digits_sample()
    with ModelRunner(graph) as whole:
        return float(
            np.median(
                [
                    router.exit_confidence(whole.run({graph.inputs[0].name: sample.x[i : i + 1]}))
                    for i in range(20)
                ]
            )
        )


@pytest.mark.parametrize("k", range(11, 21))
def test_answers_at_every_cut_with_the_exit_in_the_head(
    k: int, graph: ModelGraph, exit_name: str, server_process: tuple[subprocess.Popen[bytes], str]
) -> None:
    _, address = server_process
    device = CooperativeRunner(
        ModelRunner(graph), TailClient(address, timeout_s=10.0), model_name=MODEL, policy=k
    )
    router = EarlyExit(device, exit_name, rule="maxprob", threshold=1.0)
    try:
        router.pressure.threshold = router.pressure.relaxed = _median_confidence(graph, exit_name, router)
        assert _check(router, graph, exit_name, remote=True) == {"device-exit", "server"}
    finally:
        router.close()


def test_without_a_server_the_device_runs_the_rest_only_when_needed(
    graph: ModelGraph, exit_name: str
) -> None:
    device = CooperativeRunner(ModelRunner(graph), None, model_name=MODEL, policy=11)
    router = EarlyExit(device, exit_name, rule="margin", threshold=1.0)
    try:
        router.pressure.threshold = router.pressure.relaxed = _median_confidence(graph, exit_name, router)
        assert _check(router, graph, exit_name, remote=False) == {"device-exit", "device-big"}
    finally:
        router.close()


def test_a_cut_before_the_exit_is_refused_and_auto_plans_after_it(graph: ModelGraph, exit_name: str) -> None:
    device = CooperativeRunner(ModelRunner(graph), None, model_name=MODEL, policy=10)
    with pytest.raises(EdgeError, match="comes before the early exit"):
        EarlyExit(device, exit_name, rule="maxprob", threshold=0.9)
    with pytest.raises(EdgeError, match="is not an early exit"):
        EarlyExit(device, graph.outputs[1].name, rule="maxprob", threshold=0.9)
    device.close()
    from edge.autosplit import AutoSplit

    n = graph.num_operators
    policy = AutoSplit(graph, [0.0] * (n + 1), [0.0] * (n + 1), reachable=False)
    device = CooperativeRunner(ModelRunner(graph), None, model_name=MODEL, policy=policy)
    EarlyExit(device, exit_name, rule="maxprob", threshold=0.9)
    assert policy.candidates and min(policy.candidates) >= 11
    device.close()


def test_calibrated_on_one_split_the_exit_meets_the_goals_on_the_other(
    tmp_path: Path, exit_name: str, server_process: tuple[subprocess.Popen[bytes], str],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sample = models.digits_sample()
    np.savez(tmp_path / "cal.npz", x=sample.x[:100], y=sample.y[:100])
    np.savez(tmp_path / "eval.npz", x=sample.x[100:], y=sample.y[100:])
    cal = tmp_path / "cal.json"
    argv = ["calibrate", "--model", MODEL, "--exit", exit_name, "--data", str(tmp_path / "cal.npz"),
            "--local-share", "0.9", "--out", str(cal), "--json"]  # fmt: skip
    assert main(argv) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["local_share"] >= 0.9
    _, address = server_process
    argv = [
        "cascade",
        "eval",
        "--cascade",
        str(cal),
        "--data",
        str(tmp_path / "eval.npz"),
        "--server",
        address,
        "--json",
    ]
    assert main(argv) == 0
    measured = json.loads(capsys.readouterr().out)
    always = ModelGraph.from_file(models.model_path(MODEL)).cut(11).nbytes
    assert measured["local_share"] >= 0.75 and measured["loss_pp"] <= 0.5, measured
    assert measured["bytes_per_request"] * 3 <= always and measured["fallbacks"] == 0, measured


def test_edge_inspect_names_the_exit(exit_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", MODEL, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exits"] == [{"output": exit_name, "from_cut": 11}]
    assert main(["inspect", MODEL]) == 0
    assert "early exit: computed in the head from cut 11 on" in " ".join(capsys.readouterr().out.split())
