"""The daemon with a ``[cascade]``: digits_tiny answers what it is sure of, digits_resnet the rest.

Covered: a real broker, edge server and daemon; 30 held-out digits; every result says which stage
answered (``answered_by``), with ``confidence`` and ``threshold``; a local answer's top-3 is
digits_tiny's and an escalated one's digits_resnet's (from each model run here); the stats count
both stages. The profile's [cascade] checks: a calibration or small + threshold (not both, not
neither), a calibration made for another big model, and a small model taking other inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from daemon.daemon_harness import GENERIC, Broker, DaemonProcess, Probe, ServerProcess, wait_until

from edge import models
from edge.cascade import Calibration, ModelRef, sweep
from edge.daemon import load, resolve
from edge.daemon.messages import top_k
from edge.errors import ConfigError
from edge.graph import ModelGraph
from edge.outputs import dequantize
from edge.runner import ModelRunner
from helpers import MINIMAL_PROFILE

TOPIC = "sensors/s1/digits"


def _top3(name: str, i: int) -> list[dict[str, object]]:
    graph = ModelGraph.from_file(models.model_path(name))
    with ModelRunner(graph) as runner:
        out = runner.run({graph.inputs[0].name: models.digits_sample().x[i : i + 1]})[graph.outputs[0].name]
    labels = [str(k) for k in range(10)]
    return top_k(dequantize(out, graph.outputs[0]).reshape(-1), 3, labels)


def test_the_daemon_answers_through_the_cascade(
    tmp_path: Path,
    broker: Broker,
    edge_server: ServerProcess,
    probe: Probe,
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    profile = tmp_path / "cascade.toml"
    text = GENERIC.read_text().replace("interval_s = 30.0", "interval_s = 1.0")
    profile.write_text(text + '\n[cascade]\nsmall = "digits_tiny"\nthreshold = 0.9\n')
    daemon = daemon_factory([edge_server.address], profile)
    daemon.start()
    sent = {}
    for i in range(30):
        message_id = f"c-{i}"
        probe.publish(TOPIC, json.dumps({"id": message_id, "data": models.digits_sample().x[i].tolist()}))
        sent[message_id] = i
    answered = probe.wait_answered(set(sent), timeout=60)
    stages = {}
    for message_id, i in sent.items():
        doc = answered[message_id][0]
        assert doc["threshold"] == 0.9
        stages[message_id] = doc["answered_by"]
        if doc["answered_by"] == "device-small":
            assert doc["confidence"] >= 0.9 and doc["cut"] is None and doc["bytes_sent"] == 0
            assert doc["top_k"] == _top3("digits_tiny", i), message_id
        else:
            assert doc["answered_by"] == "server" and doc["confidence"] < 0.9 and doc["bytes_sent"] > 0, doc
            assert doc["top_k"] == _top3("digits_resnet", i), message_id
    assert set(stages.values()) == {"device-small", "server"}, stages
    wait_until(lambda: any(s.get("answered_by") for s in probe.stats), 60, "a stats message with answered_by")
    last = [s for s in probe.stats if s.get("answered_by")][-1]
    assert set(last["answered_by"]) <= {"device-small", "server"}


BASE = MINIMAL_PROFILE


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ('[cascade]\nsmall = "digits_tiny"\n', r"both small \(or exit\) and threshold"),
        ('[cascade]\nthreshold = 0.5\ncalibration = "cal.json"\n', "not both"),
        ('[cascade]\nsmall = "mobilenetv2_035"\nthreshold = 0.5\n', "differs from the big model"),
        ('[cascade]\ncalibration = "other.json"\n', "calibrated for another big model"),
        (
            '[cascade]\nsmall = "digits_tiny"\nthreshold = 0.5\nmax_extra_loss_pp = 1\n',
            "give a calibration file",
        ),
        (
            '[cascade]\nexit = "StatefulPartitionedCall_1:0"\nthreshold = 0.5\n',
            "not an early exit of the model",
        ),
        (
            '[cascade]\nexit = "e"\nsmall = "digits_tiny"\nthreshold = 0.5\n',
            "a small model or an exit, not both",
        ),
    ],
)
def test_a_bad_cascade_section_is_one_clear_error(tmp_path: Path, section: str, needle: str) -> None:
    tiny = ModelGraph.from_file(models.model_path("digits_tiny"))
    curve = sweep([0.9], [True], [True], 1.0)
    Calibration(
        rule="maxprob",
        threshold=0.9,
        big=ModelRef("digits_resnet_f32", "1" * 64),
        small=ModelRef("digits_tiny", tiny.sha256),
        split_point=8,
        chosen=curve[0],
        curve=tuple(curve),
    ).save(tmp_path / "other.json")
    path = tmp_path / "p.toml"
    path.write_text(BASE + section)
    with pytest.raises(ConfigError, match=needle):
        resolve(load(path), path)


def test_a_calibration_file_sets_the_cascade(tmp_path: Path) -> None:
    big = ModelGraph.from_file(models.model_path("digits_resnet"))
    tiny = ModelGraph.from_file(models.model_path("digits_tiny"))
    curve = sweep([0.9, 0.3], [True, False], [True, True], 2048.0)
    Calibration(
        rule="entropy",
        threshold=0.9,
        big=ModelRef("digits_resnet", big.sha256),
        small=ModelRef("digits_tiny", tiny.sha256),
        split_point=8,
        chosen=curve[1],
        curve=tuple(curve),
    ).save(tmp_path / "cal.json")
    path = tmp_path / "p.toml"
    path.write_text(BASE + '[cascade]\ncalibration = "cal.json"\nmax_extra_loss_pp = 60\ndeadline_ms = 40\n')
    plan = resolve(load(path), path).cascade
    assert plan is not None and plan.rule == "entropy" and plan.threshold == 0.9
    assert plan.relaxed == 0.3 and plan.deadline_ms == 40  # one mistake in two is 50 pp: within 60
    assert plan.small.sha256 == tiny.sha256 and np.isfinite(plan.threshold)


def test_the_daemon_answers_from_the_early_exit(
    tmp_path: Path, broker: Broker, probe: Probe, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """digits_resnet_exit at cut 11 with [cascade] exit: sure answers come from the exit, the rest from
    the server, each equal to that output of the whole model run here."""
    from edge.cascade import exit_outputs

    graph = ModelGraph.from_file(models.model_path("digits_resnet_exit"))
    (exit_name,) = exit_outputs(graph)
    final = next(t for t in graph.outputs if t.name != exit_name)
    server = ServerProcess(tmp_path / "server", served=("digits_resnet_exit",))
    server.start()
    try:
        text = GENERIC.read_text().replace('path = "digits_resnet"', 'path = "digits_resnet_exit"')
        text = text.replace("k = 8 ", "k = 11 ")
        assert 'path = "digits_resnet_exit"' in text and "k = 11 " in text
        profile = tmp_path / "exit.toml"
        profile.write_text(text + f'\n[cascade]\nexit = "{exit_name}"\nthreshold = 0.97\n')
        daemon = daemon_factory([server.address], profile)
        daemon.start()
        sent = {}
        for i in range(30):
            probe.publish(TOPIC, json.dumps({"id": f"e-{i}", "data": models.digits_sample().x[i].tolist()}))
            sent[f"e-{i}"] = i
        answered = probe.wait_answered(set(sent), timeout=60)
        labels = [str(k) for k in range(10)]
        with ModelRunner(graph) as whole:
            stages = set()
            for message_id, i in sent.items():
                doc = answered[message_id][0]
                stages.add(doc["answered_by"])
                out = whole.run({graph.inputs[0].name: models.digits_sample().x[i : i + 1]})
                tensor = graph.tensor_by_name[exit_name] if doc["answered_by"] == "device-exit" else final
                assert doc["top_k"] == top_k(dequantize(out[tensor.name], tensor).reshape(-1), 3, labels), (
                    message_id
                )
                assert (doc["bytes_sent"] == 0) == (doc["answered_by"] == "device-exit"), doc
        assert stages == {"device-exit", "server"}, stages
    finally:
        server.kill()
