"""Read a .tflite flatbuffer and describe its main graph: operators, tensors and every cut.

Cut K (0 <= K <= N) splits the main subgraph's N operators into a head [0, K) and a tail
[K, N). The tensors that cross cut K are the activations that are produced in the head, or
are graph inputs, and are consumed in the tail. With residual or dense connections several
tensors cross one cut. A tensor computed from constants alone (fp16 weights behind
DEQUANTIZE, sparse ones behind DENSIFY) is a weight, not an activation: it never crosses.

Parsing uses the schema bindings shipped inside ``ai-edge-litert``; no TensorFlow.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from .errors import CutError, ModelFormatError, UnsupportedModelError

__all__ = ["Cut", "ModelGraph", "OperatorInfo", "TensorInfo", "load_model"]

logger = logging.getLogger(__name__)

_TFLITE_IDENTIFIER = b"TFL3"

_DTYPES: dict[int, np.dtype] = {
    schema.TensorType.FLOAT32: np.dtype(np.float32),
    schema.TensorType.FLOAT16: np.dtype(np.float16),
    schema.TensorType.FLOAT64: np.dtype(np.float64),
    schema.TensorType.INT8: np.dtype(np.int8),
    schema.TensorType.INT16: np.dtype(np.int16),
    schema.TensorType.INT32: np.dtype(np.int32),
    schema.TensorType.INT64: np.dtype(np.int64),
    schema.TensorType.UINT8: np.dtype(np.uint8),
    schema.TensorType.UINT16: np.dtype(np.uint16),
    schema.TensorType.UINT32: np.dtype(np.uint32),
    schema.TensorType.UINT64: np.dtype(np.uint64),
    schema.TensorType.BOOL: np.dtype(np.bool_),
}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
# Operators that keep state across invocations (a session initializer, resource variables): the
# halves of a cut would each hold their own copy of that state.
_STATEFUL = {"CALL_ONCE", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"}
# Operators whose outputs differ from run to run even on constant inputs: never weights.
_NONDETERMINISTIC = {"RANDOM_UNIFORM", "RANDOM_STANDARD_NORMAL", "MULTINOMIAL"}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of the main subgraph."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    is_constant: bool
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def quantization(self) -> tuple[float, int] | None:
        """Per-tensor (scale, zero_point), or None when the tensor is not per-tensor quantized."""
        if len(self.scale) == 1 and len(self.zero_point) == 1:
            return self.scale[0], self.zero_point[0]
        return None

    def describe(self) -> dict[str, object]:
        """A JSON-friendly summary."""
        quant = self.quantization
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "bytes": self.nbytes,
            "scale": quant[0] if quant else None,
            "zero_point": quant[1] if quant else None,
        }


@dataclass(frozen=True, slots=True)
class OperatorInfo:
    """One operator of the main subgraph, in execution order."""

    index: int
    opcode: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Cut:
    """The boundary between head [0, index) and tail [index, N)."""

    index: int
    tensors: tuple[TensorInfo, ...]
    """Tensors sent from head to tail, in a fixed order both sides agree on."""
    head_outputs: tuple[TensorInfo, ...]
    """Model outputs computed in the head; the device already holds them."""
    tail_outputs: tuple[TensorInfo, ...]
    """Model outputs computed in the tail."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)


class ModelGraph:
    """A parsed .tflite model: its main graph, and the cuts through it."""

    def __init__(self, data: bytes, *, source: str = "<bytes>") -> None:
        self.source = source
        self.data = bytes(data)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.model = _parse(self.data, source)
        subgraph = self.model.subgraphs[0]
        self._subgraph = subgraph
        try:
            self.tensors: tuple[TensorInfo, ...] = tuple(
                _tensor_info(i, t, self.model.buffers) for i, t in enumerate(subgraph.tensors or [])
            )
        except ModelFormatError as err:
            raise ModelFormatError(f"{source} is corrupt: {err}") from err
        self.operators: tuple[OperatorInfo, ...] = tuple(
            OperatorInfo(
                index=i,
                opcode=opcode_name(self.model.operatorCodes[op.opcodeIndex]),
                inputs=tuple(int(x) for x in (op.inputs or []) if x >= 0),
                outputs=tuple(int(x) for x in (op.outputs or []) if x >= 0),
            )
            for i, op in enumerate(subgraph.operators or [])
        )
        codes = self.model.operatorCodes or []
        self.operator_names: frozenset[str] = frozenset(
            opcode_name(codes[op.opcodeIndex]) for g in self.model.subgraphs for op in g.operators or []
        )
        """Every distinct operator of the model, in all its subgraphs (``CUSTOM:name`` for custom ones)."""
        self.input_indices = tuple(int(i) for i in subgraph.inputs or [])
        self.output_indices = tuple(int(i) for i in subgraph.outputs or [])
        self._check_supported()
        self._producer, self._last_use = self._lifetimes()
        self.computed_weights: frozenset[int] = self._computed_weights()
        """Tensors computed from constants alone (a DEQUANTIZE of fp16 weights, a DENSIFY of sparse
        ones, chains of them): weights, not activations. They never cross a cut; their producers go
        into each half that reads them, where the backend folds them as it does in the whole model."""
        self._cuts: dict[int, Cut] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> ModelGraph:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise ModelFormatError(f"{path}: no such file") from err
        except OSError as err:
            raise ModelFormatError(f"{path}: cannot read: {err.strerror or err}") from err
        return cls(data, source=str(path))

    # -- what the model is ------------------------------------------------------------

    # Read on every request, and fixed once the graph is read: computed once (after the first read
    # an attribute of the instance, no call at all).

    @cached_property
    def num_operators(self) -> int:
        return len(self.operators)

    @cached_property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return tuple([self.tensors[i] for i in self.input_indices])

    @cached_property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return tuple([self.tensors[i] for i in self.output_indices])

    @cached_property
    def tensor_by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def producer(self, tensor: int) -> int:
        """Index of the operator that produces ``tensor``; -1 for graph inputs and constants."""
        return self._producer.get(tensor, -1)

    # -- cuts -------------------------------------------------------------------------

    def cut(self, k: int) -> Cut:
        """The cut after the first ``k`` operators."""
        cached = self._cuts.get(k)
        if cached is not None:
            return cached
        n = self.num_operators
        if not isinstance(k, int) or not 0 <= k <= n:
            raise CutError(f"cut {k} is out of range: {self.source} has {n} operators, so 0 <= K <= {n}")
        return self._cuts.setdefault(k, self._compute_cut(k))

    def _compute_cut(self, k: int) -> Cut:
        crossing = [
            t for t, last in self._last_use.items() if self.producer(t) < k <= last and self._is_activation(t)
        ]
        crossing.sort(key=self._order_key)
        outputs = self.output_indices
        return Cut(
            index=k,
            tensors=tuple(self.tensors[t] for t in crossing),
            head_outputs=tuple(self.tensors[t] for t in outputs if self.producer(t) < k),
            tail_outputs=tuple(self.tensors[t] for t in outputs if self.producer(t) >= k),
        )

    def is_weight(self, tensor: int) -> bool:
        """A constant, or a tensor computed from constants alone."""
        return self.tensors[tensor].is_constant or tensor in self.computed_weights

    def weight_operators(self, tensors: Iterable[int]) -> tuple[int, ...]:
        """The operators that compute the computed weights among ``tensors``, and what they need, in order."""
        ops: set[int] = set()
        stack = [t for t in tensors if t in self.computed_weights]
        while stack:
            producer = self.producer(stack.pop())
            if producer >= 0 and producer not in ops:
                ops.add(producer)
                stack.extend(t for t in self.operators[producer].inputs if t in self.computed_weights)
        return tuple(sorted(ops))

    def head_operators(self, k: int) -> tuple[int, ...]:
        """The operators of the head of cut ``k``: [0, K), less those computing weights only the tail reads."""
        cut = self.cut(k)
        needed = {t.index for t in cut.tensors} | {t.index for t in cut.head_outputs}
        kept: list[int] = []
        for op in reversed(self.operators[:k]):
            if all(t in self.computed_weights for t in op.outputs) and needed.isdisjoint(op.outputs):
                continue
            kept.append(op.index)
            needed.update(op.inputs)
        return tuple(reversed(kept))

    def tail_operators(self, k: int) -> tuple[int, ...]:
        """The operators of the tail of cut ``k``: [K, N), after those (from the head's side) that compute
        the weights it reads."""
        self.cut(k)
        read = {t for op in self.operators[k:] for t in op.inputs if self.producer(t) < k}
        return (*self.weight_operators(read), *range(k, self.num_operators))

    def cuts(self) -> list[Cut]:
        return [self.cut(k) for k in range(self.num_operators + 1)]

    def resolve_cut(self, spec: int | str) -> int:
        """Turn ``--at`` into a cut index: an integer, or the name of a tensor (cut right after it)."""
        if isinstance(spec, int):
            self.cut(spec)
            return spec
        text = spec.strip()
        if text.lstrip("-").isdigit():
            return self.resolve_cut(int(text))
        tensor = self.tensor_by_name.get(text)
        if tensor is None:
            raise CutError(f"{self.source} has no tensor named {text!r}")
        if tensor.is_constant:
            raise CutError(f"tensor {text!r} is a constant, not an activation: no cut follows it")
        return self.producer(tensor.index) + 1

    # -- internals --------------------------------------------------------------------

    def _is_activation(self, tensor: int) -> bool:
        return not self.is_weight(tensor)

    def _computed_weights(self) -> frozenset[int]:
        weights: set[int] = set()
        for op in self.operators:
            if (
                op.inputs
                and op.opcode not in _NONDETERMINISTIC
                and not op.opcode.startswith("CUSTOM:")
                and all(self.tensors[t].is_constant or t in weights for t in op.inputs)
            ):
                weights.update(op.outputs)
        return frozenset(weights - set(self.input_indices))

    def _order_key(self, tensor: int) -> tuple[int, int]:
        producer = self.producer(tensor)
        if producer < 0:
            return (-1, self.input_indices.index(tensor) if tensor in self.input_indices else tensor)
        return (producer, self.operators[producer].outputs.index(tensor))

    def _lifetimes(self) -> tuple[dict[int, int], dict[int, int]]:
        producer: dict[int, int] = {}
        last_use: dict[int, int] = {}
        for op in self.operators:
            for t in op.inputs:
                last_use[t] = op.index
            for t in op.outputs:
                if t in producer:
                    raise ModelFormatError(f"{self.source}: tensor {t} is produced by two operators")
                producer[t] = op.index
        return producer, last_use

    def _check_supported(self) -> None:
        # Control flow (WHILE, IF, CALL) is split like any operator: its subgraphs go into both halves.
        stateful = sorted(self.operator_names & _STATEFUL)
        if stateful:
            raise UnsupportedModelError(
                f"{self.source} keeps state across runs ({', '.join(stateful)}); such models cannot be split"
            )
        variables = [
            t.name
            for t, raw in zip(self.tensors, self._subgraph.tensors or [], strict=True)
            if raw.isVariable
        ]
        if variables:
            raise UnsupportedModelError(
                f"{self.source} has variable (stateful) tensors such as {variables[0]!r}; they cannot be split"
            )
        if not self.input_indices or not self.output_indices:
            raise UnsupportedModelError(f"{self.source} declares no inputs or no outputs")


def load_model(path: str | Path) -> ModelGraph:
    """Parse a .tflite file."""
    return ModelGraph.from_file(path)


def _parse(data: bytes, source: str) -> schema.ModelT:
    if len(data) < 8 or data[4:8] != _TFLITE_IDENTIFIER:
        raise ModelFormatError(f"{source} is not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    except Exception as err:  # the generated reader raises whatever the bytes provoke
        raise ModelFormatError(f"{source} is truncated or corrupt: {type(err).__name__}: {err}") from err
    if not model.subgraphs or not model.buffers:
        raise ModelFormatError(f"{source} is truncated or corrupt: it has no subgraph or no buffers")
    _check_references(model, source, len(data))
    return model


def _check_references(model: schema.ModelT, source: str, size: int) -> None:
    """Reject a model whose indices point outside its own tables (corruption the reader lets through)."""
    n_buffers = len(model.buffers)
    n_codes = len(model.operatorCodes or [])
    for g, subgraph in enumerate(model.subgraphs):
        n_tensors = len(subgraph.tensors or [])
        for t in subgraph.tensors or []:
            if not 0 <= t.buffer < n_buffers:
                raise ModelFormatError(
                    f"{source} is corrupt: tensor {t.name!r} points at missing buffer {t.buffer}"
                )
            if t.type not in _DTYPES and t.type not in _TYPE_NAMES:
                raise ModelFormatError(f"{source} is corrupt: tensor {t.name!r} has unknown type {t.type}")
        for i, op in enumerate(subgraph.operators or []):
            if not 0 <= op.opcodeIndex < n_codes:
                raise ModelFormatError(f"{source} is corrupt: operator {i} has no operator code")
            for t in list(op.inputs or []) + list(op.outputs or []):
                if t >= n_tensors:
                    raise ModelFormatError(f"{source} is corrupt: operator {i} uses missing tensor {t}")
            name = opcode_name(model.operatorCodes[op.opcodeIndex])
            calls = _called_subgraphs(op)
            if name in _CALLS_SUBGRAPHS and not calls:
                raise ModelFormatError(
                    f"{source} is corrupt: operator {i} ({name}) names no subgraph to call"
                )
            for called in calls:
                if not 0 < called < len(model.subgraphs):
                    raise ModelFormatError(
                        f"{source} is corrupt: operator {i} ({name}) calls missing subgraph {called}"
                    )
        for t in list(subgraph.inputs or []) + list(subgraph.outputs or []):
            if not 0 <= t < n_tensors:
                raise ModelFormatError(f"{source} is corrupt: subgraph {g} names missing tensor {t}")
    for b in model.buffers:
        if b.offset and b.offset + b.size > size:
            raise ModelFormatError(f"{source} is truncated: a buffer ends past the end of the file")


_CALLS_SUBGRAPHS = {"WHILE", "IF", "CALL", "CALL_ONCE", "STABLEHLO_WHILE", "STABLEHLO_CASE"}


def _called_subgraphs(op: schema.OperatorT) -> list[int]:
    """The subgraph indices an operator's options name (WHILE's cond and body, IF's branches, ...)."""
    options = op.builtinOptions
    if options is None:
        return []
    found: list[int] = []
    for key, value in vars(options).items():
        if "ubgraph" in key and isinstance(value, int):
            found.append(value)
        elif "ubgraph" in key and value is not None and not isinstance(value, (str, bytes)):
            found.extend(int(v) for v in value)
    return found


def _tensor_info(index: int, t: schema.TensorT, buffers: list[schema.BufferT]) -> TensorInfo:
    dtype = _DTYPES.get(t.type)
    if dtype is None:
        # Types with no numpy twin (string, int4, ...) still parse; only their byte size is unknown.
        dtype = np.dtype(np.uint8)
    buffer = buffers[t.buffer]
    constant = t.buffer > 0 and buffer.data is not None and len(buffer.data) > 0
    q = t.quantization
    scale = tuple(float(s) for s in (q.scale if q is not None and q.scale is not None else ()))
    zero = tuple(int(z) for z in (q.zeroPoint if q is not None and q.zeroPoint is not None else ()))
    try:
        name = t.name.decode() if isinstance(t.name, bytes) else (t.name or f"tensor_{index}")
    except UnicodeDecodeError as err:
        # Names are how the halves, the manifest and the wire agree: one that is not text cannot.
        raise ModelFormatError(
            f"tensor {index}'s name is not valid UTF-8 ({err.reason} at byte {err.start})"
        ) from err
    return TensorInfo(
        index=index,
        name=name,
        shape=tuple(int(d) for d in (t.shape if t.shape is not None else ())),
        dtype=dtype,
        is_constant=constant,
        scale=scale,
        zero_point=zero,
        quantized_dimension=int(q.quantizedDimension) if q is not None else 0,
    )


def opcode_name(code: schema.OperatorCodeT) -> str:
    """An operator code's name: the builtin's, or ``CUSTOM:name``."""
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        custom = code.customCode
        return f"CUSTOM:{custom.decode(errors='backslashreplace') if isinstance(custom, bytes) else custom}"
    return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")
