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

from . import names, tensors
from .encodings import compress, decode, decode_expected, sent_as
from .names import *  # noqa: F403
from .tensors import *  # noqa: F403

__all__ = names.__all__ + tensors.__all__ + ["compress", "decode", "decode_expected", "sent_as"]
