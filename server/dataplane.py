"""The server's logic, independent of the transport: validate a request, run it, describe models.

A request with no ``split_point`` parameter runs the whole model (plain server-side
inference, what any Open Inference Protocol client expects). A request with the int64
parameter ``split_point`` = K runs the tail of cut K on the cut tensors it carries.
A request with the bool parameter ``profile`` = true and no inputs returns this server's
median tail latency at every cut as the FP32 output ``tail_ms`` [N + 1], measured once per
model and cached. A request with the bool parameter ``ping`` = true and no inputs runs
nothing and answers at once, with no outputs: a probe of the inference path's fixed cost.
Everything is validated before any tensor is decoded or any model runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge import __version__
from edge.errors import CutError, EdgeError, ModelMismatchError, ModelNotFoundError, TensorFormatError, echo
from edge.graph import ModelGraph, TensorInfo
from edge.measure import ProfileCancelledError, profile_tails
from edge.runner import Tensors
from edge.wire import (
    ACCEPT_ENCODING,
    BACKEND,
    BATCH_SIZE,
    COMPUTE_US,
    EXTENSIONS,
    MAX_ENTRIES,
    MODEL_SHA256,
    PING,
    PROFILE,
    PROFILE_OUTPUT,
    PROFILE_RUNS,
    QUEUE_US,
    SPLIT_POINT,
    STACK,
    STACK_PREFIX,
    THREADS,
    InferRequest,
    InferResponse,
    ModelMetadata,
    TensorMetadata,
    WireTensor,
    datatype_of,
    decode,
    decode_expected,
    dtype_of,
    encode,
    encodings,
)

from .errors import ControlDisabledError, ServerOverloadedError, ServerStoppingError
from .repository import ModelRepository, ServedModel
from .settings import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_MAX_STACK

__all__ = [
    "SERVER_NAME",
    "DataPlane",
    "PreparedRequest",
]

logger = logging.getLogger(__name__)

SERVER_NAME = "edge-server"
PLATFORM = "tflite"
MODEL_VERSION = "1"

MAX_NAME_CHARS = 256
"""The longest model name, version, request id or string parameter a request may carry."""
MAX_TENSOR_NAME_CHARS = 4096
"""The longest tensor name: the graph's own, which converters make by joining fused ops' names
(mobilenetv2_035's run to 402 characters)."""
COMPRESS_OUTPUTS_FROM = 64 * 1024
"""Outputs this large or larger go compressed to a device that accepts a lossless codec."""
MAX_PARAMETERS = MAX_ENTRIES
"""The most request parameters, and requested outputs, a request may carry (checked on the message
first, by the converters)."""
PROFILE_REPEATS = 9
PROFILE_WARMUP = 2


@dataclass(slots=True)
class PreparedRequest:
    """A request that passed validation: decoded tensors, ready to run."""

    request: InferRequest
    model: ServedModel
    split_point: int | None
    feeds: dict[str, np.ndarray]
    outputs: tuple[TensorInfo, ...]
    received_ns: int
    profile: bool = False
    ping: bool = False
    stack: int = 1
    """The samples it carries, stacked along the first axis of its tensors (:data:`edge.wire.STACK`)."""


class DataPlane:
    """Validates and runs inference requests against a model repository."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        model_control: bool = False,
        codecs: tuple[str, ...] | None = None,
        max_stack: int = DEFAULT_MAX_STACK,
    ) -> None:
        self.repository = repository
        self.max_stack = max_stack
        """The most samples one stacked request may carry (1: none are taken); advertised."""
        self.model_control = model_control
        self.codecs = encodings.decoded() if codecs is None else codecs
        """The codecs advertised in ServerMetadata as decoded here; the lossless ones among them also
        compress large outputs when a request accepts one."""
        self.max_inflight_bytes = max_inflight_bytes
        self._inflight_bytes = 0
        self.max_inflight = max_inflight
        # Guards inflight and _stopping: admission is decided under it, work runs outside it.
        self._lock = threading.Lock()
        self.inflight = 0
        """Requests holding a place (read it; :meth:`admit` and :meth:`release` change it)."""
        self._stopping = False
        # Guards _profiles; held while a profile is measured so one model is profiled once (no I/O inside).
        self._profile_lock = threading.Lock()
        self._stop_profiling = threading.Event()
        self._profiles: dict[str, np.ndarray] = {}
        # What each (model bytes, cut, samples) takes and gives; at most served models x (N + 1) x
        # max_stack entries once refresh() has dropped the ones of models no longer served.
        self._routes: dict[tuple[str, int | None, int], _Route] = {}

    # -- health and metadata ----------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self._stopping and len(self.repository) > 0

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self._model(name, version)
        except ModelNotFoundError:
            return False
        return not self._stopping

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        stacks = (f"{STACK_PREFIX}{self.max_stack}",) if self.max_stack > 1 else ()
        return (
            SERVER_NAME,
            __version__,
            EXTENSIONS + tuple(encodings.EXTENSION_PREFIX + c for c in self.codecs) + stacks,
        )

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        graph = self._model(name, version).graph
        return ModelMetadata(
            name=name,
            versions=(MODEL_VERSION,),
            platform=PLATFORM,
            inputs=tuple(_metadata(t) for t in graph.inputs),
            outputs=tuple(_metadata(t) for t in graph.outputs),
        )

    # -- inference --------------------------------------------------------------------

    def infer(self, request: InferRequest) -> InferResponse:
        """Validate, admit and run ``request`` in the calling thread."""
        prepared = self.prepare(request)
        with self.admitted():
            return self.execute(prepared)

    def admit(self, nbytes: int = 0) -> None:
        """Hold one of the ``max_inflight`` places, and ``nbytes`` of the ``max_inflight_bytes``,
        while a request waits for compute and runs; :meth:`release` gives them back.

        Raises ServerOverloadedError when every place (or the bytes) is taken, ServerStoppingError
        while draining. The transport takes the place before it queues the request for a compute
        thread, so the limits count waiting requests too. One request alone is always admitted,
        whatever its size (the message limit bounds that).
        """
        with self._lock:
            if self._stopping:
                raise ServerStoppingError("the server is shutting down")
            if self.inflight >= self.max_inflight:
                raise ServerOverloadedError(
                    f"{self.inflight} requests in flight, the limit is {self.max_inflight}"
                )
            if self.inflight and self._inflight_bytes + nbytes > self.max_inflight_bytes:
                raise ServerOverloadedError(
                    f"{self._inflight_bytes:,} bytes in flight; {nbytes:,} more would pass the limit of "
                    f"{self.max_inflight_bytes:,}"
                )
            self.inflight += 1
            self._inflight_bytes += nbytes

    def release(self, nbytes: int = 0) -> None:
        with self._lock:
            self.inflight -= 1
            self._inflight_bytes -= nbytes

    @contextlib.contextmanager
    def admitted(self, nbytes: int = 0) -> Iterator[None]:
        """:meth:`admit` for the ``with`` block."""
        self.admit(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)

    def prepare(self, request: InferRequest, received_ns: int | None = None) -> PreparedRequest:
        """Check a request against the model and cut it names; decode its tensors without copying."""
        received_ns = received_ns if received_ns is not None else time.perf_counter_ns()
        _check_bounds(request)
        model = self._model(request.model_name, request.model_version)
        graph = model.graph
        params = request.parameters
        _check_sha(params, graph.sha256, request.model_name)
        profile, ping = _flag(params, PROFILE), _flag(params, PING)
        if profile or ping:
            kind = PROFILE if profile else PING
            if request.inputs:
                raise TensorFormatError(f"a {kind} request carries no inputs; got {len(request.inputs)}")
            return PreparedRequest(request, model, None, {}, (), received_ns, profile=profile, ping=ping)
        split_point = _split_point(params, graph.num_operators)
        stack = _stack(params, self.max_stack, split_point)
        route = self._route(model, split_point, stack)
        feeds = route.decode(request.inputs)
        if feeds is None:  # not exactly as expected: the full check names the problem
            feeds = _decode_inputs(request.inputs, route.expected, request.model_name, split_point)
        return PreparedRequest(
            request=request,
            model=model,
            split_point=split_point,
            feeds=feeds,
            outputs=_requested(route.produced, request.outputs),
            received_ns=received_ns,
            stack=stack,
        )

    def execute(self, prepared: PreparedRequest) -> InferResponse:
        """Run a prepared request (admitted by the caller); reports compute and queue time in microseconds."""
        started = time.perf_counter_ns()
        runner = prepared.model.runner
        if prepared.profile:
            return self._profile_response(prepared, started)
        if prepared.ping:
            results: dict[str, np.ndarray] = {}
        elif prepared.split_point is None:
            results = runner.run(prepared.feeds)
        elif prepared.stack > 1:
            results = runner.run_tail_stacked(prepared.split_point, prepared.feeds, prepared.stack)
        else:
            results = runner.run_tail(prepared.split_point, prepared.feeds)
        return _response(prepared, results, started, time.perf_counter_ns(), codecs=self.codecs)

    def execute_part(self, prepared: PreparedRequest, start: int, count: int) -> tuple[Tensors, int]:
        """Samples ``start`` to ``start + count`` of a stacked request, computed, and the nanoseconds
        they took: a part of it, for :meth:`join_parts` (each sample's outputs are exactly those of
        the whole stack computed at once)."""
        started = time.perf_counter_ns()
        feeds = {name: array[start : start + count] for name, array in prepared.feeds.items()}
        assert prepared.split_point is not None  # stacks name their cut
        results = prepared.model.runner.run_tail_stacked(prepared.split_point, feeds, count)
        return results, time.perf_counter_ns() - started

    def join_parts(
        self, prepared: PreparedRequest, parts: Sequence[Tensors], compute_ns: int
    ) -> InferResponse:
        """The response of a stacked request computed in ``parts`` (in order) taking ``compute_ns`` in
        all: ``compute_us`` is theirs, and ``queue_us`` the rest of its time here, waits between parts
        included."""
        results = parts[0] if len(parts) == 1 else {
            name: np.concatenate([part[name] for part in parts]) for name in parts[0]
        }  # fmt: skip
        finished = time.perf_counter_ns()
        return _response(prepared, results, finished - compute_ns, finished, codecs=self.codecs)

    def execute_batch(self, batch: Sequence[PreparedRequest]) -> list[InferResponse | EdgeError]:
        """Run requests for one model and cut (admitted, neither pings, profiles nor stacked) as one batch.

        Each gets exactly the outputs it would get alone; ``compute_us`` is the batch's, ``queue_us``
        each request's own wait, and ``batch_size`` says how many ran together. When the batch fails
        (one member's values refused by a kernel), each runs alone, so that only that one gets the
        error, in its place in the list.
        """
        first = batch[0]
        started = time.perf_counter_ns()
        try:
            results = first.model.runner.try_tail_batch(first.split_point or 0, [p.feeds for p in batch])
        except EdgeError as err:
            logger.info("a batch of %d failed (%s); running its requests one by one", len(batch), err)
            results = None
        if results is None:  # one alone, a tail that does not batch, or a refused member: each on its own
            return [self._execute_or_error(p) for p in batch]
        finished = time.perf_counter_ns()
        return [
            _response(p, r, started, finished, len(batch), codecs=self.codecs)
            for p, r in zip(batch, results, strict=True)
        ]

    def _execute_or_error(self, prepared: PreparedRequest) -> InferResponse | EdgeError:
        try:
            return self.execute(prepared)
        except EdgeError as err:
            return err

    def tail_profile(self, model: ServedModel) -> np.ndarray:
        """Median tail latency (ms) of ``model`` at every cut 0..N on this server; measured on first use."""
        with self._profile_lock:
            profile = self._profiles.get(model.graph.sha256)
            if profile is None:
                logger.info("profiling the tails of %s (%d cuts)", model.name, model.graph.num_operators + 1)
                try:
                    values = profile_tails(
                        model.runner, runs=PROFILE_REPEATS, warmup=PROFILE_WARMUP, stop=self._stop_profiling
                    )
                except ProfileCancelledError as err:
                    raise ServerStoppingError(
                        "the server is shutting down; the profile was not finished"
                    ) from err
                profile = self._profiles[model.graph.sha256] = np.asarray(values, dtype=np.float32)
            return profile

    def _profile_response(self, prepared: PreparedRequest, started: int) -> InferResponse:
        profile = self.tail_profile(prepared.model)
        finished = time.perf_counter_ns()
        request, runner = prepared.request, prepared.model.runner
        return InferResponse(
            model_name=request.model_name,
            model_version=MODEL_VERSION,
            id=request.id,
            outputs=(encode(PROFILE_OUTPUT, profile),),
            parameters={
                COMPUTE_US: (finished - started) // 1000,
                QUEUE_US: (started - prepared.received_ns) // 1000,
                PROFILE: True,
                PROFILE_RUNS: PROFILE_REPEATS,
                BACKEND: runner.backend,
                THREADS: runner.threads,
                MODEL_SHA256: prepared.model.graph.sha256,
            },
        )

    def repository_index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every model the repository knows."""
        return [
            (name, MODEL_VERSION if state == "READY" else "", state, reason)
            for name, state, reason in self.repository.index()
            if state == "READY" or not ready_only
        ]

    def load(self, name: str) -> None:
        self._control()
        self.repository.load(name)
        self._forget_unserved()

    def unload(self, name: str) -> None:
        self._control()
        self.repository.unload(name)

    def _control(self) -> None:
        if not self.model_control:
            raise ControlDisabledError(
                "loading and unloading models is off; start edge-server with --model-control"
            )

    def refresh(self) -> list[str]:
        """Have the repository look at its directory again, and forget what only old models used."""
        changed = self.repository.refresh()
        if changed:
            self._forget_unserved()
            logger.info("models changed: %s", ", ".join(changed))
        return changed

    def _forget_unserved(self) -> None:
        """Drop the profiles and routes of model bytes no longer served."""
        served = {m.graph.sha256 for m in self.repository}
        with self._profile_lock:
            self._profiles = {k: v for k, v in self._profiles.items() if k in served}
        self._routes = {k: v for k, v in self._routes.items() if k[0] in served}

    def begin_shutdown(self) -> None:
        """Refuse new work; requests already running finish, and a profile being measured stops."""
        with self._lock:
            self._stopping = True
        self._stop_profiling.set()

    # -- internals --------------------------------------------------------------------

    def _route(self, model: ServedModel, split_point: int | None, stack: int = 1) -> _Route:
        key = (model.graph.sha256, split_point, stack)
        route = self._routes.get(key)
        if route is None:
            graph = model.graph
            if split_point is None:
                route = _Route.of(graph.inputs, graph.outputs)
            else:
                cut = graph.cut(split_point)
                expected, produced = cut.tensors, cut.tail_outputs
                if stack > 1:
                    _stacked(produced, stack, model.name, split_point)  # the outputs split per sample too
                    expected = _stacked(expected, stack, model.name, split_point)
                route = _Route.of(expected, produced)
            self._routes[key] = route
        return route

    def _model(self, name: str, version: str) -> ServedModel:
        if len(name) > MAX_NAME_CHARS or len(version) > MAX_NAME_CHARS:
            raise ModelNotFoundError(
                f"model {echo(name)} version {echo(version)}: names are at most {MAX_NAME_CHARS} characters"
            )
        model = self.repository.get(name)
        if version not in ("", MODEL_VERSION):
            raise ModelNotFoundError(
                f"model {echo(name)} has no version {echo(version)} (versions: {MODEL_VERSION})"
            )
        return model


@dataclass(frozen=True, slots=True)
class _Route:
    """The tensors one (model, cut) takes and gives, with the wire form each input must have."""

    expected: tuple[TensorInfo, ...]
    produced: tuple[TensorInfo, ...]
    wire: tuple[tuple[str, str, tuple[int, ...], np.dtype, int], ...]
    """(name, datatype, shape, dtype, byte count) per input, in the model's order."""
    exact: bool
    """True when every input can be taken on a plain comparison (no BOOL, whose bytes need a look)."""

    @classmethod
    def of(cls, expected: Sequence[TensorInfo], produced: Sequence[TensorInfo]) -> _Route:
        datatypes = [datatype_of(t.dtype) for t in expected]
        # The wire's little-endian dtype, as edge.wire.decode reads it.
        wire = tuple(
            (t.name, datatype, t.shape, dtype_of(datatype), t.nbytes)
            for t, datatype in zip(expected, datatypes, strict=True)
        )
        exact = all(t.dtype.kind != "b" for t in expected)
        return cls(tuple(expected), tuple(produced), wire, exact)

    def decode(self, inputs: Sequence[WireTensor]) -> dict[str, np.ndarray] | None:
        """The feeds, if ``inputs`` are exactly the expected tensors in the expected order; else None."""
        if not self.exact or len(inputs) != len(self.wire):
            return None
        feeds = {}
        for tensor, (name, datatype, shape, dtype, nbytes) in zip(inputs, self.wire, strict=True):
            array = decode_expected(tensor, name, datatype, shape, dtype, nbytes)
            if array is None:
                return None
            feeds[name] = array
        return feeds


def _response(
    prepared: PreparedRequest,
    results: Mapping[str, np.ndarray],
    started: int,
    finished: int,
    batch: int = 1,
    *,
    codecs: tuple[str, ...] = (),
) -> InferResponse:
    request = prepared.request
    params: dict[str, bool | int | float | str] = {
        COMPUTE_US: (finished - started) // 1000,
        QUEUE_US: (started - prepared.received_ns) // 1000,
    }
    if prepared.split_point is not None:
        params[SPLIT_POINT] = prepared.split_point
    if batch > 1:
        params[BATCH_SIZE] = batch
    if prepared.stack > 1:
        params[STACK] = prepared.stack
    return InferResponse(
        model_name=request.model_name,
        model_version=MODEL_VERSION,
        id=request.id,
        outputs=_outputs(prepared, results, codecs),
        parameters=params,
    )


def _outputs(
    prepared: PreparedRequest, results: Mapping[str, np.ndarray], codecs: tuple[str, ...]
) -> tuple[WireTensor, ...]:
    """The requested outputs; those of at least :data:`COMPRESS_OUTPUTS_FROM` bytes compressed with the
    codec the request accepts, when this server offers it."""
    tensors = tuple([encode(t.name, results[t.name]) for t in prepared.outputs])
    accepted = prepared.request.parameters.get(ACCEPT_ENCODING)
    encoding = encodings.ENCODINGS.get(accepted) if isinstance(accepted, str) and accepted in codecs else None
    if encoding is None or encoding.lossy:
        return tensors  # outputs go back losslessly or raw, never through a lossy codec
    return tuple(
        encodings.compress(t, encoding.name) if t.nbytes >= COMPRESS_OUTPUTS_FROM else t for t in tensors
    )


MIN_MESSAGE_BYTES = 1024 * 1024
"""The smallest message bound sized from the models (headroom for metadata and small models)."""


def largest_message(graph: ModelGraph) -> int:
    """The largest request or answer a device needs for ``graph``: its biggest cut (the raw input at
    cut 0) or its outputs, with room for names and framing. Compressed tensors are never larger than
    raw ones: a codec sends raw what does not shrink."""

    def size(tensors: Sequence[TensorInfo]) -> int:
        return sum(t.nbytes + len(t.name.encode()) + 64 for t in tensors)

    biggest = max(size(graph.cut(k).tensors) for k in range(graph.num_operators + 1))
    return max(biggest, size(graph.outputs)) + 64 * 1024


def message_limit(graphs: Sequence[ModelGraph], cap: int) -> int:
    """The bound on a gRPC message, sized from what the served models take: twice the largest, at
    least :data:`MIN_MESSAGE_BYTES`, at most ``cap``. gRPC applies it before a message is parsed: 32
    messages of 16 MiB for a model that takes 2 KiB had cost 1.3 GB."""
    need = max((largest_message(g) for g in graphs), default=0)
    return min(cap, max(MIN_MESSAGE_BYTES, 2 * need))


def _check_bounds(request: InferRequest) -> None:
    """Names, ids and parameters within :data:`MAX_NAME_CHARS` and :data:`MAX_PARAMETERS`, before anything
    is looked up with them."""
    if max(len(request.model_name), len(request.model_version), len(request.id)) > MAX_NAME_CHARS:
        for what, value in (
            ("model name", request.model_name),
            ("model version", request.model_version),
            ("id", request.id),
        ):
            if len(value) > MAX_NAME_CHARS:
                raise TensorFormatError(
                    f"the {what} has {len(value):,} characters; at most {MAX_NAME_CHARS} are taken"
                )
    params = request.parameters
    if len(params) > MAX_PARAMETERS:
        raise TensorFormatError(f"{len(params)} request parameters; at most {MAX_PARAMETERS} are taken")
    for key, param in params.items():
        if len(key) > MAX_NAME_CHARS or (isinstance(param, str) and len(param) > MAX_NAME_CHARS):
            raise TensorFormatError(
                f"request parameter {echo(key)} is longer than {MAX_NAME_CHARS} characters"
            )
    for tensor in request.inputs:
        if len(tensor.name) > MAX_TENSOR_NAME_CHARS:
            raise TensorFormatError(
                f"input {echo(tensor.name)} has a name longer than {MAX_TENSOR_NAME_CHARS} characters"
            )
    if len(request.outputs) > MAX_PARAMETERS:
        raise TensorFormatError(
            f"{len(request.outputs)} requested outputs; at most {MAX_PARAMETERS} are taken"
        )


def _metadata(tensor: TensorInfo) -> TensorMetadata:
    return TensorMetadata(name=tensor.name, datatype=datatype_of(tensor.dtype), shape=tensor.shape)


def _check_sha(params: Mapping[str, object], sha256: str, name: str) -> None:
    claimed = params.get(MODEL_SHA256)
    if claimed is None:
        return
    if not isinstance(claimed, str):
        raise TensorFormatError(f"parameter {MODEL_SHA256!r} must be a string")
    if claimed.lower() != sha256:
        raise ModelMismatchError(
            # The server's own sha256 is not told: it would name the exact file to any caller.
            f"model {echo(name)} differs: the device runs sha256 {echo(claimed, 66)}, the server holds another file"
        )


def _flag(params: Mapping[str, object], name: str) -> bool:
    value = params.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TensorFormatError(f"parameter {echo(name)} must be a bool, got {type(value).__name__}")
    return value


def _split_point(params: Mapping[str, object], num_operators: int) -> int | None:
    value = params.get(SPLIT_POINT)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CutError(f"parameter {SPLIT_POINT!r} must be an int64, got {type(value).__name__}")
    if not 0 <= value < num_operators:
        raise CutError(
            f"{SPLIT_POINT} {value} is out of range: the model has {num_operators} operators, "
            f"so a tail exists for 0 <= K < {num_operators}"
        )
    return value


def _stack(params: Mapping[str, object], max_stack: int, split_point: int | None) -> int:
    """The samples a request carries: its :data:`STACK` parameter, checked (1 when absent)."""
    value = params.get(STACK)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise TensorFormatError(f"parameter {STACK!r} must be an int64, got {type(value).__name__}")
    if max_stack < 2:
        raise TensorFormatError("this server takes no stacked requests (edge-server --max-stack 1)")
    if not 2 <= value <= max_stack:
        raise TensorFormatError(
            f"{STACK} {value} is out of range: this server takes 2 to {max_stack} samples"
        )
    if split_point is None:
        raise TensorFormatError(
            f"a stacked request names its cut ({SPLIT_POINT!r}); whole-model ones are sent one by one"
        )
    return value


def _stacked(
    tensors: Sequence[TensorInfo], stack: int, model: str, split_point: int
) -> tuple[TensorInfo, ...]:
    """``tensors`` as a request of ``stack`` samples carries them: the first axis ``stack`` times as long.
    A tensor whose first axis is not 1 has no sample axis to stack along: CutError."""
    for t in tensors:
        if not t.shape or t.shape[0] != 1:
            raise CutError(
                f"model {echo(model)} cut {split_point} cannot take stacked requests: tensor {t.name!r} "
                f"has shape {list(t.shape)}, not a first axis of 1"
            )
    return tuple(dataclasses.replace(t, shape=(stack, *t.shape[1:])) for t in tensors)


def _decode_inputs(
    inputs: Sequence[WireTensor], expected: Sequence[TensorInfo], model: str, split_point: int | None
) -> dict[str, np.ndarray]:
    where = f"model {echo(model)}" + (f" cut {split_point}" if split_point is not None else "")
    by_name = {t.name: t for t in expected}
    seen: dict[str, WireTensor] = {}
    for tensor in inputs:
        if tensor.name in seen:
            raise TensorFormatError(f"{where}: input {echo(tensor.name)} is given twice")
        if tensor.name not in by_name:
            raise TensorFormatError(
                f"{where}: unexpected input {echo(tensor.name)}; expected {', '.join(repr(n) for n in by_name)}"
            )
        seen[tensor.name] = tensor
    missing = [name for name in by_name if name not in seen]
    if missing:
        raise TensorFormatError(f"{where}: missing input(s) {', '.join(repr(n) for n in missing)}")
    feeds = {}
    for name, info in by_name.items():
        tensor = seen[name]
        datatype = datatype_of(info.dtype)
        if tensor.datatype != datatype:
            raise TensorFormatError(
                f"{where}: input {name!r} must be {datatype}, got {echo(tensor.datatype)}"
            )
        if tuple(tensor.shape) != info.shape:
            raise TensorFormatError(
                f"{where}: input {name!r} must have shape {list(info.shape)}, got {list(tensor.shape)}"
            )
        feeds[name] = decode(tensor)  # checks the byte length against the (already checked) shape
    return feeds


def _requested(produced: tuple[TensorInfo, ...], names: Sequence[str]) -> tuple[TensorInfo, ...]:
    if not names:
        return produced
    by_name = {t.name: t for t in produced}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise TensorFormatError(
            f"requested output(s) {', '.join(echo(n) for n in unknown[:4])} are not produced here; "
            f"available: {', '.join(repr(n) for n in by_name)}"
        )
    return tuple(by_name[n] for n in names)
