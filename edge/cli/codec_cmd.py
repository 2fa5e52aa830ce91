"""``edge codec calibrate`` and ``edge codec eval``: a feature codec fitted on the user's data, and checked."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..argtypes import non_negative_float
from ..codec import CodecFile, calibratable, calibrate, measure
from ..errors import EdgeError
from ..graph import ModelGraph
from ..runner import ModelRunner
from .cascade_cmd import load_samples
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "codec",
        help="fit a lossy codec for the cut tensors on your data, and measure it",
        description="Calibrated feature codecs: each cut tensor requantized per channel to 1-8 bits on ranges "
        "from calibration data, its idle channels dropped, then zstd. The server decodes them without state.",
    )
    commands = p.add_subparsers(dest="codec_command", metavar="COMMAND", required=True)
    c = commands.add_parser(
        "calibrate",
        help="search the smallest codec within a loss, on calibration data",
        description="Run the head on the samples of FILE.npz (x; y, integer labels, optional), fit codecs on "
        "the first half and measure them on the second: the bytes each sends and its loss (accuracy points "
        "against the exact model with labels, else the share of top-1 classes that differ from the exact "
        "model's). Writes the smallest within --max-loss, per cut, with the whole rate-loss curve, to CODEC.json.",
    )
    c.add_argument("--model", required=True, help=MODEL_HELP)
    c.add_argument(
        "--data", required=True, type=Path, metavar="FILE.npz", help="x, and optionally y (labels)"
    )
    c.add_argument(
        "--split-at",
        default=None,
        metavar="K[,K...]|auto",
        help="the cut (an index or a tensor name), several separated by commas (the planner's candidates, "
        "from edge plan), or auto: every cut that sends int8 feature maps, the input's included; with "
        "several, the smallest within the loss is named (default: the middle cut)",
    )
    c.add_argument(
        "--max-loss",
        required=True,
        type=non_negative_float,
        metavar="PP",
        help="the loss allowed, in percentage points",
    )
    c.add_argument("--out", required=True, type=Path, metavar="CODEC.json", help="where to write the codec")
    c.add_argument("--plot", type=Path, metavar="FILE.png", help="draw bytes per request against loss")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    add_backend_args(c)
    c.set_defaults(func=_calibrate)

    e = commands.add_parser(
        "eval",
        help="measure a calibrated codec on data, locally or through a server",
        description="Send the cut tensors of each sample of FILE.npz through the codec (--codec CODEC.json) and report accuracy (with "
        "labels), reference_accuracy (the exact model), agreement (top-1 classes equal to the exact model's), "
        "bytes_per_request and raw_bytes_per_request, per cut. With --server the requests go through it.",
    )
    e.add_argument(
        "--model", help="the model (default: the one the codec names, if it is shipped or beside it)"
    )
    e.add_argument(
        "--data", required=True, type=Path, metavar="FILE.npz", help="x, and optionally y (labels)"
    )
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    add_backend_args(e)
    add_server_args(e)
    e.set_defaults(func=_evaluate)


def _cuts(graph: ModelGraph, spec: str | None) -> list[int]:
    if spec == "auto":
        cuts = [k for k in range(graph.num_operators) if calibratable(graph, k) is None]
        if not cuts:
            raise EdgeError("no cut of this model sends int8 feature maps to a tail with one output")
        return cuts
    if spec is None:
        specs: list[str | int] = [graph.num_operators // 2]
    elif "," in spec and spec.strip() not in graph.tensor_by_name:
        specs = [one.strip() for one in spec.split(",")]
    else:
        specs = [spec]
    cuts = sorted({graph.resolve_cut(one) for one in specs})
    for k in cuts:
        problem = calibratable(graph, k)
        if problem is not None:  # said before the samples are read and the heads run
            raise EdgeError(f"cut {k} cannot take a calibrated codec: {problem}")
    return cuts


class _Progress:
    """A progress bar on stderr over every candidate, named by the cut being searched."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar: Any = None
        if quiet or not sys.stderr.isatty():
            return
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.task = self.bar.add_task("calibrating", total=total)
        self.bar.start()

    def __call__(self, what: str, count: int) -> None:
        if self.bar is None:
            return
        if what:
            self.bar.update(self.task, description=what)
        else:
            self.bar.advance(self.task, count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _calibrate(args: argparse.Namespace) -> int:
    graph = load_graph(args.model)
    if args.plot is not None:
        plotting()  # before the work
    cuts = _cuts(graph, args.split_at)
    feeds, labels = load_samples(args.data, graph, labelled=False)
    from ..codec import BITS, CLIPS, DROPS

    progress = _Progress(len(cuts) * len(BITS) * len(CLIPS) * len(DROPS), args.json)
    try:
        with ModelRunner(graph, backend=args.backend, threads=args.threads) as runner:
            result = calibrate(runner, feeds, labels, cuts, max_loss_pp=args.max_loss, progress=progress)
    finally:
        progress.close()
    result.save(args.out)
    if args.plot is not None:
        _plot(result, args.plot)
    rows = [
        {
            "split_point": cut.split_point,
            "raw_bytes": cut.raw_bytes,
            "bytes": cut.chosen.bytes if cut.chosen is not None else None,
            "ratio": round(cut.ratio, 2),
            "loss_pp": cut.chosen.loss_pp if cut.chosen is not None else None,
            "bits": cut.chosen.bits if cut.chosen is not None else None,
            "clip": cut.chosen.clip if cut.chosen is not None else None,
            "drop": cut.chosen.drop if cut.chosen is not None else None,
        }
        for cut in result.cuts.values()
    ]
    if args.json:
        print(json.dumps({"codec": str(args.out), "chosen": result.chosen, "cuts": rows}, indent=1))
        return 0
    what = "labels (accuracy points)" if labels is not None else "no labels (top-1 disagreement)"
    print(f"{len(feeds)} samples, {what}; within {args.max_loss:g} pp:")
    print(f"{'cut':>4} {'raw B':>8} {'sent B':>8} {'ratio':>6} {'loss pp':>8}  setting")
    for row in rows:
        if row["bytes"] is None:
            print(
                f"{row['split_point']:>4} {row['raw_bytes']:>8} {'-':>8} {'-':>6} {'-':>8}  none within the loss"
            )
            continue
        print(
            f"{row['split_point']:>4} {row['raw_bytes']:>8} {row['bytes']:>8.1f} {row['ratio']:>6.2f} "
            f"{row['loss_pp']:>8.2f}  {row['bits']} bits, clip {row['clip']:g}, drop {row['drop']:g}"
        )
    if result.chosen is not None:
        print(f"chosen: cut {result.chosen}")
    print(f"wrote {args.out}")
    return 0


def _plot(result: CodecFile, path: Path) -> None:
    plt = plotting()
    k = result.chosen if result.chosen is not None else next(iter(result.cuts))
    cut = result.cuts[k]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.get_cmap("viridis")
    markers = dict(zip(sorted({p.drop for p in cut.curve}), "os^v<>", strict=False))
    for bits in sorted({p.bits for p in cut.curve}):
        for drop, marker in markers.items():
            points = [p for p in cut.curve if p.bits == bits and p.drop == drop]
            label = f"{bits} bit{'s' if bits > 1 else ''}" if drop == min(markers) else None
            ax.scatter([p.bytes for p in points], [p.loss_pp for p in points], s=16, marker=marker,
                       color=colours((bits - 1) / 7), label=label)  # fmt: skip
    for drop, marker in markers.items():
        ax.scatter([], [], marker=marker, color="grey", label=f"{drop:.0%} channels dropped")
    ax.scatter([cut.raw_bytes], [0.0], marker="s", s=40, color="black", label="exact (raw int8)")
    ax.axhline(result.max_loss_pp, color="grey", linestyle="--", label=f"{result.max_loss_pp:g} pp")
    if cut.chosen is not None:
        ax.scatter([cut.chosen.bytes], [cut.chosen.loss_pp], s=110, facecolors="none", edgecolors="red",
                   label=f"chosen: {cut.ratio:.1f}x fewer bytes")  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("bytes per request")
    ax.set_ylabel("accuracy loss (pp)" if result.labels else "top-1 disagreement (pp)")
    ax.set_title(f"{result.model}, cut {k}: {result.samples} samples, two-fold")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path)


def _evaluate(args: argparse.Namespace) -> int:
    codec = args.codec
    if not isinstance(codec, CodecFile):
        raise EdgeError("edge codec eval needs --codec CODEC.json (a file written by edge codec calibrate)")
    graph = load_graph(args.model or _beside(codec, Path(codec.source)))
    codec.check_model(graph)
    feeds, labels = load_samples(args.data, graph, labelled=False)
    cuts = [graph.resolve_cut(args.split_at)] if args.split_at is not None else list(codec.cuts)
    rows = []
    with ModelRunner(graph, backend=args.backend, threads=args.threads) as runner:
        exact = np.array([_top1(runner.run(feed), graph) for feed in feeds])
        for k in cuts:
            cut = codec.cuts.get(k)
            if cut is None:
                raise EdgeError(
                    f"{codec.source} holds no codec for cut {k}; it has {', '.join(map(str, codec.cuts))}"
                )
            heads = [runner.run_head(k, feed).cut for feed in feeds]
            raw = measure(runner, k, heads[:1], None).bytes
            if args.server:
                got, sent, lossy, fallbacks = _through_server(args, graph, codec, k, feeds)
            else:
                measured = measure(runner, k, heads, cut.tensors)
                got, sent, lossy, fallbacks = measured.classes, measured.bytes, len(feeds), 0
            rows.append(_row(k, got, exact, labels, sent, raw, lossy, fallbacks))
    report: dict[str, Any] = {"samples": len(feeds), "server": args.server, "cuts": rows}
    report.update({key: rows[0][key] for key in rows[0] if key != "split_point"})
    report["split_point"] = rows[0]["split_point"]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"{len(feeds)} samples from {args.data}" + (f", through {args.server}" if args.server else ", here")
    )
    print(
        f"{'cut':>4} {'accuracy':>9} {'reference':>9} {'agreement':>9} {'sent B':>8} {'raw B':>8} {'ratio':>6}"
    )
    for row in rows:
        acc = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        ref = f"{row['reference_accuracy']:.4f}" if row["reference_accuracy"] is not None else "-"
        print(
            f"{row['split_point']:>4} {acc:>9} {ref:>9} {row['agreement']:>9.4f} {row['bytes_per_request']:>8.1f} "
            f"{row['raw_bytes_per_request']:>8.0f} {row['ratio']:>6.2f}"
            + (f"  ({row['fallbacks']} fell back)" if row["fallbacks"] else "")
        )
    return 0


def _beside(codec: CodecFile, path: Path) -> str:
    """The model a codec names: a file of that name beside the codec, else a shipped model of that stem."""
    beside = path.parent / codec.model
    return str(beside) if beside.is_file() else Path(codec.model).stem


def _top1(outputs: dict[str, np.ndarray], graph: ModelGraph) -> int:
    return int(np.argmax(outputs[graph.outputs[0].name]))


def _through_server(
    args: argparse.Namespace, graph: ModelGraph, codec: CodecFile, k: int, feeds: list[dict[str, np.ndarray]]
) -> tuple[np.ndarray, float, int, int]:
    args.split_at = str(k)
    device = open_runner(args, graph)
    classes, sent, lossy, fallbacks = [], 0, 0, 0
    try:
        for feed in feeds:
            result = device.infer(feed)
            classes.append(_top1(result.outputs, graph))
            sent += result.bytes_sent
            lossy += bool(result.lossy)
            fallbacks += result.fallback
    finally:
        device.close()
    return np.array(classes), sent / len(feeds), lossy, fallbacks


def _row(
    k: int,
    got: np.ndarray,
    exact: np.ndarray,
    labels: np.ndarray | None,
    sent: float,
    raw: float,
    lossy: int,
    fallbacks: int,
) -> dict[str, Any]:
    return {
        "split_point": k,
        "accuracy": float(np.mean(got == labels)) if labels is not None else None,
        "reference_accuracy": float(np.mean(exact == labels)) if labels is not None else None,
        "agreement": float(np.mean(got == exact)),
        "bytes_per_request": sent,
        "raw_bytes_per_request": raw,
        "ratio": raw / sent if sent else 0.0,
        "lossy_results": lossy,
        "fallbacks": fallbacks,
    }
