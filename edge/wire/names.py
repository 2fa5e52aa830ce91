"""The names both sides put on the wire: request and response parameters, and special outputs.

The device, the encodings and the server import these; none types them by hand. This module imports
nothing.
"""

from __future__ import annotations

__all__ = [
    "ACCEPT_ENCODING",
    "BACKEND",
    "BATCH_SIZE",
    "COMPUTE_US",
    "CUT_MODEL_PREFIX",
    "ENCODING",
    "EXTENSIONS",
    "MODEL_SHA256",
    "PING",
    "PROFILE",
    "PROFILE_OUTPUT",
    "PROFILE_RUNS",
    "QUEUE_US",
    "SPLIT_POINT",
    "STACK",
    "STACK_PREFIX",
    "STREAM_WINDOW_PREFIX",
    "THREADS",
    "max_stack",
    "stream_window",
]

# -- request parameters -----------------------------------------------------------------------
SPLIT_POINT = "split_point"
"""int64 K: run the tail of cut K on the cut tensors the request carries (absent: the whole model)."""
MODEL_SHA256 = "model_sha256"
"""string: the sha256 of the model the device runs; a server holding other bytes refuses the request."""
PROFILE = "profile"
"""bool, no inputs: answer with the server's median tail time per cut."""
PING = "ping"
"""bool, no inputs: run nothing and answer at once (a probe of a request's fixed cost)."""
STACK = "edge_stack"
"""int64 W >= 2, with ``split_point``: the request carries W samples, stacked along the first axis of
every cut tensor (whose first axis is 1 in the model); the answer's outputs carry W along theirs,
sample i's being exactly what sample i alone gives. The answer names W again. One message for W
samples: what a message costs is paid once."""
ACCEPT_ENCODING = "edge_accept_encoding"
"""string: a codec the device decodes; the server may compress large outputs with it."""

# -- response parameters ----------------------------------------------------------------------
COMPUTE_US = "compute_us"
"""int64: microseconds the server computed."""
QUEUE_US = "queue_us"
"""int64: microseconds between the request's arrival and the start of its compute."""
BATCH_SIZE = "batch_size"
"""int64, when the server ran the request in a batch: how many requests it ran with (compute_us is the batch's)."""
PROFILE_RUNS = "profile_runs"
BACKEND = "backend"
THREADS = "threads"

# -- tensor parameters ------------------------------------------------------------------------
ENCODING = "edge_encoding"
"""string, on a tensor: how its bytes are encoded (absent: ``raw``); see :data:`edge.wire.encodings.ENCODINGS`."""

# -- outputs ----------------------------------------------------------------------------------
PROFILE_OUTPUT = "tail_ms"
"""FP32 [N + 1]: a profile's answer; +inf marks a cut whose tail could not run."""

EXTENSIONS = (SPLIT_POINT, MODEL_SHA256)
"""What ServerMetadata lists as extensions."""
CUT_MODEL_PREFIX = "edge_cut_model:"
"""ServerMetadata lists ``edge_cut_model:NAME@K`` when the server serves the tail of NAME's cut K
under the name ``NAME@K`` (MLServer batches by model name); the device sends those tails there."""
STREAM_WINDOW_PREFIX = "edge_stream_window:"
"""ServerMetadata lists ``edge_stream_window:N``: the requests one stream may have in flight."""


STACK_PREFIX = "edge_stack:"
"""ServerMetadata lists ``edge_stack:N``: the most samples one stacked request (:data:`STACK`) may carry."""


def stream_window(server_extensions: list[str] | tuple[str, ...]) -> int | None:
    """The stream window a server's metadata names; None when it names none (it answers in turn)."""
    return _count(server_extensions, STREAM_WINDOW_PREFIX)


def max_stack(server_extensions: list[str] | tuple[str, ...]) -> int:
    """The most samples a server takes in one stacked request; 1 when it names none (it takes none)."""
    return _count(server_extensions, STACK_PREFIX) or 1


def _count(server_extensions: list[str] | tuple[str, ...], prefix: str) -> int | None:
    """The positive count ``prefix`` + N in the extensions names; None when none does."""
    for extension in server_extensions:
        if extension.startswith(prefix):
            value = extension[len(prefix) :]
            if value.isdigit() and 0 < int(value) < 2**31:
                return int(value)
    return None
