"""``edge-server``'s semantics as an MLServer runtime: whole models and their tails on MLServer and KServe.

:class:`EdgeRuntime` is an :class:`mlserver.MLModel` serving one ``.tflite`` file, through the same
transport-free :class:`~server.dataplane.DataPlane` as ``edge-server``: the same validation, the
same parameters (``split_point``, ``model_sha256``, ``ping``, ``profile``), the same outputs, and
``compute_us`` / ``queue_us`` in the response parameters. Its errors carry the HTTP status MLServer
maps to the gRPC code ``edge-server`` would answer with (400 INVALID_ARGUMENT, 404 NOT_FOUND, 422
FAILED_PRECONDITION, 500 INTERNAL); the rest (an overloaded or stopping server) reach the device as
UNKNOWN, and it finishes the request itself as after any failure.

Model settings (``edge export mlserver`` writes them)::

    {"name": "digits_resnet", "implementation": "server.mlserver.EdgeRuntime",
     "parameters": {"uri": "./digits_resnet.tflite", "extra": {"backend": "litert", "threads": 1}}}

**Tails under their own names, for adaptive batching.** MLServer batches the requests of one model
name and merges their request parameters (the last one wins), so a batch must never mix cuts. A
model ``NAME@K`` with ``"split_point": K`` in ``extra`` serves only the tail of cut K, and may set
``max_batch_size``; the server settings list ``edge_cut_model:NAME@K``, and a device sends the
tails of cut K there. Pings and profiles go to ``NAME``.

**Raw contents without per-element conversion.** MLServer converts numeric raw contents to Python
lists before a runtime sees them. A device sends :mod:`edge.wire.packed` tensors instead (one BYTES
element each; the server settings list ``edge_packed_tensors``), and gets its outputs back the
same way. Clients that send plain tensors (tritonclient) are served too, at MLServer's own pace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataModelResponse,
    MetadataTensor,
    Parameters,
    ResponseOutput,
)
from mlserver.utils import get_model_uri

from edge import wire
from edge.errors import EdgeError
from edge.graph import TensorInfo
from edge.wire import (
    InferRequest,
    InferResponse,
    ParameterValue,
    WireTensor,
    datatype_of,
    decode,
    dtype_of,
    packed,
)

from .dataplane import DataPlane
from .repository import ModelRepository
from .status import status_name

__all__ = ["EdgeRuntime", "EdgeRuntimeError"]

logger = logging.getLogger(__name__)


_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 422, "INTERNAL": 500}
"""HTTP status by gRPC status name, as MLServer maps them back; the statuses MLServer has no mapping
for (RESOURCE_EXHAUSTED, UNAVAILABLE, ...) are 503, which it reports as UNKNOWN."""

_OUR_PARAMETERS = (wire.SPLIT_POINT, wire.MODEL_SHA256, wire.PING, wire.PROFILE)


class EdgeRuntimeError(MLServerError):
    """An error of the runtime, with the HTTP status MLServer turns into the right gRPC code.

    Pickled whole, so that it keeps its status across MLServer's parallel workers."""

    def __init__(self, msg: str, status_code: int = 400) -> None:
        super().__init__(msg, status_code)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.status_code))


def _error(err: EdgeError) -> EdgeRuntimeError:
    name = status_name(err)
    code = _HTTP_STATUS.get(name, 503)
    return EdgeRuntimeError(f"{name}: {err}", code)


class _QuietRefusals(logging.Filter):
    """MLServer logs every error a runtime raises with its traceback (``logger.exception``), in its gRPC
    layer and in each worker: one traceback per refused request. A refusal of ours (status below
    500) keeps one line, with its message, and loses the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        ours = isinstance(error, EdgeRuntimeError) or (
            isinstance(error, MLServerError) and f"{EdgeRuntimeError.__name__}: " in str(error)
        )
        if ours and error is not None and getattr(error, "status_code", 500) < 500:
            message = record.getMessage()
            record.msg = message if str(error) in message else f"{message} {error}"
            record.args = ()
            record.exc_info = None
        return True


_QUIET = _QuietRefusals()


def _quiet_refusals() -> None:
    for name in ("mlserver.grpc", "mlserver.parallel", "mlserver.rest"):
        target = logging.getLogger(name)
        if _QUIET not in target.filters:
            target.addFilter(_QUIET)


# At import too: with parallel workers, MLServer's main process imports this module to find the runtime
# but never loads a model in it, and its gRPC layer logs what the workers raised.
_quiet_refusals()


class EdgeRuntime(MLModel):
    """One ``.tflite`` model (or one of its tails, with ``split_point`` in the settings' ``extra``)."""

    async def metadata(self) -> MetadataModelResponse:
        """MLServer's metadata, with the inputs and outputs taken from the model (or from the tail of its
        cut): the settings name none."""
        response = await super().metadata()
        graph = self._repository.get(self._served).graph
        if self._cut is None:
            inputs, outputs = graph.inputs, graph.outputs
        else:
            cut = graph.cut(self._cut)
            inputs, outputs = cut.tensors, cut.tail_outputs
        response.inputs = response.inputs or [_metadata_tensor(t) for t in inputs]
        response.outputs = response.outputs or [_metadata_tensor(t) for t in outputs]
        return response

    async def load(self) -> bool:
        _quiet_refusals()
        extra = dict(self.settings.parameters.extra or {}) if self.settings.parameters else {}
        path = Path(await get_model_uri(self.settings))
        self._cut: int | None = extra.get(wire.SPLIT_POINT)
        if self._cut is not None and (not isinstance(self._cut, int) or isinstance(self._cut, bool)):
            raise EdgeRuntimeError(f"model {self.name}: extra.split_point must be an integer", 422)
        try:
            self._repository = ModelRepository.from_files(
                [path], backend=str(extra.get("backend", "litert")), threads=int(extra.get("threads", 1))
            )
            # Outputs go back uncompressed: a batch merges the request parameters that would ask; and
            # MLServer batches rows itself, so it takes no stacked requests.
            self._dataplane = DataPlane(self._repository, codecs=(), max_stack=1)
        except EdgeError as err:
            raise EdgeRuntimeError(f"model {self.name}: {err}", 422) from err
        self._served = path.stem
        if self._cut is not None:
            graph = self._repository.get(self._served).graph
            graph.cut(self._cut)  # an out-of-range cut fails at load, not on the first request
        logger.info(
            "model %s: %s%s", self.name, path.name, f", the tail of cut {self._cut}" if self._cut else ""
        )
        return True

    async def unload(self) -> bool:
        self._repository.close()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        received = time.perf_counter_ns()
        parameters = self._parameters(payload)
        try:
            requests, was_packed = self._requests(payload, parameters)
            prepared = [self._dataplane.prepare(r, received) for r in requests]
            if len(prepared) > 1:
                outcomes = await asyncio.to_thread(self._dataplane.execute_batch, prepared)
                # MLServer answers a batch as one request: a refused member fails it (edge-server fails it alone).
                failed = [o for o in outcomes if isinstance(o, EdgeError)]
                if failed:
                    raise failed[0]
                responses = [o for o in outcomes if not isinstance(o, EdgeError)]
            elif prepared[0].profile:
                responses = [await asyncio.to_thread(self._dataplane.execute, prepared[0])]
            else:
                responses = [self._dataplane.execute(prepared[0])]
        except EdgeError as err:
            raise _error(err) from err
        return self._response(payload, responses, was_packed)

    # -- MLServer types <-> the data plane's ------------------------------------------------

    def _parameters(self, payload: InferenceRequest) -> dict[str, ParameterValue]:
        given = payload.parameters.model_dump(exclude_none=True) if payload.parameters else {}
        ours: dict[str, ParameterValue] = {k: given[k] for k in _OUR_PARAMETERS if k in given}
        if self._cut is not None:
            asked = ours.get(wire.SPLIT_POINT, self._cut)
            if asked != self._cut:
                raise EdgeRuntimeError(
                    f"INVALID_ARGUMENT: model {self.name} serves the tail of cut {self._cut}, not {asked!r}",
                    400,
                )
            if not (ours.get(wire.PING) or ours.get(wire.PROFILE)):
                ours[wire.SPLIT_POINT] = self._cut
        return ours

    def _requests(
        self, payload: InferenceRequest, parameters: Mapping[str, ParameterValue]
    ) -> tuple[list[InferRequest], bool]:
        """One request per packed element: MLServer's adaptive batching hands several over as one,
        their elements concatenated."""
        columns: list[list[WireTensor]] = []
        was_packed = False
        for tensor in payload.inputs:
            data = tensor.data.root if hasattr(tensor.data, "root") else tensor.data
            datatype = str(getattr(tensor.datatype, "value", tensor.datatype))  # an enum, or its value
            if datatype == "BYTES":
                was_packed = True
                columns.append([packed.unpack_element(tensor.name, element) for element in data])
            else:
                # Plain tensors are taken one request at a time: batching is for packed ones.
                columns.append([_plain(tensor.name, datatype, tensor.shape, data)])
        rows = {len(c) for c in columns} or {1}
        if len(rows) != 1:
            raise EdgeRuntimeError(
                "INVALID_ARGUMENT: the inputs of one request hold different batch sizes", 400
            )
        count = rows.pop()
        request_id = payload.id or ""
        return [
            InferRequest(
                model_name=self._served,
                inputs=tuple(column[i] for column in columns),
                parameters=parameters,
                id=request_id,
            )
            for i in range(count)
        ], was_packed

    def _response(
        self, payload: InferenceRequest, responses: Sequence[InferResponse], was_packed: bool
    ) -> InferenceResponse:
        first = responses[0]
        outputs = []
        for index, tensor in enumerate(first.outputs):
            column = [r.outputs[index] for r in responses]
            if was_packed:
                outputs.append(
                    ResponseOutput(
                        name=tensor.name,
                        shape=[len(column)],
                        datatype="BYTES",
                        data=[packed.pack_element(t) for t in column],
                    )
                )
            else:
                arrays = [decode(t) for t in column]
                stacked = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                outputs.append(
                    ResponseOutput(
                        name=tensor.name,
                        shape=list(stacked.shape),
                        datatype=tensor.datatype,
                        data=stacked.reshape(-1).tolist(),
                    )
                )
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            parameters=Parameters(**first.parameters),
            outputs=outputs,
        )


def _metadata_tensor(tensor: TensorInfo) -> MetadataTensor:
    return MetadataTensor(name=tensor.name, datatype=datatype_of(tensor.dtype), shape=list(tensor.shape))


def _plain(name: str, datatype: str, shape: Sequence[int], data: Sequence[Any]) -> WireTensor:
    """A plain tensor, whose raw contents MLServer has made a list: back to raw bytes."""
    try:
        dtype = dtype_of(datatype)
    except EdgeError as err:
        raise _error(err) from err
    dims = tuple(int(d) for d in shape)
    array = np.asarray(data, dtype=dtype)
    if array.size != int(np.prod(dims)):
        raise EdgeRuntimeError(
            f"INVALID_ARGUMENT: input {name!r} has {array.size} values for shape {list(dims)}", 400
        )
    return WireTensor(name, datatype, dims, array.astype(dtype.newbyteorder("<")).tobytes())
