"""``edge calibrate`` and ``edge cascade eval``: the cascade's threshold, chosen on labelled data and checked on other data."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..argtypes import non_negative_float, positive_float
from ..cascade import (
    RULES,
    Calibration,
    ModelRef,
    check_pair,
    choose,
    confidence,
    exit_cut,
    open_router,
    sweep,
)
from ..errors import EdgeError, TensorFormatError
from ..fileio import load_arrays
from ..graph import ModelGraph, TensorInfo
from ..outputs import dequantize
from ..preprocess import coerce_input
from ..runner import ModelRunner
from ..stats import summary
from .common import (
    MODEL_HELP,
    add_backend_args,
    add_server_args,
    load_graph,
    open_runner,
    plotting,
    save_figure,
)

__all__ = ["register"]

T = TypeVar("T")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose the cascade's threshold on labelled data",
        description="Run the small model and the big one on labelled data (FILE.npz with x and y), sweep the "
        "threshold on the small model's confidence, and write the one that meets the target to CAL.json: the "
        "share of requests answered on the device, the cascade's accuracy, the big model's alone, and the bytes "
        "sent per request, for every threshold.",
    )
    p.add_argument("--model", required=True, help=f"the big model: {MODEL_HELP}")
    stage = p.add_mutually_exclusive_group(required=True)
    stage.add_argument("--small", help="the small model, run first on the device (same input)")
    stage.add_argument(
        "--exit",
        dest="exit_output",
        metavar="OUTPUT_NAME",
        help="the big model's early-exit output (edge inspect lists them)",
    )
    p.add_argument(
        "--data", required=True, type=Path, metavar="FILE.npz", help="x (inputs) and y (integer labels)"
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--max-loss",
        type=non_negative_float,
        metavar="PP",
        help="the largest accuracy loss against the big model alone, in percentage points (default: 0.5)",
    )
    target.add_argument(
        "--local-share", type=_share, metavar="S", help="answer at least this share (0..1) on the device"
    )
    p.add_argument(
        "--rule", choices=RULES, default="maxprob", help="the confidence rule (default: %(default)s)"
    )
    p.add_argument(
        "--split-at",
        default=None,
        metavar="K|TENSOR",
        help="the big model's cut escalated requests are sent at (default: the middle cut; with --exit, the "
        "first cut whose head computes the exit)",
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="CAL.json", help="where to write the calibration"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="plot accuracy against local share (needs matplotlib)"
    )
    add_backend_args(p)
    p.set_defaults(func=calibrate)

    c = sub.add_parser("cascade", help="run a calibrated cascade", description="Run a calibrated cascade.")
    csub = c.add_subparsers(dest="cascade_command", metavar="COMMAND", required=True)
    e = csub.add_parser(
        "eval",
        help="measure a calibrated cascade on labelled data",
        description="Run the calibrated router on labelled data: the small model on this device, escalating to "
        "the big model's cooperative path (the calibration's cut; the edge server with --server, else all here). "
        "Prints the fields calibrate prints, measured.",
    )
    e.add_argument(
        "--cascade", required=True, type=Path, metavar="CAL.json", help="a file written by edge calibrate"
    )
    e.add_argument(
        "--data", required=True, type=Path, metavar="FILE.npz", help="x (inputs) and y (integer labels)"
    )
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument(
        "--max-extra-loss",
        type=non_negative_float,
        metavar="PP",
        help="adaptive: while escalating goes badly, answer locally down to the threshold losing at most PP "
        "more (by the calibration's curve)",
    )
    e.add_argument(
        "--escalation-deadline-ms",
        type=positive_float,
        metavar="MS",
        help="adaptive: an escalation slower than this counts as going badly",
    )
    add_backend_args(e)
    add_server_args(e)
    e.set_defaults(func=evaluate)


def _share(text: str) -> float:
    value = positive_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"a share is between 0 and 1, not {text}")
    return value


def load_dataset(path: Path, graph: ModelGraph) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """(one feed per sample for ``graph``'s single input, the integer labels) from an .npz with x and y."""
    feeds, labels = load_samples(path, graph, labelled=True)
    assert labels is not None
    return feeds, labels


def load_samples(
    path: Path, graph: ModelGraph, *, labelled: bool
) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """:func:`load_dataset`, where y may be absent unless ``labelled`` (labels None then)."""
    if len(graph.inputs) != 1:
        raise TensorFormatError(f"a dataset feeds one input; the model has {len(graph.inputs)}")
    data = load_arrays(path)
    if "x" not in data or ("y" not in data and labelled):
        needs = "x and y" if labelled else "x (and optionally y)"
        raise TensorFormatError(f"{path}: needs arrays {needs}, has {', '.join(data) or 'none'}")
    x, y = data["x"], data.get("y")
    if y is not None:
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise TensorFormatError(
                f"{path}: y must be a vector of integer labels, not {y.dtype.name}{list(y.shape)}"
            )
        if len(x) != len(y) or len(y) == 0:
            raise TensorFormatError(
                f"{path}: x has {len(x)} samples and y {len(y)}; they must match, and not be empty"
            )
        classes = max((int(np.prod(t.shape)) for t in graph.outputs), default=0)
        if y.min() < 0 or y.max() >= classes:
            raise TensorFormatError(
                f"{path}: labels must be classes 0..{classes - 1} of the model's output; found {y.min()}..{y.max()}"
            )
    tensor = graph.inputs[0]
    feeds = [{tensor.name: coerce_input(x[i], tensor, integers_as_reals=False)} for i in range(len(x))]
    return feeds, y.astype(np.int64) if y is not None else None


def _label(outputs: dict[str, np.ndarray], tensor: TensorInfo) -> tuple[int, np.ndarray]:
    values = dequantize(outputs[tensor.name], tensor).reshape(-1)
    return int(np.argmax(values)), values


def _progress(items: Iterable[T], total: int, what: str, quiet: bool) -> Iterator[T]:
    if quiet or total < 50:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, total=total, description=what, transient=True, console=Console(stderr=True))


class _Stages:
    """Both stages on one sample, run here: the local stage's confidence and whether each is right."""

    def __init__(
        self,
        big: ModelGraph,
        small: ModelGraph | None,
        exit_output: str | None,
        rule: str,
        backend: str,
        threads: int,
    ) -> None:
        self.big, self.small, self.exit_output, self.rule = big, small, exit_output, rule
        if exit_output is not None:
            self.exit_cut = exit_cut(big, exit_output)
            finals = [t for t in big.outputs if t.name != exit_output]
            if len(finals) != 1:
                raise EdgeError(
                    f"with an early exit the model needs one other (final) output, not {len(finals)}"
                )
            self.exit_info, self.final = big.tensor_by_name[exit_output], finals[0]
        else:
            self.final = big.outputs[0]
        self.big_runner = ModelRunner(big, backend=backend, threads=threads)
        self.small_runner = (
            ModelRunner(small, backend=backend, threads=threads) if small is not None else None
        )

    def measure(self, x: dict[str, np.ndarray], y: int) -> tuple[float, bool, bool]:
        whole = self.big_runner.run(x)
        big_right = _label(whole, self.final)[0] == y
        if self.exit_output is not None:
            label, values = _label(whole, self.exit_info)
        else:
            assert self.small_runner is not None and self.small is not None
            label, values = _label(
                self.small_runner.run({self.small.inputs[0].name: x[self.big.inputs[0].name]}),
                self.small.outputs[0],
            )
        return confidence(values, self.rule), label == y, big_right  # type: ignore[arg-type]

    def close(self) -> None:
        self.big_runner.close()
        if self.small_runner is not None:
            self.small_runner.close()


def calibrate(args: argparse.Namespace) -> int:
    big = load_graph(args.model)
    small = load_graph(args.small) if args.small else None
    if small is not None:
        check_pair(small, big)
    stages = _Stages(big, small, args.exit_output, args.rule, args.backend, args.threads)
    if args.split_at is not None:
        split_point = big.resolve_cut(args.split_at)
    else:
        split_point = stages.exit_cut if args.exit_output else big.num_operators // 2
    if args.exit_output and split_point < stages.exit_cut:
        raise EdgeError(
            f"--split-at {split_point} comes before the exit, which the head computes from cut {stages.exit_cut} on"
        )
    if args.plot is not None:
        plotting()  # before the work, and before anything is written
    feeds, labels = load_dataset(args.data, big)
    confidences, small_correct, big_correct = [], [], []
    try:
        for x, y in _progress(zip(feeds, labels, strict=True), len(labels), "calibrating", args.json):
            sure, local_right, big_right = stages.measure(x, int(y))
            confidences.append(sure)
            small_correct.append(local_right)
            big_correct.append(big_right)
    finally:
        stages.close()
    curve = sweep(confidences, small_correct, big_correct, float(big.cut(split_point).nbytes))
    target = (
        {"local_share": args.local_share}
        if args.local_share is not None
        else {"max_loss_pp": 0.5 if args.max_loss is None else args.max_loss}
    )
    chosen = choose(curve, max_loss_pp=target.get("max_loss_pp"), local_share=target.get("local_share"))
    calibration = Calibration(
        rule=args.rule,
        threshold=chosen.threshold,
        big=ModelRef(str(big.source), big.sha256),
        small=ModelRef(str(small.source), small.sha256) if small is not None else None,
        split_point=split_point,
        chosen=chosen,
        curve=tuple(curve),
        data=str(args.data),
        samples=len(labels),
        target=target,
        exit_output=args.exit_output,
    )
    calibration.save(args.out)
    if args.plot is not None:
        _plot(calibration, args.plot)
    report = _report(calibration.rule, chosen.threshold, chosen.local_share, chosen.accuracy,
                     chosen.reference_accuracy, chosen.bytes_per_request, curve)  # fmt: skip
    _print(report, args.json, f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    calibration = Calibration.load(args.cascade)
    big = calibration.big.load("big")
    small = calibration.small.load("small") if calibration.small is not None else None
    feeds, labels = load_dataset(args.data, big)
    if args.split_at is None:
        args.split_at = str(calibration.split_point)
    device = open_runner(args, big, local=not args.server)
    router = open_router(
        calibration,
        device,
        backend=args.backend,
        threads=args.threads,
        max_extra_loss_pp=args.max_extra_loss,
        deadline_ms=args.escalation_deadline_ms,
    )
    stages = _Stages(big, small, calibration.exit_output, calibration.rule, args.backend, args.threads)
    relaxed_answers = 0
    e2e: list[float] = []
    correct, local, sent, fallbacks = 0, 0, 0, 0
    confidences, small_correct, big_correct = [], [], []
    try:
        for x, y in _progress(zip(feeds, labels, strict=True), len(labels), "evaluating", args.json):
            result = router.infer(x)
            correct += _label(result.outputs, result.output_info[0])[0] == y
            local += not result.escalated
            relaxed_answers += not result.escalated and result.confidence < calibration.threshold
            sent += result.bytes_sent
            fallbacks += result.inference.fallback
            e2e.append(result.inference.timings.e2e_ms)
            # For the curve: both stages on every sample, here (the big model bit-identical to its cooperative run).
            sure, local_right, big_right = stages.measure(x, int(y))
            confidences.append(sure)
            small_correct.append(local_right)
            big_correct.append(big_right)
    finally:
        router.close()
        stages.close()
    n = len(labels)
    escalated = n - local
    curve = sweep(confidences, small_correct, big_correct, float(big.cut(calibration.split_point).nbytes))
    report = _report(calibration.rule, calibration.threshold, local / n, correct / n,
                     float(np.mean(big_correct)), sent / n, curve)  # fmt: skip
    report["escalated"] = escalated
    report["fallbacks"] = fallbacks
    report["relaxed_answers"] = relaxed_answers
    report["e2e_ms"] = summary(e2e)
    report["mean_e2e_ms"] = float(np.mean(e2e))
    _print(report, args.json, f"{n} samples from {args.data}; {escalated} escalated, {fallbacks} fell back")
    return 0


def _report(
    rule: str,
    threshold: float,
    share: float,
    accuracy: float,
    reference: float,
    nbytes: float,
    curve: list[Any],
) -> dict[str, Any]:
    return {
        "threshold": "inf" if math.isinf(threshold) else threshold,
        "rule": rule,
        "local_share": share,
        "accuracy": accuracy,
        "reference_accuracy": reference,
        "loss_pp": round((reference - accuracy) * 100.0, 6),
        "bytes_per_request": nbytes,
        "curve": [
            {
                "threshold": "inf" if math.isinf(p.threshold) else p.threshold,
                "local_share": p.local_share,
                "accuracy": p.accuracy,
                "loss_pp": p.loss_pp,
                "bytes_per_request": p.bytes_per_request,
            }
            for p in curve
        ],
    }


def _print(report: dict[str, Any], as_json: bool, footer: str) -> None:
    if as_json:
        print(json.dumps(report))
        return
    threshold = report["threshold"]
    print(
        f"threshold {threshold if isinstance(threshold, str) else f'{threshold:.4f}'} ({report['rule']}): "
        f"{report['local_share']:.1%} answered on the device, accuracy {report['accuracy']:.2%} against "
        f"{report['reference_accuracy']:.2%} for the big model alone ({report['loss_pp']:+.2f} pp lost), "
        f"{report['bytes_per_request']:,.0f} bytes per request"
    )
    print(footer, file=sys.stderr)


def _plot(calibration: Calibration, path: Path) -> None:
    plt = plotting()
    shares = [p.local_share * 100 for p in calibration.curve]
    accuracies = [p.accuracy * 100 for p in calibration.curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(shares, accuracies, marker=".", label=f"cascade ({calibration.rule})")
    ax.axhline(
        calibration.chosen.reference_accuracy * 100, color="grey", linestyle="--", label="big model alone"
    )
    ax.plot([calibration.chosen.local_share * 100], [calibration.chosen.accuracy * 100], "o", color="red",
            label=f"chosen: threshold {calibration.threshold:.3f}")  # fmt: skip
    ax.set_xlabel("answered on the device (%)")
    ax.set_ylabel("accuracy (%)")
    first = (
        f"{Path(calibration.small.path).stem} → "
        if calibration.small is not None
        else f"exit {calibration.exit_output} of "
    )
    ax.set_title(f"{first}{Path(calibration.big.path).stem}, {calibration.samples} samples")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path)
