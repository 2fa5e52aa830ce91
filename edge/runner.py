"""Run a model whole, or either half of any cut, on one backend.

Both sides use this: the device runs heads (and tails when it falls back), the server runs
tails and whole models. Halves are built on first use and kept in a bounded LRU cache.
Each half's boundary is checked against the cut when it is built, not inside a request.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from .backends import DEFAULT_BACKEND, Backend, TensorSpec, create_backend
from .backends.pool import ReplicaPool
from .errors import BackendError, ModelMismatchError
from .graph import Cut, ModelGraph, TensorInfo
from .partition import build_head, build_tail, extract_subgraph

__all__ = ["HALF_ERRORS", "HeadResult", "ModelRunner"]

logger = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]

HALF_ERRORS = (BackendError, ModelMismatchError)
"""What building a half raises when this backend cannot have it (a kernel it lacks, an XNNPACK set-up
that fails, a boundary the built half does not keep): the whole model may still run."""

MAX_STACK_CHUNK = 8
"""The largest batch :meth:`ModelRunner.run_tail_stacked` builds a tail for; more samples run in chunks."""


@dataclass(slots=True)
class HeadResult:
    """What the head of a cut produced."""

    cut: Tensors
    """The cut tensors, in the cut's order: what the tail needs."""
    outputs: Tensors
    """Model outputs the head already computed."""


class ModelRunner:
    """A model and its halves, loaded on one backend."""

    def __init__(
        self,
        graph: ModelGraph,
        *,
        backend: str = DEFAULT_BACKEND,
        threads: int = 1,
        cache_size: int = 16,
        replicas: int = 1,
    ) -> None:
        self.graph = graph
        self.backend = backend
        self.threads = threads
        self.replicas = max(1, replicas)
        """Interpreters per half (and for the whole model): how many threads can run one half at once."""
        self.cache_size = max(2, cache_size)
        self._whole: Backend | None = None
        # Guards _whole and _halves (the dict only: halves are built outside it, without I/O).
        self._lock = threading.Lock()
        self._halves: OrderedDict[tuple[str, int, int], Backend] = OrderedDict()
        self.half_hits = 0
        """Halves found loaded (a tail-cache hit)."""
        self.half_loads = 0
        """Halves built and loaded (a miss)."""
        self._unbatchable: set[int] = set()
        """Cuts whose tail does not batch (an input or output without a leading dimension of 1)."""
        self._broken: dict[tuple[str, int], str] = {}
        """Halves this backend could not build, and why: asked again, they fail at once. (A half that
        fails to run is not remembered: the inputs may be to blame.)"""

    # -- whole model ------------------------------------------------------------------

    @property
    def whole(self) -> Backend:
        with self._lock:
            if self._whole is None:
                self._whole = self._load(self.graph.data)
            return self._whole

    def run(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Run the whole model."""
        return self.whole.run(inputs)

    # -- halves -----------------------------------------------------------------------

    def run_head(self, k: int, inputs: Mapping[str, np.ndarray]) -> HeadResult:
        cut = self.graph.cut(k)
        if k == 0:
            # An empty head: the cut tensors are the model's inputs, untouched.
            return HeadResult(cut={t.name: inputs[t.name] for t in cut.tensors}, outputs={})
        produced = self.run(inputs) if k == self.graph.num_operators else self._half("head", cut).run(inputs)
        return HeadResult(
            cut={t.name: produced[t.name] for t in cut.tensors},
            outputs={t.name: produced[t.name] for t in cut.head_outputs},
        )

    def run_tail(self, k: int, cut_tensors: Mapping[str, np.ndarray]) -> Tensors:
        cut = self.graph.cut(k)
        if not cut.tail_outputs:
            return {}
        if k == 0:
            return self.run(cut_tensors)
        return self._half("tail", cut).run(cut_tensors)

    def run_tail_batch(self, k: int, batch: Sequence[Mapping[str, np.ndarray]]) -> list[Tensors]:
        """The tail of cut ``k`` on several requests' cut tensors at once: stacked along the leading
        dimension, run once, and split again. Each gets exactly what :meth:`run_tail` gives it
        alone (tests/edge/test_batching.py checks every cut of the shipped models). A tail that
        does not batch runs them one by one."""
        batched = self.try_tail_batch(k, batch)
        return batched if batched is not None else [self.run_tail(k, feeds) for feeds in batch]

    def try_tail_batch(self, k: int, batch: Sequence[Mapping[str, np.ndarray]]) -> list[Tensors] | None:
        """:meth:`run_tail_batch`, or None when the tail of cut ``k`` does not take them at once."""
        cut = self.graph.cut(k)
        if not cut.tail_outputs:
            return [{} for _ in batch]
        backend = self._batched_tail(cut, len(batch))
        if backend is None:
            return None
        stacked = {t.name: np.concatenate([feeds[t.name] for feeds in batch]) for t in cut.tensors}
        produced = backend.run(stacked)
        return [{name: array[i : i + 1] for name, array in produced.items()} for i in range(len(batch))]

    def run_tail_stacked(self, k: int, stacked: Mapping[str, np.ndarray], size: int) -> Tensors:
        """The tail of cut ``k`` on ``size`` samples stacked along the first axis of each cut tensor;
        the outputs are stacked the same way, each sample's exactly what :meth:`run_tail` gives it
        alone. The samples run in chunks of 8, 4, 2 and 1 (so at most three batched tails per cut are
        built, whatever the sizes asked), a chunk one by one when the tail does not batch."""
        cut = self.graph.cut(k)
        if not cut.tail_outputs:
            return {}
        parts: list[Tensors] = []
        start = 0
        while start < size:
            chunk = min(1 << ((size - start).bit_length() - 1), MAX_STACK_CHUNK)
            feeds = {t.name: stacked[t.name][start : start + chunk] for t in cut.tensors}
            backend = self._batched_tail(cut, chunk)
            if backend is not None:
                parts.append(backend.run(feeds))
            else:
                parts.extend(
                    self.run_tail(k, {name: array[i : i + 1] for name, array in feeds.items()})
                    for i in range(chunk)
                )
            start += chunk
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def batches(self, k: int, size: int) -> bool:
        """Whether the tail of cut ``k`` runs ``size`` requests at once (building it if need be)."""
        return size == 1 or self._batched_tail(self.graph.cut(k), size) is not None

    def _batched_tail(self, cut: Cut, size: int) -> Backend | None:
        """The tail of ``cut`` for ``size`` requests at once; None when it does not batch."""
        if size == 1 or cut.index in self._unbatchable:
            return None
        try:
            return self._half("tail", cut, size)
        except BackendError as err:
            logger.info("the tail of cut %d does not batch (%s); its requests run one by one", cut.index, err)
            self._unbatchable.add(cut.index)
            return None

    def activations(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Every tensor that crosses any cut, as the model computes it from ``inputs``, in one run.

        What a tail of any cut is fed in real use: the cuts may carry shape tensors or indices,
        which random values would turn into errors or into work of another size.
        """
        graph = self.graph
        inputs_by_index = {t.index for t in graph.inputs}
        wanted: dict[int, None] = {}
        for k in range(1, graph.num_operators):
            for t in graph.cut(k).tensors:
                if t.index not in inputs_by_index:
                    wanted[t.index] = None
        produced: Tensors = {}
        if wanted:
            data = extract_subgraph(
                graph, range(graph.num_operators), list(graph.input_indices), list(wanted)
            )
            with create_backend(self.backend, data, threads=self.threads) as backend:
                produced = backend.run(inputs)
        return {**{t.name: inputs[t.name] for t in graph.inputs}, **produced}

    def warm(self, k: int) -> None:
        """Build both halves of cut ``k`` now rather than on the first request."""
        cut = self.graph.cut(k)
        if 0 < k < self.graph.num_operators:
            self._half("head", cut)
            if cut.tail_outputs:
                self._half("tail", cut)
        else:
            _ = self.whole

    def close(self) -> None:
        with self._lock:
            halves = list(self._halves.values())
            self._halves.clear()
            whole, self._whole = self._whole, None
        for backend in halves + ([whole] if whole else []):
            backend.close()

    def __enter__(self) -> ModelRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _load(self, data: bytes, batch: int = 1) -> Backend:
        make = functools.partial(create_backend, self.backend, data, threads=self.threads, batch=batch)
        first = make()
        if self.replicas == 1:
            return first
        return ReplicaPool(first, make, self.replicas)

    def half_error(self, side: str, k: int) -> str | None:
        """Why the ``side`` ("head" or "tail") of cut ``k`` cannot run here, building it if need be;
        None when it runs. The whole model's own failure is not a half's: cuts 0 and N say None."""
        if not 0 < k < self.graph.num_operators:
            return None
        try:
            self._half(side, self.graph.cut(k))
        except HALF_ERRORS as err:
            return str(err)
        return None

    def _half(self, side: str, cut: Cut, batch: int = 1) -> Backend:
        key = (side, cut.index, batch)
        broken = self._broken.get((side, cut.index))
        if broken is not None:
            raise _KnownBrokenError(broken)
        with self._lock:
            backend = self._halves.get(key)
            if backend is not None:
                self._halves.move_to_end(key)
                self.half_hits += 1
                return backend
            self.half_loads += 1
        if side == "head":
            data = build_head(self.graph, cut)
        else:
            data = self.graph.data if cut.index == 0 else build_tail(self.graph, cut)
        try:
            backend = self._load(data, batch)
            if batch == 1:
                _check_boundary(side, cut, backend)
        except HALF_ERRORS as err:
            if batch == 1:
                with self._lock:
                    self._broken.setdefault((side, cut.index), str(err))
            raise
        logger.debug("built %s of cut %d (%d bytes)", side, cut.index, len(data))
        evicted: list[Backend] = []
        with self._lock:
            existing = self._halves.get(key)
            if existing is not None:
                evicted.append(backend)
                backend = existing
            else:
                self._halves[key] = backend
            while len(self._halves) > self.cache_size:
                evicted.append(self._halves.popitem(last=False)[1])
        for old in evicted:
            old.close()
        return backend


class _KnownBrokenError(BackendError):
    """A half that failed before, failing again without another try."""


def _check_boundary(side: str, cut: Cut, backend: Backend) -> None:
    """The built half must expose exactly the cut's tensors, with their dtypes, shapes and quantization."""
    if side == "head":
        expected = list(cut.tensors) + [t for t in cut.head_outputs if t not in cut.tensors]
        actual = backend.outputs
    else:
        expected = list(cut.tensors)
        actual = backend.inputs
    by_name = {s.name: s for s in actual}
    for tensor in expected:
        spec = by_name.get(tensor.name)
        if spec is None or not _same(tensor, spec):
            raise ModelMismatchError(
                f"{side} of cut {cut.index}: tensor {tensor.name!r} ({tensor.dtype.name}{list(tensor.shape)}) "
                f"does not match the built model's {spec}"
            )


def _same(tensor: TensorInfo, spec: TensorSpec) -> bool:
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
        return False
    # Per-tensor quantization must survive surgery; a per-channel tensor reports (0, 0) here.
    quant = tensor.quantization
    expected = quant if quant is not None else (0.0, 0)
    return (float(expected[0]), int(expected[1])) == (spec.scale, spec.zero_point) or quant is None
