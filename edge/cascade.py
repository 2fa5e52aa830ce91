"""Answer on the device what it is sure of, and escalate the rest: a cascade of a small model and the big one.

The small model runs first, on the device. When its confidence, computed on its dequantized
outputs by one of :data:`RULES`, is at or above the threshold, its answer is final. Otherwise
the request takes the big model's cooperative path (head here, tail on the edge server, or all
here when no server answers), whose outputs are bit-identical to the big model's.

A :class:`Calibration` (``edge calibrate``) runs both models on labelled data, sweeps the
threshold over every confidence seen, and records, for each, the share answered on the
device, the cascade's accuracy, the big model's accuracy alone and the bytes sent per request;
then it picks the threshold that meets a target (an accuracy loss, or a local share).

Rules (each higher when the model is surer):

- ``maxprob``: the largest probability;
- ``margin``: the largest probability minus the second;
- ``entropy``: 1 - H(p) / log(C), the entropy of the C probabilities turned into [0, 1].

Outputs that already form a distribution (a softmax output) are the probabilities; other
outputs are logits, and the probabilities are their softmax.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np

from .cooperative import CooperativeRunner, EarlyStop, FixedSplit, InferenceResult, StageTimings
from .errors import ConfigError, EdgeError
from .fileio import read_bounded, save_text
from .graph import ModelGraph, TensorInfo
from .outputs import dequantize, probabilities
from .runner import ModelRunner

__all__ = [
    "CALIBRATION_FORMAT",
    "RULES",
    "Calibration",
    "Cascade",
    "CascadeResult",
    "CurvePoint",
    "EarlyExit",
    "ModelRef",
    "Pressure",
    "Router",
    "choose",
    "confidence",
    "escalated",
    "exit_cut",
    "exit_outputs",
    "open_router",
    "relaxed_threshold",
    "sweep",
]

Rule = Literal["maxprob", "margin", "entropy"]
RULES: tuple[Rule, ...] = get_args(Rule)
CALIBRATION_FORMAT = "edge-cascade-calibration/1"
AnsweredBy = Literal["device-exit", "device-small", "server", "device-big"]


def _rule(rule: str) -> Rule:
    if rule not in RULES:
        raise EdgeError(f"unknown confidence rule {rule!r}; choose one of: {', '.join(RULES)}")
    return rule  # type: ignore[return-value]


def _pressure(threshold: float | Pressure) -> Pressure:
    return threshold if isinstance(threshold, Pressure) else Pressure(threshold)


def confidence(values: np.ndarray, rule: Rule) -> float:
    """How sure a classifier is of its top class, from its real-valued outputs; see the module doc."""
    p = probabilities(np.asarray(values, dtype=np.float64).reshape(-1))
    if p.size == 0:
        raise EdgeError("a classifier output with no classes has no confidence")
    if rule == "maxprob":
        return float(p.max())
    if rule == "margin":
        if p.size == 1:
            return float(p[0])
        top = np.partition(p, -2)[-2:]
        return float(top[1] - top[0])
    if rule == "entropy":
        if p.size == 1:
            return 1.0
        nonzero = p[p > 0]
        return float(1.0 - (-(nonzero * np.log(nonzero)).sum()) / math.log(p.size))
    raise EdgeError(f"unknown confidence rule {rule!r}; choose one of: {', '.join(RULES)}")


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """The cascade at one threshold, measured on labelled data."""

    threshold: float
    local_share: float
    accuracy: float
    reference_accuracy: float
    loss_pp: float
    """The big model's accuracy alone minus the cascade's, in percentage points."""
    bytes_per_request: float


def sweep(
    confidences: Sequence[float],
    small_correct: Sequence[bool],
    big_correct: Sequence[bool],
    escalated_bytes: float,
) -> list[CurvePoint]:
    """The cascade at every threshold that changes it: each confidence seen (the requests at or above
    it answered on the device), and +inf (everything escalated); ascending thresholds."""
    conf = np.asarray(confidences, dtype=np.float64)
    small = np.asarray(small_correct, dtype=bool)
    big = np.asarray(big_correct, dtype=bool)
    if not (conf.size == small.size == big.size) or conf.size == 0:
        raise EdgeError("a sweep needs one confidence and two outcomes per sample, and at least one sample")
    reference = float(big.mean())
    points = []
    for threshold in [*np.unique(conf).tolist(), math.inf]:
        local = conf >= threshold
        correct = np.where(local, small, big)
        share = float(local.mean())
        accuracy = float(correct.mean())
        points.append(
            CurvePoint(
                threshold=float(threshold),
                local_share=share,
                accuracy=accuracy,
                reference_accuracy=reference,
                loss_pp=round((reference - accuracy) * 100.0, 10),
                bytes_per_request=(1.0 - share) * escalated_bytes,
            )
        )
    return points


def choose(
    curve: Sequence[CurvePoint], *, max_loss_pp: float | None = None, local_share: float | None = None
) -> CurvePoint:
    """The point that meets the target.

    ``max_loss_pp``: the largest local share whose loss is at most that (ties: the higher
    threshold). ``local_share``: the least loss among the points answering at least that share
    on the device; of those, the one closest to the share asked for (the highest threshold:
    the least exposed to confident mistakes on other data). With neither, a loss of at most 0.5 pp.
    """
    if max_loss_pp is not None and local_share is not None:
        raise EdgeError("give a largest accuracy loss or a local share, not both")
    if local_share is not None:
        meeting = [p for p in curve if p.local_share >= local_share]
        if not meeting:
            raise EdgeError(f"no threshold answers {local_share:.0%} of requests on the device")
        return min(meeting, key=lambda p: (p.loss_pp, p.local_share, -p.threshold))
    bound = 0.5 if max_loss_pp is None else max_loss_pp
    meeting = [p for p in curve if p.loss_pp <= bound + 1e-9]
    if not meeting:  # the all-escalated point has no loss: only a negative bound fails
        raise EdgeError(f"no threshold loses at most {bound:g} percentage points")
    return max(meeting, key=lambda p: (p.local_share, p.threshold))


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model as a calibration names it: where it was found, and the bytes it must have."""

    path: str
    sha256: str

    def load(self, role: str) -> ModelGraph:
        from . import models

        try:
            graph = ModelGraph.from_file(models.resolve(self.path))
        except EdgeError as err:
            raise ConfigError(f"the calibration's {role} model {self.path}: {err}") from err
        if graph.sha256 != self.sha256:
            raise ConfigError(
                f"the calibration's {role} model {self.path} has changed (sha256 {graph.sha256[:12]}, "
                f"calibrated on {self.sha256[:12]}): calibrate again"
            )
        return graph


@dataclass(frozen=True, slots=True)
class Calibration:
    """What ``edge calibrate`` measured and chose; ``edge cascade eval`` and ``--cascade`` use it."""

    rule: Rule
    threshold: float
    big: ModelRef
    small: ModelRef | None
    """The small model run first (a cascade), or None for an early exit of ``big``."""
    split_point: int
    """The big model's cut escalated requests are sent at (its bytes count in ``bytes_per_request``)."""
    chosen: CurvePoint
    curve: tuple[CurvePoint, ...]
    data: str = ""
    samples: int = 0
    target: dict[str, float] = field(default_factory=dict)
    exit_output: str | None = None
    """The big model's early-exit output whose confidence decides (instead of a small model)."""

    def to_json(self) -> str:
        body = asdict(self)
        body["format"] = CALIBRATION_FORMAT
        body["threshold"] = _finite(self.threshold)
        body["chosen"]["threshold"] = _finite(self.chosen.threshold)
        for point in body["curve"]:
            point["threshold"] = _finite(point["threshold"])
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<calibration>") -> Calibration:
        if len(text) > MAX_CALIBRATION_BYTES:
            raise ConfigError(
                f"{source}: {len(text):,} characters; a calibration holds at most {MAX_CALIBRATION_BYTES:,}"
            )
        try:
            body = json.loads(text, parse_constant=_no_constant)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            if len(body.get("curve") or ()) > MAX_CURVE_POINTS:
                raise ValueError(f"a curve of {len(body['curve']):,} points; at most {MAX_CURVE_POINTS:,}")
            if body.get("format") != CALIBRATION_FORMAT:
                raise ValueError(
                    f"not a calibration file (format {body.get('format')!r}, not {CALIBRATION_FORMAT!r})"
                )
            rule = body["rule"]
            if rule not in RULES:
                raise ValueError(f"unknown rule {rule!r}")
            return cls(
                rule=rule,
                threshold=_unfinite(body["threshold"]),
                big=ModelRef(**body["big"]),
                small=ModelRef(**body["small"]) if body.get("small") is not None else None,
                split_point=int(body["split_point"]),
                chosen=_point(body["chosen"]),
                curve=tuple(_point(p) for p in body["curve"]),
                data=str(body.get("data", "")),
                samples=int(body.get("samples", 0)),
                target={str(k): float(v) for k, v in body.get("target", {}).items()},
                exit_output=body.get("exit_output"),
            )
        except RecursionError as err:
            raise ConfigError(f"{source}: not a usable calibration: nested too deep") from err
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as err:
            raise ConfigError(f"{source}: not a usable calibration: {err}") from err

    def pressure(self, max_extra_loss_pp: float | None = None, deadline_ms: float | None = None) -> Pressure:
        """The calibrated threshold, relaxed within ``max_extra_loss_pp`` while escalating goes badly."""
        return Pressure(self.threshold, self.relaxed(max_extra_loss_pp), deadline_ms=deadline_ms)

    def check_model(self, graph: ModelGraph) -> None:
        """ConfigError unless ``graph`` is the big model this was calibrated for."""
        if self.big.sha256 != graph.sha256:
            raise ConfigError(
                f"it was calibrated for another big model (sha256 {self.big.sha256[:12]}, this model is "
                f"{graph.sha256[:12]})"
            )

    def relaxed(self, max_extra_loss_pp: float | None) -> float | None:
        """The lowest threshold within ``max_extra_loss_pp`` of the chosen loss (None: no relaxing)."""
        if max_extra_loss_pp is None:
            return None
        return relaxed_threshold(self.curve, self.chosen, max_extra_loss_pp)

    def save(self, path: Path) -> None:
        save_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls.from_json(read_bounded(path, MAX_CALIBRATION_BYTES, "calibration"), str(path))


def _finite(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


MAX_CALIBRATION_BYTES = 16 * 1024 * 1024
"""The largest calibration file read (a curve of a million samples fits in about 150 MB: far more
than calibrating on a device takes)."""
MAX_CURVE_POINTS = 100_000


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a calibration holds")


def _unfinite(value: Any) -> float:
    """A threshold: a confidence in [0, 1], or "inf" (everything escalated)."""
    if value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'a threshold is a number in [0, 1] or "inf", not {value!r:.40}')
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f'a threshold is in [0, 1] (or "inf"), not {number}')
    return number


_SHARES = ("local_share", "accuracy", "reference_accuracy")


def _point(body: Mapping[str, Any]) -> CurvePoint:
    if not isinstance(body, Mapping):
        raise ValueError("a curve point is an object")
    point = CurvePoint(**{**body, "threshold": _unfinite(body["threshold"])})
    for key in _SHARES:
        value = getattr(point, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"a curve point's {key} is a share in [0, 1], not {value!r:.40}")
    for key in ("loss_pp", "bytes_per_request"):
        value = getattr(point, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"a curve point's {key} is a finite number, not {value!r:.40}")
    return point


@dataclass(slots=True)
class CascadeResult:
    """One request's answer, and which stage gave it."""

    outputs: dict[str, np.ndarray]
    output_info: tuple[TensorInfo, ...]
    """The answering model's outputs (their quantization turns ``outputs`` into real values)."""
    answered_by: AnsweredBy
    confidence: float
    threshold: float
    inference: InferenceResult
    """How it was computed: the big model's cooperative run when escalated; for a local answer,
    the small model's run (split_point its N, nothing sent)."""

    @property
    def escalated(self) -> bool:
        return self.answered_by not in ("device-small", "device-exit")

    @property
    def bytes_sent(self) -> int:
        return self.inference.bytes_sent


def escalated(
    result: InferenceResult, output_info: tuple[TensorInfo, ...], sure: float, threshold: float
) -> CascadeResult:
    """The answer of the big model's cooperative path: by the server, or by the device when it ran there."""
    by: AnsweredBy = "server" if result.offloaded else "device-big"
    return CascadeResult(result.outputs, output_info, by, sure, threshold, result)


def relaxed_threshold(curve: Sequence[CurvePoint], chosen: CurvePoint, max_extra_loss_pp: float) -> float:
    """The lowest threshold on ``curve`` whose loss is at most ``max_extra_loss_pp`` above the chosen
    point's: what the router may go down to while escalating is in trouble."""
    bound = chosen.loss_pp + max_extra_loss_pp + 1e-9
    allowed = [p.threshold for p in curve if p.loss_pp <= bound and p.threshold <= chosen.threshold]
    return min(allowed, default=chosen.threshold)


class Pressure:
    """The threshold in force, for a router that escalates: ``threshold``, or ``relaxed`` (below it;
    see :func:`relaxed_threshold`) while escalating goes badly.

    An escalation that fell back to the device (the server unreachable, refusing for overload or
    past its deadline), or took longer than ``deadline_ms``, puts the router under pressure; it goes
    back to ``threshold`` after ``recover_after`` escalations in a row went well, or ``hold_s``
    after the last bad one (when so few escalate that none comes to say the trouble is over).
    """

    def __init__(
        self,
        threshold: float,
        relaxed: float | None = None,
        *,
        deadline_ms: float | None = None,
        recover_after: int = 5,
        hold_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.relaxed = min(relaxed, threshold) if relaxed is not None else threshold
        self.deadline_ms = deadline_ms
        self.recover_after = max(1, recover_after)
        self.hold_s = hold_s
        self._clock = clock
        self._pressed_at: float | None = None
        self._good = 0

    @property
    def pressed(self) -> bool:
        if self._pressed_at is not None and self._clock() - self._pressed_at >= self.hold_s:
            self._pressed_at, self._good = None, 0
        return self._pressed_at is not None

    @property
    def in_force(self) -> float:
        """The threshold the next request is held to."""
        return self.relaxed if self.pressed else self.threshold

    def observe(self, result: InferenceResult) -> None:
        """An escalation's outcome."""
        bad = result.fallback or (self.deadline_ms is not None and result.timings.e2e_ms > self.deadline_ms)
        if bad:
            self._pressed_at, self._good = self._clock(), 0
        elif self.pressed:
            self._good += 1
            if self._good >= self.recover_after:
                self._pressed_at, self._good = None, 0


class Cascade:
    """The router: ``small`` answers when sure enough, ``big`` (a cooperative runner) otherwise.

    ``threshold`` is a fixed threshold, or a :class:`Pressure` that adapts it.
    """

    def __init__(
        self,
        small: ModelRunner,
        big: CooperativeRunner,
        *,
        rule: Rule,
        threshold: float | Pressure,
    ) -> None:
        check_pair(small.graph, big.runner.graph)
        self.small = small
        self.big = big
        self.rule: Rule = _rule(rule)
        self.pressure = _pressure(threshold)
        self._output = small.graph.outputs[0]

    @property
    def threshold(self) -> float:
        return self.pressure.threshold

    @property
    def pressed(self) -> bool:
        return self.pressure.pressed

    @classmethod
    def from_calibration(
        cls,
        calibration: Calibration,
        small: ModelRunner,
        big: CooperativeRunner,
        *,
        max_extra_loss_pp: float | None = None,
        deadline_ms: float | None = None,
    ) -> Cascade:
        pressure = calibration.pressure(max_extra_loss_pp, deadline_ms)
        return cls(small, big, rule=calibration.rule, threshold=pressure)

    def small_confidence(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        outputs = self.small.run(self.small_inputs(inputs))
        return outputs, confidence(dequantize(outputs[self._output.name], self._output), self.rule)

    def small_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            t.name: inputs[b.name]
            for t, b in zip(self.small.graph.inputs, self.big.runner.graph.inputs, strict=True)
        }

    def infer(self, inputs: Mapping[str, np.ndarray], *, request_id: str = "") -> CascadeResult:
        started = time.perf_counter()
        threshold = self.pressure.in_force
        outputs, sure = self.small_confidence(inputs)
        if sure >= threshold:
            ms = (time.perf_counter() - started) * 1000.0
            local = InferenceResult(
                outputs, self.small.graph.num_operators, False, StageTimings(head_ms=ms, e2e_ms=ms)
            )
            return CascadeResult(outputs, self.small.graph.outputs, "device-small", sure, threshold, local)
        result = self.big.infer(inputs, request_id=request_id)
        self.pressure.observe(result)
        return escalated(result, self.big.runner.graph.outputs, sure, threshold)

    def close(self) -> None:
        self.small.close()
        self.big.close()


def check_pair(small: ModelGraph, big: ModelGraph) -> None:
    """The small model must take what the big one takes (same inputs), and be a one-output classifier."""
    if len(small.outputs) != 1:
        raise EdgeError(f"the small model must have one (classifier) output, not {len(small.outputs)}")
    if len(small.inputs) != len(big.inputs):
        raise EdgeError(f"the small model takes {len(small.inputs)} inputs, the big one {len(big.inputs)}")
    for s, b in zip(small.inputs, big.inputs, strict=True):
        if s.shape != b.shape or s.dtype != b.dtype or s.quantization != b.quantization:
            raise EdgeError(
                f"the small model's input {s.name!r} ({s.dtype.name}{list(s.shape)}, quantization {s.quantization}) "
                f"differs from the big model's {b.name!r} ({b.dtype.name}{list(b.shape)}, {b.quantization}): "
                "the cascade gives both the same tensor"
            )


def exit_outputs(graph: ModelGraph) -> dict[str, int]:
    """The model's early exits: outputs the head computes before the last cut, each with the first
    cut whose head computes it (BranchyNet-style classifiers on the way)."""
    found: dict[str, int] = {}
    for k in range(1, graph.num_operators):
        for tensor in graph.cut(k).head_outputs:
            found.setdefault(tensor.name, k)
    return found


def exit_cut(graph: ModelGraph, exit_output: str) -> int:
    """The first cut whose head computes ``exit_output``; EdgeError if it is not an early exit."""
    exits = exit_outputs(graph)
    if exit_output not in exits:
        known = ", ".join(exits) or "none"
        raise EdgeError(
            f"{exit_output!r} is not an early exit of the model {graph.source} (its exits: {known})"
        )
    return exits[exit_output]


class EarlyExit:
    """The router for a model with an early exit: the device runs the head, the exit included; when the
    exit's confidence meets the threshold its answer stands and nothing is sent, else the cut goes on
    to the server as usual (``device``'s cut must have the exit in its head). ``threshold`` is a fixed
    threshold, or a :class:`Pressure` that adapts it."""

    def __init__(
        self,
        device: CooperativeRunner,
        exit_output: str,
        *,
        rule: Rule,
        threshold: float | Pressure,
    ) -> None:
        graph = device.runner.graph
        self.cut = exit_cut(graph, exit_output)
        self.device = device
        self.exit_output = exit_output
        self.rule: Rule = _rule(rule)
        self.pressure = _pressure(threshold)
        self._exit = graph.tensor_by_name[exit_output]
        self._final = tuple(t for t in graph.outputs if t.name != exit_output)
        _keep_the_exit_in_the_head(device, self.cut)

    @classmethod
    def from_calibration(
        cls,
        calibration: Calibration,
        device: CooperativeRunner,
        *,
        max_extra_loss_pp: float | None = None,
        deadline_ms: float | None = None,
    ) -> EarlyExit:
        assert calibration.exit_output is not None
        pressure = calibration.pressure(max_extra_loss_pp, deadline_ms)
        return cls(device, calibration.exit_output, rule=calibration.rule, threshold=pressure)

    def exit_confidence(self, outputs: Mapping[str, np.ndarray]) -> float:
        return confidence(dequantize(outputs[self.exit_output], self._exit), self.rule)

    def infer(self, inputs: Mapping[str, np.ndarray], *, request_id: str = "") -> CascadeResult:
        threshold = self.pressure.in_force
        seen: list[float] = []

        def stands(head_outputs: Mapping[str, np.ndarray]) -> bool:
            seen.append(self.exit_confidence(head_outputs))
            return seen[-1] >= threshold

        result = self.device.infer(inputs, request_id=request_id, stop=EarlyStop(self.cut, stands))
        sure = seen[-1] if seen else self.exit_confidence(result.outputs)
        if result.exited:
            answer = {self.exit_output: result.outputs[self.exit_output]}
            return CascadeResult(answer, (self._exit,), "device-exit", sure, threshold, result)
        self.pressure.observe(result)
        return escalated(result, self._final, sure, threshold)

    def close(self) -> None:
        self.device.close()


def _keep_the_exit_in_the_head(device: CooperativeRunner, cut: int) -> None:
    """A fixed cut before the exit is refused; an automatic split only chooses cuts from the exit on."""
    from .autosplit import AutoSplit

    policy = device.policy
    if isinstance(policy, FixedSplit) and policy.k < cut:
        raise EdgeError(
            f"cut {policy.k} comes before the early exit, which the head computes from cut {cut} on"
        )
    if isinstance(policy, AutoSplit):
        policy.candidates = frozenset(k for k in policy.candidates if k >= cut)


class Router(Protocol):
    """A :class:`Cascade` or an :class:`EarlyExit`."""

    def infer(self, inputs: Mapping[str, np.ndarray], *, request_id: str = "") -> CascadeResult: ...

    def close(self) -> None: ...


def open_router(
    calibration: Calibration,
    device: CooperativeRunner,
    *,
    backend: str,
    threads: int,
    max_extra_loss_pp: float | None = None,
    deadline_ms: float | None = None,
) -> Router:
    """The router a calibration describes, around ``device`` (the big model's cooperative runner)."""
    calibration.check_model(device.runner.graph)
    if calibration.exit_output is not None:
        return EarlyExit.from_calibration(
            calibration, device, max_extra_loss_pp=max_extra_loss_pp, deadline_ms=deadline_ms
        )
    if calibration.small is None:
        raise ConfigError("the calibration names neither a small model nor an early exit")
    small = ModelRunner(calibration.small.load("small"), backend=backend, threads=threads)
    return Cascade.from_calibration(
        calibration, small, device, max_extra_loss_pp=max_extra_loss_pp, deadline_ms=deadline_ms
    )
