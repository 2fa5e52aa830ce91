"""Calibrated feature codecs for the tensors that cross a cut: searched on the user's data, kept in
a CODEC.json, used by the device to send fewer bytes.

:func:`calibrate` runs the head on calibration samples, fits :class:`~edge.wire.calibrated.ChannelCodec`
candidates (bits 1–8, the channel ranges from percentiles, the channels of least energy dropped) on
one half of them and measures each on the other, both ways: the bytes it sends, and the loss it costs at the
model's output. With labels the loss is accuracy points against the exact model; without, the share
of samples whose top-1 class differs from the exact model's. It keeps, per cut, the smallest
candidate within ``max_loss_pp``, the whole rate–loss curve, and the fitted codecs of the curve's
front (each smaller than every codec of less loss), so that a device can be given another loss
bound later (:meth:`CodecFile.within`) without the calibration data.

A :class:`CodecFile` holds the model's sha256 and, per cut, each tensor's codec; the device encodes a
cut tensor with it only for that model and cut (else the tensor goes as it is).
"""

from __future__ import annotations

import itertools
import json
import math
from argparse import ArgumentParser, ArgumentTypeError, Namespace
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np

from .argtypes import non_negative_float
from .errors import ConfigError, EdgeError, TensorFormatError
from .fileio import read_bounded, save_text
from .graph import ModelGraph
from .runner import ModelRunner
from .wire import ENCODING, WireTensor, encodings
from .wire.calibrated import NAME, ChannelCodec

__all__ = [
    "BITS",
    "CLIPS",
    "CODEC_NAMES",
    "DROPS",
    "CodecFile",
    "CutCodec",
    "Point",
    "add_max_loss_arg",
    "bound_codec",
    "calibrate",
    "codec_arg",
    "fit",
    "measure",
]

FORMAT = "edge-feature-codec/1"
BITS = tuple(range(1, 9))
CLIPS = (0.0, 0.001, 0.01)
"""Share of each channel's calibration values left outside its range, at each end."""
DROPS = (0.0, 0.25, 0.5)
"""Share of each tensor's channels dropped, those of least energy first."""
FRONT_LOSS_PP = 10.0
"""The front's codecs kept in a file lose at most this much (they are few: one per loss level)."""
MAX_FILE_BYTES = 16 * 1024 * 1024

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Point:
    """One candidate at one cut: its setting, the bytes it sends per request, and what it costs."""

    bits: int
    clip: float
    drop: float
    bytes: float
    loss_pp: float
    agreement: float
    """Share of the samples whose top-1 class is the exact model's."""
    risk_pp: float = 0.0
    """Share of the samples flipped or brought near a flip (:func:`at_risk`), in points."""

    @property
    def worst_pp(self) -> float:
        """The larger of its loss and the samples it put at risk: what a loss bound bounds."""
        return max(self.loss_pp, self.risk_pp)

    def within(self, max_loss_pp: float) -> bool:
        """Its loss, and the samples it put at risk, are both within ``max_loss_pp``."""
        return self.worst_pp <= max_loss_pp + 1e-9

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "clip": self.clip,
            "drop": self.drop,
            "bytes": round(self.bytes, 2),
            "loss_pp": round(self.loss_pp, 4),
            "agreement": round(self.agreement, 6),
            "risk_pp": round(self.risk_pp, 4),
        }


@dataclass(frozen=True, slots=True)
class CutCodec:
    """The codec chosen at one cut, and the curve it was chosen from."""

    split_point: int
    raw_bytes: int
    chosen: Point | None
    """None: no candidate stays within the loss and sends fewer bytes than the raw tensors; they go as
    they are."""
    tensors: Mapping[str, ChannelCodec]
    curve: tuple[Point, ...] = ()
    front: tuple[tuple[Point, Mapping[str, ChannelCodec]], ...] = ()
    """The curve's front, fitted: each setting smaller than every one of less loss, the chosen among them."""

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.chosen.bytes if self.chosen is not None else 1.0

    def within(self, max_loss_pp: float) -> CutCodec:
        """The front's smallest codec within ``max_loss_pp`` (none: the tensors go raw)."""
        fits = [option for option in self.front if option[0].within(max_loss_pp)]
        point, tensors = min(fits, key=lambda o: o[0].bytes) if fits else (None, {})
        return CutCodec(self.split_point, self.raw_bytes, point, tensors, self.curve, self.front)

    def to_json(self) -> dict[str, Any]:
        return {
            "split_point": self.split_point,
            "raw_bytes": self.raw_bytes,
            "chosen": self.chosen.to_json() if self.chosen is not None else None,
            "tensors": {name: codec.to_json() for name, codec in self.tensors.items()},
            "curve": [p.to_json() for p in self.curve],
            "front": [
                {"point": p.to_json(), "tensors": {name: c.to_json() for name, c in tensors.items()}}
                for p, tensors in self.front
            ],
        }


@dataclass(frozen=True, slots=True)
class CodecFile:
    """A calibration's result: what a device sends its cut tensors with, per cut, for one model."""

    model_sha256: str
    model: str
    labels: bool
    max_loss_pp: float
    samples: int
    cuts: Mapping[int, CutCodec]
    chosen: int | None = None
    """With several cuts: the one whose codec sends the fewest bytes within the loss."""
    source: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"calibrated ({Path(self.source).name or 'codec'})"

    def within(self, max_loss_pp: float) -> CodecFile:
        """This file with each cut's codec chosen again, the smallest of its front within ``max_loss_pp``."""
        if not math.isfinite(max_loss_pp) or max_loss_pp < 0:
            raise ConfigError(f"a loss bound is a number of points, 0 or more, not {max_loss_pp}")
        cuts = {k: cut.within(max_loss_pp) for k, cut in self.cuts.items()}
        return CodecFile(
            self.model_sha256, self.model, self.labels, max_loss_pp, self.samples, cuts,
            _fewest(cuts), self.source,
        )  # fmt: skip

    def check_model(self, graph: ModelGraph) -> None:
        if graph.sha256 != self.model_sha256:
            raise ConfigError(
                f"{self.source or 'the codec'} was calibrated for another model (sha256 "
                f"{self.model_sha256[:12]}…, not {graph.sha256[:12]}… of {Path(graph.source).name})"
            )

    def compress(
        self, tensor: WireTensor, split_point: object, model_sha256: object, known: Container[bytes]
    ) -> tuple[WireTensor, bytes | None]:
        """``tensor`` encoded with its codec at ``split_point``, and the id of the codec table it carries
        inline (None: the receiver ``known`` to hold it is sent its id). As it is, and None, when this
        file has no codec for it (another model or cut, or a tensor that is not int8 with the codec's
        channels)."""
        if model_sha256 != self.model_sha256 or not isinstance(split_point, int):
            return tensor, None
        cut = self.cuts.get(split_point)
        codec = cut.tensors.get(tensor.name) if cut is not None else None
        if (
            codec is None
            or tensor.datatype != "INT8"
            or not tensor.shape
            or not isinstance(tensor.data, bytes)
        ):
            return tensor, None
        if tensor.shape[-1] != codec.channels:
            return tensor, None
        values = np.frombuffer(tensor.data, dtype=np.int8).reshape(tensor.shape)
        table_id = codec.table_id
        inline = table_id not in known or len(codec.table) <= len(table_id)
        frame = codec.encode(values, inline=inline)
        sent = WireTensor(
            tensor.name, tensor.datatype, tensor.shape, frame, {**tensor.parameters, ENCODING: NAME}
        )
        return sent, table_id if inline else None

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "labels": self.labels,
            "max_loss_pp": self.max_loss_pp,
            "samples": self.samples,
            "chosen": self.chosen,
            "cuts": [cut.to_json() for cut in self.cuts.values()],
        }
        return json.dumps(body, indent=1) + "\n"

    def save(self, path: Path) -> None:
        save_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> CodecFile:
        text = read_bounded(path, MAX_FILE_BYTES, "codec file")
        try:
            body = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not a codec file (not JSON: {err})") from err
        return cls.from_json(body, str(path))

    @classmethod
    def from_json(cls, body: Any, source: str) -> CodecFile:
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ConfigError(
                f"{source}: not a codec file (its format is not {FORMAT!r}); make one with edge codec calibrate"
            )
        try:
            cuts = {}
            for entry in body["cuts"]:
                k = int(entry["split_point"])
                tensors = {
                    str(name): ChannelCodec.from_json(codec, f"{source}: cut {k}, tensor {name[:60]!r}")
                    for name, codec in entry["tensors"].items()
                }
                chosen = _point(entry["chosen"]) if entry["chosen"] is not None else None
                curve = tuple(_point(p) for p in entry.get("curve", ()))
                front = tuple(
                    (_point(option["point"]), {
                        str(name): ChannelCodec.from_json(codec, f"{source}: cut {k}, front, tensor {name[:60]!r}")
                        for name, codec in option["tensors"].items()
                    })
                    for option in entry.get("front", ())
                ) or (((chosen, tensors),) if chosen is not None else ())  # fmt: skip
                cuts[k] = CutCodec(k, int(entry["raw_bytes"]), chosen, tensors, curve, front)
            return cls(
                model_sha256=str(body["model_sha256"]),
                model=str(body.get("model", "")),
                labels=bool(body["labels"]),
                max_loss_pp=float(body["max_loss_pp"]),
                samples=int(body["samples"]),
                cuts=cuts,
                chosen=None if body.get("chosen") is None else int(body["chosen"]),
                source=source,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{source}: a malformed codec file ({type(err).__name__}: {err})") from err
        except TensorFormatError as err:
            raise ConfigError(str(err)) from err


def _point(body: Mapping[str, Any]) -> Point:
    return Point(
        int(body["bits"]),
        float(body["clip"]),
        float(body["drop"]),
        float(body["bytes"]),
        float(body["loss_pp"]),
        float(body["agreement"]),
        float(body["risk_pp"]),
    )


class Fitter:
    """What :func:`fit` needs of a set of samples, computed once for every candidate: each tensor's
    per-channel percentiles (one sort), variance and mean."""

    def __init__(self, samples: Sequence[Feeds]) -> None:
        self.stats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name in samples[0]:
            channels = samples[0][name].shape[-1]
            x = np.concatenate([s[name].reshape(-1, channels) for s in samples])
            ordered = np.sort(x, axis=0).astype(np.float64)
            mean = np.clip(np.rint(ordered.mean(axis=0)), -128, 127)
            self.stats[name] = (ordered, ordered.var(axis=0), mean)

    def codecs(self, bits: int, clip: float, drop: float) -> dict[str, ChannelCodec]:
        """A codec per tensor: each channel's range spans its values but the ``clip`` share at each
        end; the ``drop`` share of channels of least variance are rebuilt as their mean, and so is any
        channel that never varies."""
        codecs = {}
        for name, (ordered, variance, mean) in self.stats.items():
            channels = ordered.shape[1]
            lo = np.floor(np.percentile(ordered, clip * 100, axis=0))
            hi = np.ceil(np.percentile(ordered, 100 - clip * 100, axis=0))
            kept = variance > 0
            kept[np.argsort(variance, kind="stable")[: int(drop * channels)]] = False
            lo, hi = np.where(kept, lo, mean), np.where(kept, hi, mean)
            codecs[name] = ChannelCodec(
                bits, tuple(int(v) for v in lo), tuple(int(v) for v in hi), tuple(bool(k) for k in kept)
            )
        return codecs


def fit(samples: Sequence[Feeds], bits: int, clip: float, drop: float) -> dict[str, ChannelCodec]:
    """:meth:`Fitter.codecs` on ``samples`` (each a cut's tensors)."""
    return Fitter(samples).codecs(bits, clip, drop)


@dataclass(frozen=True, slots=True)
class Measured:
    """A codec on evaluation samples: bytes per request, and the tail's output for each sample."""

    bytes: float
    scores: np.ndarray
    """[samples, classes]: the tail's first output, as numbers."""

    @property
    def classes(self) -> np.ndarray:
        return np.asarray(self.scores.argmax(axis=1))


def at_risk(exact: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per sample: the codec changed its top-1 class, or halved the margin by which the exact model's
    class leads. Top-1 flips on a few hundred samples are rare and noisy, and the smallest codec whose
    flips happen to stay within a loss on them loses more on other data; samples it brought near a flip
    say where it stands."""
    rows = np.arange(len(exact))
    top = exact.argmax(axis=1)
    others = exact.copy()
    others[rows, top] = -np.inf
    margin = exact[rows, top] - others.max(axis=1)
    rivals = got.copy()
    rivals[rows, top] = -np.inf
    left = got[rows, top] - rivals.max(axis=1)
    return np.asarray((got.argmax(axis=1) != top) | (left < margin / 2))


def measure(
    runner: ModelRunner, k: int, heads: Sequence[Feeds], codecs: Mapping[str, ChannelCodec] | None
) -> Measured:
    """The tail of cut ``k`` on each head's tensors, sent through ``codecs`` (None: as they are)."""
    output = runner.graph.cut(k).tail_outputs[0].name
    total = 0
    scores = []
    for head in heads:
        sent: dict[str, np.ndarray] = {}
        for name, values in head.items():
            codec = codecs.get(name) if codecs is not None else None
            if codec is None:
                sent[name] = values
                total += values.nbytes
                continue
            frame = codec.encode(
                values, inline=False
            )  # what each request sends once the server holds the table
            total += len(frame)
            sent[name] = codec.decode(values.shape, frame)
        scores.append(runner.run_tail(k, sent)[output].reshape(-1).astype(np.float64))
    return Measured(total / max(1, len(heads)), np.array(scores))


def calibratable(graph: ModelGraph, k: int) -> str | None:
    """Why cut ``k`` cannot be calibrated, or None."""
    cut = graph.cut(k)
    if not cut.tensors:
        return "nothing crosses it"
    if len(cut.tail_outputs) != 1:
        return f"its tail computes {len(cut.tail_outputs)} outputs; the loss is measured on one"
    for t in cut.tensors:
        if t.dtype != np.int8 or len(t.shape) < 2:
            return f"tensor {t.name[:60]!r} is {t.dtype.name}{list(t.shape)}, not an int8 feature map"
    return None


def calibrate(
    runner: ModelRunner,
    feeds: Sequence[Feeds],
    labels: np.ndarray | None,
    cuts: Iterable[int],
    *,
    max_loss_pp: float,
    grid: Iterable[tuple[int, float, float]] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> CodecFile:
    """Search the codecs at each of ``cuts`` (see the module's docstring). Each candidate is measured
    by two-fold cross-validation: fitted on one half of ``feeds`` and measured on the other, then the
    other way round, so every sample counts in its loss and none is measured by a codec fitted on it.
    The codec kept is the chosen setting fitted on all of them. ``progress`` is told each cut's name
    and how many candidates it has."""
    graph = runner.graph
    if len(feeds) < 4:
        raise EdgeError(
            f"calibration needs at least 4 samples (half to fit, half to measure), not {len(feeds)}"
        )
    half = len(feeds) // 2
    folds = ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half)))
    settings = list(grid if grid is not None else itertools.product(BITS, CLIPS, DROPS))
    results: dict[int, CutCodec] = {}
    for k in cuts:
        problem = calibratable(graph, k)
        if problem is not None:
            raise EdgeError(f"cut {k} cannot take a calibrated codec: {problem}")
        if progress is not None:
            progress(f"cut {k}", len(settings))
        heads = [runner.run_head(k, feed).cut for feed in feeds]
        exact = measure(runner, k, heads, None)
        reference = labels if labels is not None else exact.classes
        exact_right = float(np.mean(exact.classes == reference))
        curve = []
        fitters = [(Fitter(heads[fitting]), held) for fitting, held in folds]
        for bits, clip, drop in settings:
            scores = np.empty_like(exact.scores)
            sent = 0.0
            for fitter, held in fitters:
                got = measure(runner, k, heads[held], fitter.codecs(bits, clip, drop))
                scores[held] = got.scores
                sent += got.bytes * len(got.scores)
            classes = scores.argmax(axis=1)
            loss = (exact_right - float(np.mean(classes == reference))) * 100
            agreement = float(np.mean(classes == exact.classes))
            risk = float(np.mean(at_risk(exact.scores, scores))) * 100
            curve.append(Point(bits, clip, drop, sent / len(heads), loss, agreement, risk))
            if progress is not None:
                progress("", 1)
        everyone = Fitter(heads)
        fitted = tuple(
            (p, everyone.codecs(p.bits, p.clip, p.drop))
            for p in front(curve, exact.bytes, max(FRONT_LOSS_PP, max_loss_pp))
        )
        results[k] = CutCodec(k, int(exact.bytes), None, {}, tuple(curve), fitted).within(max_loss_pp)
    return CodecFile(
        model_sha256=graph.sha256,
        model=Path(graph.source).name,
        labels=labels is not None,
        max_loss_pp=max_loss_pp,
        samples=len(feeds),
        cuts=results,
        chosen=_fewest(results),
    )


def front(curve: Iterable[Point], raw_bytes: float, limit_pp: float = FRONT_LOSS_PP) -> list[Point]:
    """The points smaller than the raw tensors and than every point of less loss, smallest first; a
    point's loss here is :attr:`Point.worst_pp`, what :meth:`Point.within` bounds. Those losing more
    than ``limit_pp`` are left out."""
    kept: list[Point] = []
    for p in sorted(curve, key=lambda p: (p.bytes, p.worst_pp)):
        if p.bytes < raw_bytes and p.worst_pp <= limit_pp and (not kept or p.worst_pp < kept[-1].worst_pp):
            kept.append(p)
    return kept


def _fewest(cuts: Mapping[int, CutCodec]) -> int | None:
    """With several cuts, the one whose codec sends the fewest bytes."""
    coded = [c for c in cuts.values() if c.chosen is not None]
    if len(cuts) < 2 or not coded:
        return None
    return min(coded, key=lambda c: c.chosen.bytes if c.chosen is not None else math.inf).split_point


CODEC_NAMES: tuple[str, ...] = get_args(encodings.CodecName)


def codec_arg(text: str) -> str | CodecFile:
    """A codec's name, or a calibrated codec's file (CODEC.json)."""
    if text in CODEC_NAMES:
        return text
    if not text.endswith(".json"):
        raise ArgumentTypeError(f"choose one of {', '.join(CODEC_NAMES)}, or a CODEC.json, not {text!r}")
    try:
        return CodecFile.load(Path(text))
    except ConfigError as err:
        raise ArgumentTypeError(str(err)) from err


def add_max_loss_arg(p: ArgumentParser) -> None:
    p.add_argument(
        "--max-loss",
        type=non_negative_float,
        dest="codec_max_loss",
        metavar="PP",
        help="with --codec CODEC.json: the loss allowed, in points; each cut's codec is chosen again from "
        "the calibration's front, the smallest within it (default: the --max-loss it was calibrated with)",
    )


def bound_codec(args: Namespace) -> None:
    """Apply ``--max-loss`` to a calibrated ``--codec``; it means nothing to any other."""
    max_loss = getattr(args, "codec_max_loss", None)
    if max_loss is None:
        return
    if not isinstance(getattr(args, "codec", None), CodecFile):
        raise ConfigError(
            "--max-loss chooses among a calibrated codec's settings: it goes with --codec CODEC.json"
        )
    args.codec = args.codec.within(max_loss)
