"""The cascade: digits_tiny on the device, digits_resnet (cooperative, cut 8) for what it is unsure of.

Covered:
- the confidence rules on hand-made distributions and logits;
- the sweep and the choice of a threshold, on a hand-made set;
- a calibration file round-trips, and a changed model is refused;
- ``edge calibrate`` on the first 100 images of the shipped held-out digits and ``edge cascade eval``
  on the other 100 (a split calibration never saw) through a real edge server: at least 75 % answered
  on the device, at most 0.5 pp lost against digits_resnet alone, and at least 3x fewer bytes per
  request than always offloading at the same cut;
- on every one of those 100 images, a local answer is exactly digits_tiny's outputs and an
  escalated one exactly digits_resnet's (np.array_equal), answered by the server.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge import models
from edge.cascade import Calibration, Cascade, ModelRef, Pressure, choose, confidence, sweep
from edge.cli import main
from edge.cooperative import CooperativeRunner
from edge.errors import ConfigError, EdgeError
from edge.graph import ModelGraph
from edge.outputs import dequantize
from edge.runner import ModelRunner
from edge.transport import TailClient


def test_confidence_rules() -> None:
    p = np.array([0.7, 0.2, 0.1])
    assert confidence(p, "maxprob") == pytest.approx(0.7)
    assert confidence(p, "margin") == pytest.approx(0.5)
    entropy = -(p * np.log(p)).sum() / math.log(3)
    assert confidence(p, "entropy") == pytest.approx(1 - entropy)
    assert confidence(np.array([1.0, 0.0, 0.0]), "entropy") == pytest.approx(1.0)
    assert confidence(np.array([1 / 3] * 3), "entropy") == pytest.approx(0.0, abs=1e-12)
    logits = np.array([2.0, 0.0, 0.0])  # not a distribution: softmax first
    assert confidence(logits, "maxprob") == pytest.approx(np.exp(2) / (np.exp(2) + 2))
    with pytest.raises(EdgeError, match="unknown confidence rule"):
        confidence(p, "vibes")  # type: ignore[arg-type]


def test_the_sweep_and_the_choice() -> None:
    # Six samples: the small model is wrong on the two least confident; the big one on none.
    conf = [0.99, 0.95, 0.9, 0.8, 0.6, 0.5]
    small = [True, True, True, True, False, False]
    curve = sweep(conf, small, [True] * 6, escalated_bytes=1000.0)
    assert [p.threshold for p in curve] == [0.5, 0.6, 0.8, 0.9, 0.95, 0.99, math.inf]
    at = {p.threshold: p for p in curve}
    assert at[0.5].local_share == 1.0 and at[0.5].accuracy == pytest.approx(4 / 6)
    assert at[0.8].local_share == pytest.approx(4 / 6) and at[0.8].loss_pp == 0.0
    assert at[0.8].bytes_per_request == pytest.approx(1000 / 3)
    assert at[math.inf].local_share == 0.0 and at[math.inf].bytes_per_request == 1000.0
    assert choose(curve).threshold == 0.8  # the most answered locally at no more than 0.5 pp lost
    assert choose(curve, max_loss_pp=20.0).threshold == 0.6
    assert (
        choose(curve, local_share=0.5).threshold == 0.9
    )  # least loss, then closest to the share asked (3 of 6)
    assert choose(curve, local_share=0.6).threshold == 0.8
    with pytest.raises(EdgeError, match="answers 200%"):
        choose(curve, local_share=2.0)


def test_a_calibration_round_trips_and_a_changed_model_is_refused(tmp_path: Path) -> None:
    big = ModelGraph.from_file(models.model_path("digits_resnet"))
    curve = sweep([0.9, 0.4], [True, False], [True, True], 10.0)
    calibration = Calibration(
        rule="margin",
        threshold=0.9,
        big=ModelRef("digits_resnet", big.sha256),
        small=ModelRef("digits_tiny", "0" * 64),
        split_point=8,
        chosen=curve[1],
        curve=tuple(curve),
    )
    path = tmp_path / "cal.json"
    calibration.save(path)
    assert Calibration.load(path) == calibration
    assert calibration.big.load("big").sha256 == big.sha256
    with pytest.raises(ConfigError, match="has changed"):
        calibration.small.load("small")
    path.write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a usable calibration"):
        Calibration.load(path)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shipped held-out digits: the first 100 to calibrate on, the other 100 to evaluate on."""
    sample = models.digits_sample()
    root = tmp_path_factory.mktemp("digits")
    np.savez(root / "calibrate.npz", x=sample.x[:100], y=sample.y[:100])
    np.savez(root / "evaluate.npz", x=sample.x[100:], y=sample.y[100:])
    return root / "calibrate.npz", root / "evaluate.npz"


def test_calibrated_on_one_split_it_meets_the_goals_on_the_other(
    split: tuple[Path, Path],
    tmp_path: Path,
    server_process: tuple[subprocess.Popen[bytes], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calibrate_on, evaluate_on = split
    cal = tmp_path / "cal.json"
    plot = tmp_path / "cal.png"
    argv = ["calibrate", "--model", "digits_resnet", "--small", "digits_tiny", "--data", str(calibrate_on),
            "--local-share", "0.9", "--split-at", "8", "--out", str(cal), "--plot", str(plot), "--json"]  # fmt: skip
    assert main(argv) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert set(chosen) >= {"threshold", "rule", "local_share", "accuracy", "reference_accuracy", "loss_pp",
                           "bytes_per_request", "curve"}  # fmt: skip
    assert chosen["local_share"] >= 0.9 and plot.stat().st_size > 0
    _, address = server_process
    assert (
        main(
            [
                "cascade",
                "eval",
                "--cascade",
                str(cal),
                "--data",
                str(evaluate_on),
                "--server",
                address,
                "--json",
            ]
        )
        == 0
    )
    measured = json.loads(capsys.readouterr().out)
    always_offloaded = ModelGraph.from_file(models.model_path("digits_resnet")).cut(8).nbytes
    assert measured["local_share"] >= 0.75, measured
    assert measured["loss_pp"] <= 0.5, measured
    assert measured["bytes_per_request"] * 3 <= always_offloaded, measured
    assert measured["escalated"] > 0 and measured["fallbacks"] == 0, measured


def test_local_answers_are_the_small_models_and_escalated_ones_the_big_models(
    split: tuple[Path, Path], server_process: tuple[subprocess.Popen[bytes], str]
) -> None:
    _, address = server_process
    sample = models.digits_sample()
    big = ModelGraph.from_file(models.model_path("digits_resnet"))
    small = ModelGraph.from_file(models.model_path("digits_tiny"))
    with ModelRunner(big) as big_alone, ModelRunner(small) as small_alone:
        device = CooperativeRunner(ModelRunner(big), TailClient(address, timeout_s=10.0), model_name="digits_resnet",
                                   policy=8)  # fmt: skip
        cascade = Cascade(ModelRunner(small), device, rule="maxprob", threshold=0.9)
        seen = set()
        try:
            for i in range(100, 200):
                x = {big.inputs[0].name: sample.x[i : i + 1]}
                result = cascade.infer(x)
                seen.add(result.answered_by)
                if result.answered_by == "device-small":
                    want = small_alone.run({small.inputs[0].name: x[big.inputs[0].name]})
                    assert result.confidence >= 0.9 and result.output_info == small.outputs
                else:
                    assert result.answered_by == "server" and result.confidence < 0.9, i
                    want = big_alone.run(x)
                    assert result.output_info == big.outputs and result.bytes_sent > 0
                assert set(result.outputs) == set(want)
                assert all(np.array_equal(result.outputs[k], v) for k, v in want.items()), i
        finally:
            cascade.close()
    assert seen == {"device-small", "server"}


def test_edge_infer_with_a_cascade_answers_with_the_stage_that_was_sure(
    tmp_path: Path, server_process: tuple[subprocess.Popen[bytes], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """One held-out digit digits_tiny is sure of, and one it is not: the outputs written are the model's
    that answered, and the line says which."""
    big = ModelGraph.from_file(models.model_path("digits_resnet"))
    small = ModelGraph.from_file(models.model_path("digits_tiny"))
    sample = models.digits_sample()
    with ModelRunner(small) as s:
        out = small.outputs[0]
        conf = [
            confidence(
                dequantize(s.run({small.inputs[0].name: sample.x[i : i + 1]})[out.name], out), "maxprob"
            )
            for i in range(200)
        ]
    threshold = float(np.median(conf))
    sure, unsure = int(np.argmax(conf)), int(np.argmin(conf))
    curve = sweep(conf, [True] * 200, [True] * 200, 2048.0)
    cal = tmp_path / "cal.json"
    Calibration(rule="maxprob", threshold=threshold, big=ModelRef("digits_resnet", big.sha256),
                small=ModelRef("digits_tiny", small.sha256), split_point=8, chosen=curve[0],
                curve=tuple(curve)).save(cal)  # fmt: skip
    _, address = server_process
    for i, stage, graph in ((sure, "device-small", small), (unsure, "server", big)):
        np.save(tmp_path / "x.npy", sample.x[i])
        out = tmp_path / f"y{i}.npz"
        argv = ["infer", "--model", "digits_resnet", "--input", str(tmp_path / "x.npy"), "--cascade", str(cal),
                "--server", address, "--split-at", "8", "--output", str(out)]  # fmt: skip
        assert main(argv) == 0
        assert f"answered by {stage}" in capsys.readouterr().out
        with ModelRunner(graph) as runner, np.load(out) as written:
            want = runner.run({graph.inputs[0].name: sample.x[i : i + 1]})
            assert set(written.files) == set(want)
            assert all(np.array_equal(written[k], v) for k, v in want.items())


def test_the_threshold_relaxes_while_escalating_fails_and_returns_after() -> None:
    """Calibrated threshold 0.99 (most held-out digits escalate), relaxed 0.5. The server stops: the
    first escalation falls back to the device, and the router then answers locally down to 0.5
    (flagged by the threshold in force); the server comes back on its port, the hold expires, and
    the calibrated threshold is in force again, escalating to the server."""
    from server.embedded import BackgroundServer

    big = ModelGraph.from_file(models.model_path("digits_resnet"))
    small = ModelGraph.from_file(models.model_path("digits_tiny"))
    sample = models.digits_sample()
    now = [0.0]
    paths = [models.model_path("digits_resnet")]
    server = BackgroundServer.from_files(paths).__enter__()
    port = server.server.port  # it comes back on the same port below
    device = CooperativeRunner(ModelRunner(big), TailClient(f"127.0.0.1:{port}", timeout_s=2.0),
                               model_name="digits_resnet", policy=8, retry_after_s=0.0)  # fmt: skip
    pressure = Pressure(0.99, 0.5, hold_s=5.0, clock=lambda: now[0])
    cascade = Cascade(ModelRunner(small), device, rule="maxprob", threshold=pressure)

    def run(i: int):  # type: ignore[no-untyped-def]
        return cascade.infer({big.inputs[0].name: sample.x[i : i + 1]})

    try:
        first = [run(i) for i in range(40)]
        assert {r.threshold for r in first} == {0.99} and any(r.answered_by == "server" for r in first)
        server.__exit__(None, None, None)
        results = [run(i) for i in range(40)]
        failed = next(k for k, r in enumerate(results) if r.escalated)
        assert results[failed].answered_by == "device-big" and results[failed].inference.fallback
        after = results[failed + 1 :]
        assert after and {r.threshold for r in after} == {0.5} and cascade.pressed
        assert all(r.answered_by == "device-small" for r in after if r.confidence >= 0.5)
        server = BackgroundServer.from_files(paths, port=port).__enter__()
        deadline = time.monotonic() + 30
        while not device.circuit.available() and time.monotonic() < deadline:  # the device sees it back
            time.sleep(0.05)
        now[0] += 5.0  # the hold expires
        back = [run(i) for i in range(40)]
        assert {r.threshold for r in back} == {0.99} and not cascade.pressed
        assert any(r.answered_by == "server" for r in back), [r.answered_by for r in back]
    finally:
        cascade.close()
        server.__exit__(None, None, None)


def test_the_relaxed_threshold_is_bounded_by_the_curve() -> None:
    curve = sweep([0.99, 0.95, 0.9, 0.8, 0.6, 0.5], [True] * 4 + [False] * 2, [True] * 6, 1000.0)
    chosen = choose(curve)  # 0.8, no loss
    from edge.cascade import relaxed_threshold

    assert relaxed_threshold(curve, chosen, 0.0) == 0.8
    assert relaxed_threshold(curve, chosen, 20.0) == 0.6  # one more mistake in six: 16.7 pp
    assert relaxed_threshold(curve, chosen, 50.0) == 0.5


@pytest.mark.parametrize("stage", ["--small", "--exit"])
def test_edge_demo_with_a_cascade(
    stage: str, split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo through a calibrated cascade (digits_tiny) or early exit: every output equals the answering
    model's (exit, small or whole model), and both stages answer."""
    from edge.cascade import exit_outputs

    cal = tmp_path / "cal.json"
    if stage == "--small":
        argv = ["--model", "digits_resnet", "--small", "digits_tiny", "--split-at", "8"]
        local = "device-small"
    else:
        (name,) = exit_outputs(ModelGraph.from_file(models.model_path("digits_resnet_exit")))
        argv = ["--model", "digits_resnet_exit", "--exit", name]
        local = "device-exit"
    calibrate_on, _ = split
    assert (
        main(["calibrate", *argv, "--data", str(calibrate_on), "--local-share", "0.9", "--out", str(cal)])
        == 0
    )
    capsys.readouterr()
    assert main(["demo", "--cascade", str(cal), "-n", "60", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical_to_whole_model"] == 60 and report["fallbacks"] == 0
    assert set(report["answered_by"]) == {local, "server"}, report["answered_by"]
    assert report["local_share"] >= 0.75 and report["mean_bytes_per_request"] > 0


def test_edge_bench_with_a_cascade(
    split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calibrate_on, evaluate_on = split
    cal = tmp_path / "cal.json"
    argv = ["calibrate", "--model", "digits_resnet", "--small", "digits_tiny", "--split-at", "8",
            "--data", str(calibrate_on), "--local-share", "0.9", "--out", str(cal)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "bench",
                "--cascade",
                str(cal),
                "--data",
                str(evaluate_on),
                "-n",
                "100",
                "--warmup",
                "7",  # the warm-up's answers are not counted
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (
        set(report["answered_by"]) == {"device-small", "server"}
        and sum(report["answered_by"].values()) == 100
    )
    assert report["split_point"] == 8 and 0 < report["bytes_sent"] < 2048 / 3


def test_bad_cascade_inputs_are_one_clear_error_each(
    split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A calibration for another model, an output that is not an exit, a file that is not a calibration,
    and data without labels: each exit status 2 and one line naming the problem."""
    calibrate_on, _ = split
    cal = tmp_path / "cal.json"
    argv = [
        "calibrate",
        "--model",
        "digits_resnet",
        "--small",
        "digits_tiny",
        "--data",
        str(calibrate_on),
        "--out",
        str(cal),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    np.save(tmp_path / "x.npy", models.digits_sample().x[0])
    np.save(tmp_path / "x_float.npy", models.digits_sample().x_float[0].astype(np.float32))
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=models.digits_sample().x[:3])
    not_json = tmp_path / "no.json"
    not_json.write_text("{}")
    cases = [
        (["infer", "--model", "digits_resnet_f32", "--input", str(tmp_path / "x_float.npy"), "--cascade", str(cal)],
         "calibrated for another big model"),
        (["calibrate", "--model", "digits_resnet", "--exit", "nope", "--data", str(calibrate_on), "--out",
          str(tmp_path / "e.json")], "is not an early exit"),
        (["cascade", "eval", "--cascade", str(not_json), "--data", str(calibrate_on)], "not a usable calibration"),
        (["cascade", "eval", "--cascade", str(cal), "--data", str(unlabelled)], "needs arrays x and y"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (
            lambda text: text.replace('"threshold": ', '"threshold": Infinity, "x": ', 1),
            "Infinity is not a number",
        ),
        (lambda text: text.replace('"threshold": ', '"threshold": NaN, "x": ', 1), "NaN is not a number"),
        (lambda text: re.sub(r'"threshold": [0-9.e-]+', '"threshold": -0.5', text, count=1), "in [0, 1]"),
        (lambda text: re.sub(r'"threshold": [0-9.e-]+', '"threshold": 1.5', text, count=1), "in [0, 1]"),
        (
            lambda text: re.sub(r'"local_share": [0-9.e-]+', '"local_share": 3', text, count=1),
            "local_share is a share",
        ),
        (lambda text: '{"format": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deep"),
        (lambda text: text + " " * (17 * 1024 * 1024), "a calibration holds at most"),
    ],
    ids=["infinity", "nan", "negative", "above-one", "share-above-one", "deep", "huge"],
)
def test_a_bad_calibration_file_is_one_line(
    edit, says: str, split: tuple[Path, Path], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    calibrate_on, evaluate_on = split
    good = tmp_path / "good.json"
    argv = ["--model", "digits_resnet", "--small", "digits_tiny", "--split-at", "8"]
    assert (
        main(["calibrate", *argv, "--data", str(calibrate_on), "--local-share", "0.9", "--out", str(good)])
        == 0
    )
    bad = tmp_path / "bad.json"
    bad.write_text(edit(good.read_text()))
    proc = subprocess.run([sys.executable, "-m", "edge", "cascade", "eval", "--cascade", str(bad), "--data",
                           str(evaluate_on), "--json"], capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-500:]
