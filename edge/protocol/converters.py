"""The one place where protobuf messages and the codec's objects meet.

Everything outside ``edge.protocol`` works with :mod:`edge.wire` objects; protobuf types
never leave this module. Tensors are written as raw bytes (``raw_input_contents`` and
``raw_output_contents``). Reading accepts raw bytes or the typed ``contents`` fields, since
tritonclient and MLServer may send either.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Protocol

import grpc
import numpy as np
from google.protobuf.unknown_fields import UnknownFieldSet

from edge.errors import TensorFormatError
from edge.protocol import grpc_service_pb2 as pb
from edge.wire import (
    MAX_ENTRIES,
    MAX_NDIM,
    MAX_TENSORS,
    Deferred,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ParameterValue,
    TensorMetadata,
    WireTensor,
    dtype_of,
    element_count,
)

__all__ = [
    "infer_request_from_pb",
    "infer_request_to_pb",
    "infer_response_from_pb",
    "infer_response_to_pb",
    "model_metadata_from_pb",
    "model_metadata_to_pb",
    "parameters_from_pb",
    "parameters_to_pb",
    "stream_error_from_pb",
    "stream_error_to_pb",
    "stream_response_to_pb",
]

logger = logging.getLogger(__name__)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1

# For each datatype: the InferTensorContents field that may carry it, and the dtype that
# field holds before narrowing to the datatype. FP16 has no typed field: raw bytes only.
_CONTENTS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype("?")),
    "INT8": ("int_contents", np.dtype("<i4")),
    "INT16": ("int_contents", np.dtype("<i4")),
    "INT32": ("int_contents", np.dtype("<i4")),
    "INT64": ("int64_contents", np.dtype("<i8")),
    "UINT8": ("uint_contents", np.dtype("<u4")),
    "UINT16": ("uint_contents", np.dtype("<u4")),
    "UINT32": ("uint_contents", np.dtype("<u4")),
    "UINT64": ("uint64_contents", np.dtype("<u8")),
    "FP32": ("fp32_contents", np.dtype("<f4")),
    "FP64": ("fp64_contents", np.dtype("<f8")),
}


class _TensorMessage(Protocol):
    """What InferInputTensor and InferOutputTensor have in common."""

    name: str
    datatype: str

    @property
    def shape(self) -> Sequence[int]: ...

    @property
    def contents(self) -> pb.InferTensorContents: ...

    @property
    def parameters(self) -> Mapping[str, pb.InferParameter]: ...

    def HasField(self, field_name: str) -> bool: ...


# -- parameters ---------------------------------------------------------------------------


def parameters_to_pb(params: Mapping[str, ParameterValue]) -> dict[str, pb.InferParameter]:
    """Convert parameters to InferParameter messages, ready for a message's ``parameters=``.

    Raises TypeError for a value that is not a bool, int, float or str, and ValueError for
    an int outside the int64 and uint64 ranges.
    """
    out: dict[str, pb.InferParameter] = {}
    for key, value in params.items():
        out[key] = param = pb.InferParameter()
        _set_parameter(param, key, value)
    return out


def _set_parameters(
    target: MutableMapping[str, pb.InferParameter], params: Mapping[str, ParameterValue]
) -> None:
    """Write ``params`` into a message's ``parameters`` map in place."""
    for key, value in params.items():
        _set_parameter(target[key], key, value)


def _set_parameter(param: pb.InferParameter, key: str, value: object) -> None:
    # Exact types first: they are what requests carry, and cheaper to test than the ABCs.
    kind = type(value)
    if kind is str:
        param.string_param = value  # type: ignore[assignment]
    elif kind is int and _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
        param.int64_param = value  # type: ignore[assignment]
    # bool before int: bool is a subclass of int.
    elif isinstance(value, (bool, np.bool_)):
        param.bool_param = bool(value)
    elif isinstance(value, numbers.Integral):
        number = int(value)
        if _INT64_MIN <= number <= _INT64_MAX:
            param.int64_param = number
        elif _INT64_MAX < number <= _UINT64_MAX:
            param.uint64_param = number
        else:
            raise ValueError(f"parameter {key!r}: {number} fits neither int64 nor uint64")
    elif isinstance(value, numbers.Real):
        param.double_param = float(value)
    else:
        raise TypeError(f"parameter {key!r}: {type(value).__name__} is not a bool, int, float or str")


def parameters_from_pb(params: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    """Convert a ``parameters`` map to plain values; uint64 and int64 both become int."""
    out: dict[str, ParameterValue] = {}
    for key in params:  # not .items(): on a protobuf map that runs through a pure-Python mixin
        param = params[key]
        choice = param.WhichOneof("parameter_choice")
        if choice is None:
            raise TensorFormatError(f"parameter {key!r} has no value")
        out[key] = getattr(param, choice)
    return out


# -- tensors ------------------------------------------------------------------------------


def _raw(data: bytes | memoryview | Deferred) -> bytes:
    if isinstance(data, bytes):
        return data
    return data.load() if isinstance(data, Deferred) else bytes(data)


def _typed_to_bytes(kind: str, tensor: _TensorMessage) -> Deferred:
    """A tensor's typed ``contents`` as raw bytes of its declared datatype, converted when decoded.

    Checked now, without touching the values: the datatype, the field that carries them, and
    their count against the declared shape.
    """
    name, datatype = tensor.name, tensor.datatype
    try:
        target = dtype_of(datatype)
    except TensorFormatError as err:
        raise TensorFormatError(f"{kind} {name!r}: {err}") from err
    if datatype not in _CONTENTS:
        raise TensorFormatError(f"{kind} {name!r}: {datatype} can only be sent in raw contents")
    # Count against the shape before touching the values, so a huge declared shape fails
    # here without allocating anything.
    count = element_count(name, tensor.shape)
    field_name, wide = _CONTENTS[datatype]
    contents = tensor.contents
    for descriptor, _ in contents.ListFields():
        if descriptor.name != field_name:
            raise TensorFormatError(f"{kind} {name!r} of datatype {datatype} carries {descriptor.name}")
    values = getattr(contents, field_name)
    if len(values) != count:
        raise TensorFormatError(
            f"{kind} {name!r}: shape {list(tensor.shape)} needs {count} values, {field_name} has {len(values)}"
        )

    def load() -> bytes:
        array = np.fromiter(values, dtype=wide, count=count)
        if target.itemsize < wide.itemsize and count:
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise TensorFormatError(
                    f"{kind} {name!r}: a value in {field_name} is out of range for {datatype}"
                )
        return array.astype(target, copy=False).tobytes()

    return Deferred(count * target.itemsize, load)


def _tensors_from_pb(
    kind: str, tensors: Sequence[_TensorMessage], raw_contents: Sequence[bytes], raw_field: str
) -> tuple[WireTensor, ...]:
    if raw_contents:
        if len(raw_contents) != len(tensors):
            raise TensorFormatError(
                f"{len(raw_contents)} {raw_field} entries for {len(tensors)} {kind}s; need one per {kind}"
            )
        out = []
        for tensor, data in zip(tensors, raw_contents, strict=True):
            # An empty contents message is no contents (MLServer sets one on every raw output).
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise TensorFormatError(
                    f"{kind} {tensor.name!r} has typed contents while the message uses {raw_field}; use one or the other"
                )
            if tensor.parameters:
                out.append(
                    WireTensor(
                        tensor.name,
                        tensor.datatype,
                        tuple(tensor.shape),
                        data,
                        parameters_from_pb(tensor.parameters),
                    )
                )
            else:
                out.append(WireTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data))
        return tuple(out)
    return tuple(
        WireTensor(
            name=t.name,
            datatype=t.datatype,
            shape=tuple(t.shape),
            data=_typed_to_bytes(kind, t),
            parameters=parameters_from_pb(t.parameters),
        )
        for t in tensors
    )


def _put_tensors(tensors: Sequence[WireTensor], messages: Any, raw_contents: Any) -> None:
    """Append each tensor's metadata to ``messages`` and its bytes to ``raw_contents``.

    Filled in place with add() and append(): building sub-messages and copying them in costs twice as much.
    """
    for t in tensors:
        message = messages.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if t.parameters:
            _set_parameters(message.parameters, t.parameters)
        raw_contents.append(_raw(t.data))


# -- inference ----------------------------------------------------------------------------


def infer_request_to_pb(req: InferRequest) -> pb.ModelInferRequest:
    """Build a ModelInferRequest, with every input's bytes in ``raw_input_contents``."""
    msg = pb.ModelInferRequest(model_name=req.model_name, model_version=req.model_version, id=req.id)
    _put_tensors(req.inputs, msg.inputs, msg.raw_input_contents)
    for name in req.outputs:
        msg.outputs.add(name=name)
    _set_parameters(msg.parameters, req.parameters)
    return msg


def _check_counts(kind: str, params: Any, tensors: Sequence[_TensorMessage], named_outputs: int = 0) -> None:
    """Counts checked on the message itself (a length is free), before anything is converted: 2.5
    million parameters, or 1.5 million inputs, took the event loop seconds to turn into Python objects
    before any bound was looked at."""
    if len(params) > MAX_ENTRIES:
        message = "request" if kind == "input" else "response"
        raise TensorFormatError(f"{len(params):,} {message} parameters; at most {MAX_ENTRIES} are taken")
    if len(tensors) > MAX_TENSORS:
        raise TensorFormatError(f"{len(tensors):,} {kind}s; at most {MAX_TENSORS} are taken")
    if named_outputs > MAX_ENTRIES:
        raise TensorFormatError(f"{named_outputs:,} requested outputs; at most {MAX_ENTRIES} are taken")
    for tensor in tensors:
        if len(tensor.parameters) > MAX_ENTRIES:
            raise TensorFormatError(
                f"{kind} {tensor.name[:200]!r} has {len(tensor.parameters):,} parameters; at most {MAX_ENTRIES}"
            )
        if len(tensor.shape) > MAX_NDIM:
            raise TensorFormatError(f"{kind} {tensor.name[:200]!r} has {len(tensor.shape):,} dimensions")


def infer_request_from_pb(msg: pb.ModelInferRequest) -> InferRequest:
    """Read a ModelInferRequest whose inputs come as raw bytes or as typed contents.

    Raises TensorFormatError if both are mixed, if the raw entries do not match the inputs
    one for one, or if typed contents do not fit the declared datatype and shape. Raw bytes
    are checked later, by :func:`edge.wire.decode`.
    """
    _check_counts("input", msg.parameters, msg.inputs, len(msg.outputs))
    return InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        parameters=parameters_from_pb(msg.parameters),
        inputs=_tensors_from_pb("input", msg.inputs, msg.raw_input_contents, "raw_input_contents"),
        outputs=tuple([out.name for out in msg.outputs]) if msg.outputs else (),
    )


def infer_response_to_pb(resp: InferResponse) -> pb.ModelInferResponse:
    """Build a ModelInferResponse, with every output's bytes in ``raw_output_contents``."""
    msg = pb.ModelInferResponse()
    _fill_response(msg, resp)
    return msg


def stream_response_to_pb(resp: InferResponse) -> pb.ModelStreamInferResponse:
    """A stream's answer carrying ``resp``, built in place (wrapping a built ModelInferResponse copies it)."""
    reply = pb.ModelStreamInferResponse()
    _fill_response(reply.infer_response, resp)
    if not resp.model_name:
        reply.infer_response.SetInParent()  # present even when every field is empty
    return reply


def _fill_response(msg: pb.ModelInferResponse, resp: InferResponse) -> None:
    msg.model_name, msg.model_version, msg.id = resp.model_name, resp.model_version, resp.id
    _put_tensors(resp.outputs, msg.outputs, msg.raw_output_contents)
    _set_parameters(msg.parameters, resp.parameters)


def infer_response_from_pb(msg: pb.ModelInferResponse) -> InferResponse:
    """Read a ModelInferResponse whose outputs come as raw bytes or as typed contents."""
    _check_counts("output", msg.parameters, msg.outputs)
    return InferResponse(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        parameters=parameters_from_pb(msg.parameters),
        outputs=_tensors_from_pb("output", msg.outputs, msg.raw_output_contents, "raw_output_contents"),
    )


# -- metadata -----------------------------------------------------------------------------


def model_metadata_to_pb(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    """Build a ModelMetadataResponse."""
    Tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[Tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
        outputs=[Tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
    )


def model_metadata_from_pb(msg: pb.ModelMetadataResponse) -> ModelMetadata:
    """Read a ModelMetadataResponse."""

    def tensors(items: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorMetadata, ...]:
        return tuple(TensorMetadata(name=t.name, datatype=t.datatype, shape=tuple(t.shape)) for t in items)

    return ModelMetadata(
        name=msg.name,
        versions=tuple(msg.versions),
        platform=msg.platform,
        inputs=tensors(msg.inputs),
        outputs=tensors(msg.outputs),
    )


# -- stream errors ------------------------------------------------------------------------

_STATUS_NAMES = frozenset(code.name for code in grpc.StatusCode)


def stream_error_to_pb(status: str, message: str, request_id: str = "") -> pb.ModelStreamInferResponse:
    """A stream answer carrying an error. ``error_message`` has no status field, so it starts
    with the gRPC status name, as in ``"INVALID_ARGUMENT: input 'x' must be INT8"``. With the
    request's ``request_id``, its ``infer_response`` carries just that id, so that a device with
    several requests in flight knows which one failed."""
    reply = pb.ModelStreamInferResponse(error_message=f"{status}: {message}")
    if request_id:
        reply.infer_response.id = request_id
    return reply


def stream_error_from_pb(error_message: str) -> tuple[str, str]:
    """(status name, message) of a stream error; UNKNOWN when it names no status (as Triton's do)."""
    status, sep, rest = error_message.partition(": ")
    if sep and status in _STATUS_NAMES:
        return status, rest
    return "UNKNOWN", error_message


def stream_answer_is_foreign(reply: pb.ModelStreamInferResponse) -> bool:
    """True when a stream answer's bytes are another message's: a ModelInferResponse read as ours
    (as MLServer streams) puts the model name in ``error_message`` and leaves its other fields unknown."""
    return len(UnknownFieldSet(reply)) > 0
