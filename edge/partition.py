"""Cut a model into a head and a tail: flatbuffer surgery and the split manifest.

The head keeps operators [0, K) and outputs the cut tensors plus any model outputs it
computes; the tail keeps [K, N) and takes the cut tensors as inputs. Tensors, buffers,
operator codes and signatures are rebuilt so both files load on their own and carry only
the weights their operators use. Original tensor names are kept, which is how the two
halves, the manifest and the wire agree on what each tensor is.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from .errors import CutError, ModelFormatError
from .fileio import stage
from .graph import Cut, ModelGraph, TensorInfo

__all__ = [
    "Partition",
    "SplitManifest",
    "build_head",
    "build_tail",
    "extract_subgraph",
    "read_manifest",
    "split_model",
    "write_split",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "edge-split/1"
# Matches the TFLite converter: weights aligned for mmap and SIMD loads.
_BUFFER_ALIGNMENT = 16


@dataclass(frozen=True, slots=True)
class Partition:
    """A model cut at ``cut.index``: the two halves as .tflite bytes."""

    sha256: str
    num_operators: int
    cut: Cut
    head: bytes
    tail: bytes

    @property
    def manifest(self) -> SplitManifest:
        return SplitManifest(
            source_sha256=self.sha256,
            split_point=self.cut.index,
            num_operators=self.num_operators,
            tensors=self.cut.tensors,
            head_outputs=self.cut.head_outputs,
            tail_outputs=self.cut.tail_outputs,
        )


@dataclass(frozen=True, slots=True)
class SplitManifest:
    """What ``split.json`` records: which model, which cut, and the tensors crossing it, in order."""

    source_sha256: str
    split_point: int
    num_operators: int
    tensors: tuple[TensorInfo, ...]
    head_outputs: tuple[TensorInfo, ...]
    tail_outputs: tuple[TensorInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "source_sha256": self.source_sha256,
            "split_point": self.split_point,
            "num_operators": self.num_operators,
            "cut_bytes": sum(t.nbytes for t in self.tensors),
            "tensors": [t.describe() for t in self.tensors],
            "head_outputs": [t.name for t in self.head_outputs],
            "tail_outputs": [t.name for t in self.tail_outputs],
        }


def split_model(graph: ModelGraph, k: int) -> Partition:
    """Cut ``graph`` after its first ``k`` operators."""
    cut = graph.cut(k)
    return Partition(
        sha256=graph.sha256,
        num_operators=graph.num_operators,
        cut=cut,
        head=build_head(graph, cut),
        tail=build_tail(graph, cut),
    )


def build_head(graph: ModelGraph, cut: Cut) -> bytes:
    """The head of ``cut``: the model's inputs in, the cut tensors and head-computed outputs out."""
    outputs = _unique([t.index for t in cut.tensors] + [t.index for t in cut.head_outputs])
    return extract_subgraph(graph, graph.head_operators(cut.index), list(graph.input_indices), outputs)


def build_tail(graph: ModelGraph, cut: Cut) -> bytes:
    """The tail of ``cut``: the cut tensors in, the tail-computed model outputs out."""
    return extract_subgraph(
        graph,
        graph.tail_operators(cut.index),
        [t.index for t in cut.tensors],
        [t.index for t in cut.tail_outputs],
    )


def extract_subgraph(
    graph: ModelGraph, ops: Sequence[int], inputs: Sequence[int], outputs: Sequence[int]
) -> bytes:
    """A standalone .tflite holding operators ``ops`` of ``graph``, with the given graph inputs and outputs.

    Tensor indices are those of ``graph``; the result is renumbered densely. The model's other
    subgraphs (the bodies of WHILE, IF and CALL) are kept whole at their own indices.
    """
    model = graph.model
    source = model.subgraphs[0]
    src_ops = [source.operators[i] for i in ops]

    used: set[int] = set(inputs) | set(outputs)
    for op in src_ops:
        used.update(t for t in _op_tensors(op) if t >= 0)
    tensor_map = {old: new for new, old in enumerate(sorted(used))}

    buffers: list[schema.BufferT] = [schema.BufferT()]
    buffer_map: dict[int, int] = {0: 0}
    tensors = []
    for old in sorted(used):
        tensor = copy.copy(source.tensors[old])
        tensor.buffer = _remap_buffer(model, tensor.buffer, buffers, buffer_map)
        tensors.append(tensor)

    opcode_map: dict[int, int] = {}
    operator_codes: list[schema.OperatorCodeT] = []

    def copy_op(op: schema.OperatorT, tensor_map: dict[int, int] | None) -> schema.OperatorT:
        new_op = copy.copy(op)
        if op.opcodeIndex not in opcode_map:
            opcode_map[op.opcodeIndex] = len(operator_codes)
            operator_codes.append(model.operatorCodes[op.opcodeIndex])
        new_op.opcodeIndex = opcode_map[op.opcodeIndex]
        if tensor_map is not None:
            new_op.inputs = _remap(op.inputs, tensor_map)
            new_op.outputs = _remap(op.outputs, tensor_map)
            new_op.intermediates = _remap(op.intermediates, tensor_map) if op.intermediates else None
        return new_op

    subgraph = schema.SubGraphT()
    subgraph.tensors = tensors
    subgraph.operators = [copy_op(op, tensor_map) for op in src_ops]
    subgraph.inputs = [tensor_map[t] for t in inputs]
    subgraph.outputs = [tensor_map[t] for t in outputs]
    subgraph.name = source.name
    subgraphs = [subgraph]
    for other in model.subgraphs[1:]:
        kept_graph = copy.copy(other)
        kept_graph.tensors = []
        for t in other.tensors or []:
            kept = copy.copy(t)
            kept.buffer = _remap_buffer(model, t.buffer, buffers, buffer_map)
            kept_graph.tensors.append(kept)
        kept_graph.operators = [copy_op(op, None) for op in other.operators or []]
        subgraphs.append(kept_graph)

    metadata = []
    for entry in model.metadata or []:
        kept = copy.copy(entry)
        kept.buffer = _remap_buffer(model, entry.buffer, buffers, buffer_map)
        metadata.append(kept)

    signature = schema.SignatureDefT()
    signature.signatureKey = _signature_key(model)
    signature.subgraphIndex = 0
    signature.inputs = [_tensor_map_entry(graph.tensors[t].name, tensor_map[t]) for t in inputs]
    signature.outputs = [_tensor_map_entry(graph.tensors[t].name, tensor_map[t]) for t in outputs]

    out = schema.ModelT()
    out.version = model.version
    out.description = model.description
    out.operatorCodes = operator_codes
    out.subgraphs = subgraphs
    out.buffers = [_AlignedBuffer(b.data) for b in buffers]
    out.metadata = metadata or None
    out.signatureDefs = [signature]
    return _pack(out)


def write_split(partition: Partition, out_dir: str | Path) -> list[Path]:
    """Write head.tflite, tail.tflite and split.json into ``out_dir`` atomically: all three, or none."""
    out = Path(out_dir)
    files = {
        "head.tflite": partition.head,
        "tail.tflite": partition.tail,
        "split.json": (json.dumps(partition.manifest.to_json(), indent=2) + "\n").encode(),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CutError(f"cannot create output directory {out}: {err.strerror or err}") from err
    in_the_way = [name for name in files if (out / name).is_dir()]
    if in_the_way:
        raise CutError(f"cannot write split into {out}: {', '.join(in_the_way)} is a directory")
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for name, data in files.items():
            staged.append((stage(out, name, data), out / name))
        for tmp, final in staged:
            existed = final.exists()
            os.replace(tmp, final)
            if not existed:
                placed.append(final)
    except OSError as err:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for final in placed:  # all or nothing: what this call added goes again
            final.unlink(missing_ok=True)
        raise CutError(f"cannot write split into {out}: {err.strerror or err}") from err
    return [final for _, final in staged]


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load a ``split.json`` written by :func:`write_split`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"{path}: not a readable split manifest: {err}") from err
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ModelFormatError(f"{path}: not a split manifest (format is not {MANIFEST_FORMAT!r})")
    return data


# -- helpers ----------------------------------------------------------------------------


class _AlignedBuffer(schema.BufferT):
    """A buffer whose bytes are packed on a 16-byte boundary, as the TFLite converter does."""

    def __init__(self, data: Any) -> None:
        super().__init__(data=data)

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 - flatbuffers' name
        vector = None
        if self.data is not None and len(self.data) > 0:
            raw = np.asarray(self.data, dtype=np.uint8).tobytes()
            builder.StartVector(1, len(raw), _BUFFER_ALIGNMENT)
            builder.head = builder.head - len(raw)
            builder.Bytes[builder.head : builder.head + len(raw)] = raw
            vector = builder.EndVector()
        schema.BufferStart(builder)
        if vector is not None:
            schema.BufferAddData(builder, vector)
        return schema.BufferEnd(builder)


def _pack(model: schema.ModelT) -> bytes:
    size = sum(len(b.data) for b in model.buffers if b.data is not None)
    builder = flatbuffers.Builder(size + 64 * 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _remap_buffer(
    model: schema.ModelT, old: int, buffers: list[schema.BufferT], buffer_map: dict[int, int]
) -> int:
    if old not in buffer_map:
        source = model.buffers[old]
        if source.data is None or len(source.data) == 0:
            buffer_map[old] = 0
        else:
            buffer_map[old] = len(buffers)
            buffers.append(source)
    return buffer_map[old]


def _op_tensors(op: schema.OperatorT) -> Iterable[int]:
    yield from op.inputs or []
    yield from op.outputs or []
    yield from op.intermediates or []


def _remap(indices: Sequence[int] | None, tensor_map: dict[int, int]) -> list[int]:
    # -1 marks an omitted optional input and must stay -1.
    return [tensor_map[t] if t >= 0 else -1 for t in (indices or [])]


def _unique(items: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(items))


def _signature_key(model: schema.ModelT) -> str:
    for sig in model.signatureDefs or []:
        key = sig.signatureKey
        if key:
            return key.decode() if isinstance(key, bytes) else key
    return "serving_default"


def _tensor_map_entry(name: str, index: int) -> schema.TensorMapT:
    entry = schema.TensorMapT()
    entry.name = name
    entry.tensorIndex = index
    return entry
