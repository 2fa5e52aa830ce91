"""The Open Inference Protocol over gRPC: generated messages, stubs and converters.

``pb`` holds the messages and ``pb_grpc`` the stub and servicer base, both generated from
``protos/grpc_service.proto`` by ``tools/gen_protos.py``. The converters in
:mod:`edge.protocol.converters` are the only code that turns messages into
:mod:`edge.wire` objects and back.
"""

from __future__ import annotations

from google.protobuf.descriptor_pool import DescriptorPool

from edge.protocol import grpc_service_pb2 as pb
from edge.protocol import grpc_service_pb2_grpc as pb_grpc
from edge.protocol.converters import (
    infer_request_from_pb,
    infer_request_to_pb,
    infer_response_from_pb,
    infer_response_to_pb,
    model_metadata_from_pb,
    model_metadata_to_pb,
    parameters_from_pb,
    parameters_to_pb,
    stream_error_from_pb,
    stream_error_to_pb,
)

__all__ = [
    "DESCRIPTOR_POOL",
    "SERVICE_NAME",
    "infer_request_from_pb",
    "infer_request_to_pb",
    "infer_response_from_pb",
    "infer_response_to_pb",
    "model_metadata_from_pb",
    "model_metadata_to_pb",
    "parameters_from_pb",
    "parameters_to_pb",
    "pb",
    "pb_grpc",
    "stream_error_from_pb",
    "stream_error_to_pb",
]

#: "inference.GRPCInferenceService", read from the descriptor.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

#: The private pool holding our descriptors (see tools/gen_protos.py); gRPC reflection
#: needs it, because the default pool does not know them.
DESCRIPTOR_POOL: DescriptorPool = pb.DESCRIPTOR.pool
