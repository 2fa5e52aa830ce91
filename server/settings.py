"""``edge-server``'s settings: command-line flags over an optional TOML file, validated by pydantic.

Validation only: reading the file and turning errors into ``file: key: problem`` is
:func:`load_settings`'s job; nothing here opens a socket or loads a model.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge.address import check_host
from edge.backends import DEFAULT_BACKEND, BackendName
from edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_BATCH_DELAY_US",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTION_AGE_S",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_INFLIGHT_BYTES",
    "DEFAULT_MAX_INFLIGHT_PER_DEVICE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_STREAMS_PER_CONNECTION",
    "ServerSettings",
    "default_workers",
    "load_settings",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_MAX_CONNECTION_AGE_S = 3600.0
DEFAULT_MAX_INFLIGHT = 64
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_INFLIGHT_PER_DEVICE = 16
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_BATCH_DELAY_US = 500
DEFAULT_MAX_STACK = 8
MAX_STREAMS_PER_CONNECTION = 128


def default_workers() -> int:
    """One compute thread per core this process may run on (its CPU affinity, as taskset sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class ServerSettings(BaseModel):
    """What one ``edge-server`` process serves, and with what limits."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    models: Path = Field(description="Directory of .tflite files; each is served under its file stem.")
    host: str = Field(default="0.0.0.0", description="Address to listen on.")
    port: int = Field(default=8001, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    backend: BackendName = Field(default=DEFAULT_BACKEND, description="Inference backend.")
    threads: int = Field(default=1, ge=1, le=64, description="Interpreter threads per model.")
    workers: int = Field(
        default_factory=default_workers,
        ge=0,
        le=256,
        description="Compute threads; default: one per core the server may run on. A request alone on a "
        "short route computes on the event loop (a thread hand-off costs about 0.45 ms); others on the "
        "threads, so health checks never wait behind compute. 0 computes everything on the event loop.",
    )
    max_inflight: int = Field(
        default=DEFAULT_MAX_INFLIGHT,
        ge=1,
        le=100_000,
        description="Requests admitted at once, waiting or running; the next gets RESOURCE_EXHAUSTED.",
    )
    max_inflight_per_device: int = Field(
        default=DEFAULT_MAX_INFLIGHT_PER_DEVICE,
        ge=1,
        le=100_000,
        description="Requests one device may have admitted at once; past it, RESOURCE_EXHAUSTED. A device is "
        "its token's DEVICE_ID with --auth-tokens, else its address. Compute turns go to devices in round robin.",
    )
    max_batch: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Requests for the same model and cut run as one batch, up to this many (1: off). "
        "Each gets exactly its own outputs. Off by default: on a CPU at one thread it did not pay.",
    )
    max_batch_delay_us: int = Field(
        default=DEFAULT_MAX_BATCH_DELAY_US,
        ge=0,
        le=1_000_000,
        description="How long a batch waits for more requests before it runs (with max_batch > 1).",
    )
    max_stack: int = Field(
        default=DEFAULT_MAX_STACK,
        ge=1,
        le=64,
        description="Samples one stacked request may carry: a device with several requests queued for one "
        "cut sends them as one message, paying a message's cost once (1: off). Each gets exactly its own outputs.",
    )
    max_inflight_bytes: int = Field(
        default=DEFAULT_MAX_INFLIGHT_BYTES,
        ge=1024,
        le=2**40,
        description="Tensor bytes admitted at once, waiting or computing; past it, RESOURCE_EXHAUSTED.",
    )
    cache_size: int = Field(default=16, ge=2, le=4096, description="Tails kept loaded per model (LRU).")
    max_model_bytes: int = Field(
        default=1024**3, ge=1024, le=2**40, description="Largest model file loaded; a larger one is skipped."
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        ge=4096,
        le=2**31 - 1,
        description="Largest gRPC message received or sent.",
    )
    max_connections: int = Field(
        default=DEFAULT_MAX_CONNECTIONS,
        ge=1,
        le=1_000_000,
        description="Connections open at once; one past it is closed as it opens (the device sees UNAVAILABLE "
        "and finishes locally). Keep it under the file limit (LimitNOFILE in the shipped unit: 65,536).",
    )
    idle_timeout_s: float = Field(
        default=DEFAULT_IDLE_TIMEOUT_S,
        gt=0.0,
        le=86400.0,
        description="A connection with no call for this long is closed (a device reconnects by itself).",
    )
    max_connection_age_s: float = Field(
        default=DEFAULT_MAX_CONNECTION_AGE_S,
        gt=0.0,
        le=7 * 86400.0,
        description="A connection is closed after this long (its calls get 30 s more), whatever it carries: "
        "a held-open stream cannot keep a connection for ever, and a revoked token stops working on open "
        "streams within this. A device reconnects by itself.",
    )
    grace_s: float = Field(
        default=5.0, ge=0.0, le=3600.0, description="Seconds in-flight requests get at shutdown."
    )
    tls_cert: Path | None = Field(default=None, strict=False, description="PEM certificate chain: serve TLS.")
    tls_key: Path | None = Field(default=None, strict=False, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        default=None,
        strict=False,
        description="PEM CA: clients must present a certificate it signed (mTLS), or the handshake fails.",
    )
    auth_tokens: Path | None = Field(
        default=None,
        strict=False,
        description="File of 'DEVICE_ID TOKEN' lines (# comments; 'DEVICE_ID TOKEN admin' may also load and "
        "unload models): every call but health and server metadata then needs 'authorization: Bearer TOKEN' "
        "metadata. Certificates and tokens are read again on SIGHUP.",
    )
    watch_s: float = Field(
        default=2.0,
        ge=0.0,
        le=3600.0,
        description="Look at the model directory this often (0: only at start and on SIGHUP): models copied "
        "in are served, removed ones stop, replaced ones are swapped in.",
    )
    model_control: bool = Field(
        default=False,
        description="Allow RepositoryModelLoad and RepositoryModelUnload (with --auth-tokens, only to callers "
        "with an admin token); RepositoryIndex is always served.",
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Server processes on one port (SO_REUSEPORT), each with its own models and compute threads: "
        "the kernel spreads connections over them, so Python's per-request work runs on several cores. "
        "SIGHUP and SIGTERM reach every one; per-device limits and fair turns hold within each. Not yet with "
        "--metrics-port.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (needs the server extra).",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Where the metrics endpoint listens: loopback by default, as it has no TLS and no token "
        "(a Prometheus on another host: its address here, behind a firewall).",
    )
    cpu_latency_us: int | None = Field(
        default=None,
        ge=0,
        le=2_000_000_000,
        description="While serving, keep idle CPUs able to wake within this many microseconds (Linux PM QoS, "
        "/dev/cpu_dma_latency; needs root). 0 keeps them polling: lowest latency, most power.",
    )

    @field_validator("host", "metrics_host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            return check_host(value)
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @field_validator("models", "tls_cert", "tls_key", "tls_client_ca", "auth_tokens", mode="before")
    @classmethod
    def _paths(cls, value: object) -> object:
        return Path(value) if isinstance(value, str) else value


def load_settings(
    flags: Mapping[str, Any], config: Path | None = None, *, aliases: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from ``config`` (TOML, optional), with ``flags`` (the ones given on the command line) on top.

    ``aliases`` maps a flag's own name (``grace`` for ``--grace``) to its settings key (``grace_s``):
    the file may use either, not both."""
    values: dict[str, Any] = {}
    where = "command line"
    if config is not None:
        where = str(config)
        try:
            loaded = tomllib.loads(config.read_text())
            for alias, key in (aliases or {}).items():
                if alias in loaded:
                    if key in loaded:
                        raise ConfigError(f"{config}: {alias} and {key} are the same setting; give one")
                    loaded[key] = loaded.pop(alias)
            values.update(loaded)
        except OSError as err:
            raise ConfigError(f"{config}: cannot read: {err.strerror or err}") from err
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{config}: not valid TOML: {err}") from err
    values.update(flags)
    try:
        return ServerSettings(**values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "settings"
        source = "command line" if first["loc"] and first["loc"][0] in flags else where
        raise ConfigError(f"{source}: {key}: {first['msg']}") from err
