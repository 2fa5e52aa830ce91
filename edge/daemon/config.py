"""The schema of a device profile (``firmware_config/*.toml``): what ``edge run`` needs to know.

Validation only: nothing here reads a file, resolves a model or opens a socket. Reading the
TOML and turning validation errors into ``file: key: problem`` lives in :mod:`.profiles`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, get_args

import numpy as np
from paho.mqtt.client import topic_matches_sub
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ..address import check_host, normalize
from ..backends import BackendName
from ..cascade import Rule
from ..credentials import TLSOptions
from ..errors import ConfigError
from ..pipeline import MAX_WINDOW
from ..planner import Objective
from ..transport.connect import DEFAULT_CONNECT_TIMEOUT_S
from ..transport.failover import Policy
from ..wire.encodings import CodecName

__all__ = [
    "AutoSplitConfig",
    "DeviceProfile",
    "EdgeConfig",
    "EdgeServerConfig",
    "FixedSplitConfig",
    "HomeAssistantConfig",
    "LimitsConfig",
    "MetricsConfig",
    "ModelConfig",
    "MqttConfig",
    "MqttTLSConfig",
    "QueueConfig",
    "ResultsConfig",
    "RuntimeConfig",
    "SensorConfig",
    "SplitConfig",
    "StatsConfig",
    "TLSConfig",
    "TopicsConfig",
]

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # matched whole (fullmatch): "$" let "abc\n" in
MAX_TOPIC_BYTES = 65_535
"""MQTT's limit on a topic (UTF-8 bytes); a topic may hold no control characters either."""


def _check_topic_text(value: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{value[:80]!r}: a topic cannot hold control characters (a newline, a tab, ...)")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        raise ValueError(f"a topic of {size:,} bytes; MQTT allows {MAX_TOPIC_BYTES:,}")


def _shared(topic: str) -> tuple[str | None, str]:
    """(group, filter) of an MQTT v5 shared subscription ``$share/GROUP/FILTER``; (None, topic) otherwise."""
    if not topic.startswith("$share/"):
        return None, topic
    _, group, plain = [*topic.split("/", 2), "", ""][:3]
    return group, plain


class _Strict(BaseModel):
    # strict: TOML has real numbers and booleans, so "1883" where a port goes is a mistake, not a port.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_address(value: str) -> str:
    try:
        return normalize(value)
    except ConfigError as err:
        raise ValueError(str(err)) from None


class RuntimeConfig(_Strict):
    backend: BackendName = Field(
        default="litert", description="Interpreter that runs the model on the device."
    )
    threads: int = Field(default=1, ge=1, le=64, description="Interpreter threads on the device.")
    cpu_latency_us: int | None = Field(
        default=None,
        ge=0,
        le=2_000_000_000,
        description="While the daemon runs, keep idle CPUs able to wake within this many microseconds "
        "(Linux PM QoS, /dev/cpu_dma_latency; needs root). 0 keeps them polling: the lowest latency and "
        "the most power. Absent: the kernel decides.",
    )


class ModelConfig(_Strict):
    path: str = Field(
        description="A .tflite file (relative paths are relative to the profile's directory), or the name of "
        "a model shipped with the package, such as 'digits_resnet'."
    )
    name: str | None = Field(
        default=None, description="The name the edge servers serve the model under; default: the file's stem."
    )
    labels: list[str] | None = Field(
        default=None,
        description="Class labels, one per element of the output; default: the class index as text.",
    )


class CascadeConfig(_Strict):
    """A small model answers first on the device; what it is unsure of takes the model's cooperative path."""

    calibration: Path | None = Field(
        default=None,
        strict=False,
        description="A file written by 'edge calibrate' (relative to the profile): the small model, rule and "
        "threshold. Its big model must be this profile's model.",
    )
    small: str | None = Field(
        default=None, description="Without a calibration: the small model (a .tflite file or a shipped name)."
    )
    exit: str | None = Field(
        default=None,
        max_length=4096,
        description="Without a calibration, instead of small: the model's early-exit output (edge inspect lists them).",
    )
    rule: Rule = Field(default="maxprob", description="Without a calibration: the confidence rule.")
    threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Without a calibration: answer locally at this confidence or above.",
    )
    max_extra_loss_pp: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="With a calibration: while escalating goes badly (the server unreachable or refusing, or "
        "past deadline_ms), accept local answers down to the threshold whose calibrated accuracy loss is at "
        "most this many percentage points above the chosen one's; back to the calibrated threshold once "
        "escalations go well again.",
    )
    deadline_ms: float | None = Field(
        default=None,
        gt=0.0,
        le=600_000.0,
        description="An escalation slower than this counts as going badly.",
    )

    @model_validator(mode="after")
    def _source(self) -> CascadeConfig:
        if self.calibration is not None and (
            self.small is not None or self.exit is not None or self.threshold is not None
        ):
            raise ValueError("give a calibration, or small (or exit) and threshold, not both")
        if self.small is not None and self.exit is not None:
            raise ValueError("give a small model or an exit, not both")
        if self.calibration is None and (
            (self.small is None and self.exit is None) or self.threshold is None
        ):
            raise ValueError("give a calibration file, or both small (or exit) and threshold")
        if self.max_extra_loss_pp is not None and self.calibration is None:
            raise ValueError("max_extra_loss_pp reads the calibration's curve: give a calibration file")
        return self


class FixedSplitConfig(_Strict):
    type: Literal["fixed"] = Field(description="Always cut the model at the same place.")
    k: int | str = Field(
        description="The cut: an operator index 0..N (0 = all on the server, N = all on the device), or the "
        "name of the tensor to cut right after."
    )

    @field_validator("k")
    @classmethod
    def _non_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("a cut index is 0 or more")
        if isinstance(value, str) and not value.strip():
            raise ValueError("a tensor name cannot be empty")
        return value


class AutoSplitConfig(_Strict):
    type: Literal["auto"] = Field(description="Let the planner choose the cut from measurements.")
    objective: Objective = Field(
        default="latency",
        description="What the planner minimises: end-to-end latency, device energy, or bytes sent.",
    )
    deadline_ms: float | None = Field(
        default=None, gt=0, description="Optional latency bound the chosen cut must meet."
    )
    max_bytes: int | None = Field(default=None, gt=0, description="Optional bound on bytes sent per request.")


SplitConfig = Annotated[FixedSplitConfig | AutoSplitConfig, Field(discriminator="type")]


class TLSConfig(_Strict):
    ca_file: Path | None = Field(
        default=None, strict=False, description="PEM file of the CA that signed the server's certificate."
    )
    cert_file: Path | None = Field(
        default=None, strict=False, description="PEM client certificate, for mutual TLS."
    )
    key_file: Path | None = Field(default=None, strict=False, description="PEM private key of cert_file.")
    server_name: str | None = Field(
        default=None,
        description="Name to check the server's certificate against, when it differs from the host.",
    )

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file for a client certificate, or neither")
        return self

    def options(self) -> TLSOptions:
        return TLSOptions(
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            server_name=self.server_name,
        )


class EdgeServerConfig(_Strict):
    address: str = Field(
        max_length=300, description="HOST:PORT of an edge server's gRPC endpoint (the port defaults to 8001)."
    )
    tls: TLSConfig | None = Field(default=None, description="TLS for this server; plaintext when absent.")
    token_file: Path | None = Field(
        default=None,
        strict=False,
        description="File whose first line is a bearer token for this server (edge-server --auth-tokens).",
    )
    codec: str = Field(
        default="raw",
        max_length=4096,
        description="Compress the tensors sent to this server, when it decodes the codec (it says so in its "
        "metadata; else they go raw): zstd or lz4 losslessly (the codecs extra), or, opt-in and lossy, fp16 "
        "(float cuts), int4 (int8 cuts), or a CODEC.json from edge codec calibrate (a path beside the "
        "profile); results through a lossy codec carry lossy = true.",
    )
    max_loss: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="With a CODEC.json: the accuracy loss allowed, in points; each cut's codec is chosen again "
        "from the calibration's front, the smallest within it. Absent: the loss it was calibrated with.",
    )
    streaming: bool = Field(
        default=True,
        description="Send tail requests on one long-lived ModelStreamInfer stream. False sends a unary "
        "ModelInfer call per request; the device also switches by itself when a server refuses streams.",
    )
    balance: bool = Field(
        default=False,
        description="The address names several servers (a DNS name with several records, as a Kubernetes "
        "headless Service gives, or a gRPC target such as dns:///NAME:PORT or ipv4:A:P,B:P): spread the requests "
        "over them with gRPC's own round_robin balancing. Requests then go as unary calls (a stream stays on "
        "one server).",
    )

    @field_validator("codec")
    @classmethod
    def _codec(cls, value: str) -> str:
        names = get_args(CodecName)
        if value not in names and not value.endswith(".json"):
            raise ValueError(
                f"choose one of {', '.join(names)}, or the path of a CODEC.json, not {value[:60]!r}"
            )
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_address(value)

    @model_validator(mode="after")
    def _max_loss_with_a_file(self) -> EdgeServerConfig:
        if self.max_loss is not None and not self.codec.endswith(".json"):
            raise ValueError(
                'max_loss chooses among a calibrated codec\'s settings: it goes with codec = "CODEC.json"'
            )
        return self


class EdgeConfig(_Strict):
    servers: list[EdgeServerConfig] = Field(
        default_factory=list,
        description="Edge servers in order of preference; the device fails over to the next one, and runs the "
        "whole model itself when none answers. Empty: always local.",
    )
    timeout_s: float = Field(
        default=2.0, gt=0, le=600, description="Deadline of each request to an edge server."
    )
    connect_timeout_s: float = Field(
        default=DEFAULT_CONNECT_TIMEOUT_S,
        gt=0,
        le=600,
        description="Deadline of connecting to an edge server (TCP, TLS, HTTP/2), apart from each request's: "
        "a slow link takes several round trips.",
    )
    retry_after_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="How often a server that failed is probed (OIP ServerReady) until it is ready again; until "
        "then it is tried only after the others.",
    )
    policy: Policy = Field(
        default="failover",
        description="Which of several servers gets a request: failover (the first healthy one, in order), "
        "round-robin (the healthy ones in turn) or least-loaded (the least work ahead: this device's requests "
        "in flight there times the time one takes, plus the queue time the server reports).",
    )


class MqttTLSConfig(_Strict):
    ca_file: Path | None = Field(
        default=None, strict=False, description="PEM CA bundle to verify the broker; default: the system's."
    )
    cert_file: Path | None = Field(
        default=None, strict=False, description="PEM client certificate, for mutual TLS."
    )
    key_file: Path | None = Field(default=None, strict=False, description="PEM private key of cert_file.")
    verify_hostname: bool = Field(
        default=True, description="Check that the broker's certificate names its host."
    )

    @model_validator(mode="after")
    def _pair(self) -> MqttTLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file for a client certificate, or neither")
        return self


class MqttConfig(_Strict):
    host: str = Field(max_length=253, description="The broker's host name or address.")
    port: int = Field(
        default=1883, ge=1, le=65535, description="The broker's port (1883 plain, 8883 TLS by convention)."
    )
    client_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="MQTT client id; default 'edge-<device_id>'. Must be stable across restarts: the persistent "
        "session, and the messages it holds, belong to it.",
    )
    username: str | None = Field(default=None, description="User name to authenticate with.")
    password: SecretStr | None = Field(
        default=None, description="Password to authenticate with (or use password_file)."
    )
    password_file: Path | None = Field(
        default=None, strict=False, description="File whose first line is the password; read when connecting."
    )
    tls: MqttTLSConfig | None = Field(default=None, description="TLS to the broker; plaintext when absent.")
    keepalive_s: int = Field(default=30, ge=5, le=65535, description="MQTT keepalive interval.")
    session_expiry_s: int = Field(
        default=86400,
        ge=60,
        le=4294967295,
        description="How long the broker keeps this device's session (subscriptions and unacknowledged "
        "messages) while the daemon is away.",
    )
    reconnect_min_s: float = Field(default=1.0, gt=0, le=3600, description="First delay before reconnecting.")
    reconnect_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest delay between reconnect attempts."
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            return check_host(value.strip("[]"))
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def _auth(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be below reconnect_min_s")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class SensorConfig(_Strict):
    topic: str = Field(
        description="MQTT topic filter to subscribe to (QoS 1); '+' and '#' wildcards allowed. "
        "'$share/GROUP/FILTER' is an MQTT v5 shared subscription: the daemons subscribed with one GROUP "
        "split the messages between them."
    )
    format: Literal["json", "raw", "image"] = Field(
        description="Payload format: 'json' ({\"id\": ..., \"data\": [...]}), 'raw' tensor bytes, or 'image' "
        "(PNG or JPEG)."
    )
    input: str | None = Field(
        default=None, description="The model input this sensor feeds; default: the only input."
    )
    dtype: str | None = Field(
        default=None,
        description="raw: element type of the payload (such as 'int8' or 'float32'), unless the message has a "
        "'dtype' user property; default: the input's type. Real values are quantized.",
    )
    shape: list[int] | None = Field(
        default=None,
        description="raw: shape of the payload, unless the message has a 'shape' user property; "
        "default: the input's shape. Bytes are row-major, so any shape with the input's element count fits.",
    )
    image_scale: float = Field(
        default=1.0 / 255.0,
        gt=0,
        description="image: real value = pixel * image_scale + image_offset, then quantized.",
    )
    image_offset: float = Field(default=0.0, description="image: see image_scale.")

    @property
    def match_filter(self) -> str:
        """The filter messages are matched against: ``topic`` without a ``$share/GROUP/`` prefix."""
        return _shared(self.topic)[1]

    @field_validator("topic")
    @classmethod
    def _filter(cls, value: str) -> str:
        if not value:
            raise ValueError("a topic filter cannot be empty")
        _check_topic_text(value)
        group, plain = _shared(value)
        if group is not None and (not group or any(c in group for c in "+#/")):
            raise ValueError(f"{value!r}: a shared subscription is $share/GROUP/FILTER, GROUP without + # /")
        if not plain:
            raise ValueError(f"{value!r}: the filter after $share/GROUP/ is empty")
        levels = plain.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError(f"{value!r}: '#' must be a whole, last level")
            if "+" in level and level != "+":
                raise ValueError(f"{value!r}: '+' must be a whole level")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            dtype = np.dtype(value)
        except TypeError as err:
            raise ValueError(f"unknown dtype {value!r}") from err
        if dtype.kind not in "iuf":
            raise ValueError(f"dtype {value!r} is not an integer or floating type")
        return dtype.name

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(d <= 0 for d in value)):
            raise ValueError("a shape is a non-empty list of positive sizes")
        return value


class TopicsConfig(_Strict):
    results: str = Field(
        default="edge/{device_id}/results", description="Where each message's result is published."
    )
    errors: str = Field(
        default="edge/{device_id}/errors", description="Where a message that cannot be processed is reported."
    )
    availability: str = Field(
        default="edge/{device_id}/availability",
        description="Retained 'online' while connected, 'offline' (last will) after.",
    )
    stats: str = Field(default="edge/{device_id}/stats", description="Periodic counters and latency.")

    @field_validator("results", "errors", "availability", "stats")
    @classmethod
    def _plain(cls, value: str) -> str:
        if not value or "+" in value or "#" in value:
            raise ValueError(f"{value!r}: a topic to publish on cannot be empty or hold wildcards")
        try:
            longest = value.format(device_id="x" * 64)  # the longest device id
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{value!r}: the only placeholder is {{device_id}}") from err
        _check_topic_text(longest)
        return value


class ResultsConfig(_Strict):
    top_k: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Classes per result, most likely first, for one-output models; models with several "
        "outputs publish them all. include_raw adds the raw outputs.",
    )
    include_raw: bool = Field(default=False, description="Also publish every output tensor, dequantized.")


class QueueConfig(_Strict):
    max_messages: int = Field(
        default=16,
        ge=1,
        le=65535,
        description="Messages held in memory at once; also the MQTT Receive Maximum asked of the broker. When "
        "full, the daemon stops reading from the broker until one is done; nothing is dropped.",
    )
    answered_ids: int = Field(
        default=4096,
        ge=16,
        le=1_000_000,
        description="Recently answered message ids remembered to avoid answering twice.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="At shutdown, how long to wait for queued results to be confirmed.",
    )
    inflight: int = Field(
        default=2,
        ge=1,
        le=MAX_WINDOW,
        description="Messages in flight to the edge server at once during a burst: the next message's head runs "
        "while earlier ones are on the wire or on the server. Results are still published in arrival order. "
        "Capped by what the server allows one device; 1 answers one message at a time. A [cascade] answers one "
        "at a time.",
    )


class LimitsConfig(_Strict):
    max_payload_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=64,
        le=1024**3,
        description="Largest sensor message taken; a larger one gets an error document.",
    )
    max_json_depth: int = Field(
        default=16, ge=1, le=256, description="Deepest nesting of arrays and objects in a JSON payload."
    )
    max_shape_rank: int = Field(
        default=8, ge=1, le=32, description="Most dimensions a raw payload's shape property may give."
    )
    max_id_chars: int = Field(
        default=256,
        ge=8,
        le=65536,
        description="Longest message id taken; a longer one gets an error document.",
    )
    stall_s: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="With messages waiting and none answered for this long, the daemon stops pinging the "
        "systemd watchdog (so systemd restarts it) and says so.",
    )


class MetricsConfig(_Strict):
    enabled: bool = Field(default=False, description="Serve Prometheus metrics over HTTP.")
    host: str = Field(default="127.0.0.1", description="Address the metrics endpoint listens on.")
    port: int = Field(
        default=9101, ge=0, le=65535, description="Port of http://HOST:PORT/metrics; 0 picks one."
    )


class StatsConfig(_Strict):
    interval_s: float = Field(
        default=30.0, ge=0, le=86400, description="Seconds between stats messages; 0 turns them off."
    )


class HomeAssistantConfig(_Strict):
    enabled: bool = Field(
        default=False, description="Publish Home Assistant MQTT discovery configs (retained)."
    )
    discovery_prefix: str = Field(
        default="homeassistant", min_length=1, description="Home Assistant's discovery prefix."
    )
    name: str | None = Field(
        default=None, description="Device name shown in Home Assistant; default: the device id."
    )


class DeviceProfile(_Strict):
    device_id: str = Field(
        description="This device's id: names its topics and its MQTT client id. Letters, digits, '_' and '-'."
    )
    description: str | None = Field(default=None, description="Free text about the profile.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="The device's interpreter.")
    model: ModelConfig = Field(description="The model to run.")
    split: SplitConfig = Field(description="Where to cut the model: type = 'fixed' (with k) or 'auto'.")
    cascade: CascadeConfig | None = Field(
        default=None, description="Answer on the device what a small model is sure of; escalate the rest."
    )
    edge: EdgeConfig = Field(default_factory=EdgeConfig, description="The edge servers that run the tail.")
    mqtt: MqttConfig = Field(description="The broker.")
    sensors: list[SensorConfig] = Field(min_length=1, description="Topics to read sensor messages from.")
    topics: TopicsConfig = Field(default_factory=TopicsConfig, description="Topics the daemon publishes on.")
    results: ResultsConfig = Field(default_factory=ResultsConfig, description="What a result carries.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Bounds on work held in memory.")
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="Bounds on what one sensor message may be."
    )
    stats: StatsConfig = Field(default_factory=StatsConfig, description="Periodic stats messages.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="A Prometheus endpoint.")
    home_assistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="Home Assistant MQTT discovery."
    )

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not _DEVICE_ID.fullmatch(value):
            raise ValueError(
                f"{value!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _no_feedback(self) -> DeviceProfile:
        # A sensor filter that matched our own output would feed results back in as input, forever.
        for i, sensor in enumerate(self.sensors):
            for topic in self.output_topics():
                if topic_matches_sub(sensor.match_filter, topic):
                    raise ValueError(
                        f"sensors[{i}].topic: {sensor.topic!r} matches the daemon's own topic {topic!r}"
                    )
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-{self.device_id}"

    def topic(self, kind: Literal["results", "errors", "availability", "stats"]) -> str:
        return str(getattr(self.topics, kind)).format(device_id=self.device_id)

    def output_topics(self) -> list[str]:
        return [self.topic(k) for k in ("results", "errors", "availability", "stats")]
