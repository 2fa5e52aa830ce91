"""The wire: what crosses between device and server, independent of the transport.

Read in the order a tensor travels:

- :mod:`~edge.wire.names`: the parameter, output and extension names both sides put on the wire;
- :mod:`~edge.wire.tensors`: :class:`WireTensor`, requests, responses, datatypes and bounds;
- :mod:`~edge.wire.encodings`: how a tensor's bytes are encoded and decoded (raw, lossless, lossy),
  the one path every tensor passes, and which encoding a device sends to a server;
- :mod:`~edge.wire.packed`: tensors packed as one BYTES element, for servers that convert raw
  contents element by element.

None of it imports protobuf or grpc: :mod:`edge.protocol` maps these objects to messages.
"""

from .encodings import compress, decode, decode_expected, sent_as
from .names import (
    ACCEPT_ENCODING,
    BACKEND,
    BATCH_SIZE,
    COMPUTE_US,
    CUT_MODEL_PREFIX,
    ENCODING,
    EXTENSIONS,
    MODEL_SHA256,
    PING,
    PROFILE,
    PROFILE_OUTPUT,
    PROFILE_RUNS,
    QUEUE_US,
    SPLIT_POINT,
    STREAM_WINDOW_PREFIX,
    THREADS,
    stream_window,
)
from .tensors import (
    DATATYPES,
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
    datatype_of,
    dtype_of,
    element_count,
    encode,
)

__all__ = [
    "ACCEPT_ENCODING",
    "BACKEND",
    "BATCH_SIZE",
    "COMPUTE_US",
    "CUT_MODEL_PREFIX",
    "DATATYPES",
    "ENCODING",
    "EXTENSIONS",
    "MAX_ENTRIES",
    "MAX_NDIM",
    "MAX_TENSORS",
    "MODEL_SHA256",
    "PING",
    "PROFILE",
    "PROFILE_OUTPUT",
    "PROFILE_RUNS",
    "QUEUE_US",
    "SPLIT_POINT",
    "STREAM_WINDOW_PREFIX",
    "THREADS",
    "Deferred",
    "InferRequest",
    "InferResponse",
    "ModelMetadata",
    "ParameterValue",
    "TensorMetadata",
    "WireTensor",
    "compress",
    "datatype_of",
    "decode",
    "decode_expected",
    "dtype_of",
    "element_count",
    "encode",
    "sent_as",
    "stream_window",
]
