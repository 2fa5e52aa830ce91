"""The paho-mqtt client a profile describes: MQTT v5, persistent session, manual acks, last will.

Only this module and the daemon's service loop know paho; the rest of ``edge.daemon`` is pure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..credentials import beside, read_first_line, read_secret
from ..errors import ConfigError
from .config import DeviceProfile
from .messages import ha_status_topic

__all__ = ["build_client", "connect_properties", "subscriptions", "user_properties"]

logger = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"


def build_client(profile: DeviceProfile, *, source: str = "<profile>") -> paho.Client:
    """A configured, unconnected client; connect with :func:`connect_properties` and ``clean_start=False``."""
    mqtt = profile.mqtt
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=profile.client_id,
        protocol=paho.MQTTv5,
        manual_ack=True,
    )
    paho_logger = logging.getLogger("edge.daemon.paho")
    if not any(isinstance(f, _NotConnectedFilter) for f in paho_logger.filters):
        paho_logger.addFilter(_NotConnectedFilter())
    client.enable_logger(paho_logger)
    # A failing callback must not end the network loop; ours catch everything, this is the backstop.
    client.suppress_exceptions = True
    # paho annotates the delays as int but computes with them as numbers; sub-second delays work.
    client.reconnect_delay_set(min_delay=mqtt.reconnect_min_s, max_delay=mqtt.reconnect_max_s)  # type: ignore[arg-type]
    # Outgoing QoS 1 messages are kept, however many, until the broker confirms them.
    client.max_queued_messages_set(0)
    client.will_set(profile.topic("availability"), OFFLINE, qos=1, retain=True)
    if mqtt.username is not None:
        client.username_pw_set(mqtt.username, _password(profile, source))
    if mqtt.tls is not None:
        tls = mqtt.tls
        files = {key: beside(getattr(tls, key), Path(source)) for key in ("ca_file", "cert_file", "key_file")}
        for key, path in files.items():
            if path is not None:
                try:
                    read_secret(path)
                except ConfigError as err:
                    raise ConfigError(f"{source}: mqtt.tls.{key}: {err}") from err
        ca, cert, keyfile = files["ca_file"], files["cert_file"], files["key_file"]
        try:
            client.tls_set(
                ca_certs=str(ca) if ca else None,
                certfile=str(cert) if cert else None,
                keyfile=str(keyfile) if keyfile else None,
            )
        except (OSError, ValueError) as err:
            named = ", ".join(str(p) for p in (ca, cert, keyfile) if p is not None)
            raise ConfigError(
                f"{source}: mqtt.tls: cannot load {named or 'the system CA bundle'}: {err}"
            ) from err
        client.tls_insecure_set(not tls.verify_hostname)
    return client


class _NotConnectedFilter(logging.Filter):
    """paho logs "Client is not connected" at every reconnect attempt, naming no broker; the
    daemon says itself which broker it cannot reach, and how often it retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


def connect_properties(profile: DeviceProfile) -> Properties:
    """CONNECT properties: how long the broker keeps the session, and how many unacked messages we take."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = profile.mqtt.session_expiry_s
    properties.ReceiveMaximum = profile.queue.max_messages
    return properties


def subscriptions(profile: DeviceProfile) -> list[tuple[str, SubscribeOptions]]:
    """Every sensor topic at QoS 1; retained messages only on a new subscription, not on each reconnect."""
    options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    topics = [(s.topic, options) for s in profile.sensors]
    if profile.home_assistant.enabled:
        # QoS 0: a status is a cue, not work; it takes no acknowledgement and no place in the queue.
        topics.append((ha_status_topic(profile), SubscribeOptions(qos=0)))
    return topics


def user_properties(message: paho.MQTTMessage) -> Mapping[str, str]:
    """A message's MQTT v5 user properties (the last value wins for a repeated key)."""
    pairs = getattr(message.properties, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


def _password(profile: DeviceProfile, source: str) -> str | None:
    mqtt = profile.mqtt
    if mqtt.password is not None:
        return mqtt.password.get_secret_value()
    path = beside(mqtt.password_file, Path(source))
    if path is None:
        return None
    try:
        password = read_first_line(path)
    except ConfigError as err:
        raise ConfigError(f"{source}: mqtt.password_file: {err}") from err
    if not password:
        raise ConfigError(f"{source}: mqtt.password_file: {path} is empty")
    return password
