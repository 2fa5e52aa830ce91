"""The device daemon: sensor messages in over MQTT, cooperative inference, results out; nothing lost.

Threads: paho's network thread receives messages and PUBACKs; the main thread runs the
model on one message at a time, publishes results, stats and systemd watchdog pings.

Delivery: a sensor message is acknowledged (manual ack) only when the broker has confirmed
the result that answers it (QoS 1 PUBACK); see :mod:`.ledger`. The session is persistent,
so anything unacknowledged when the daemon, the broker or the link dies is delivered again.

Backpressure: the broker is asked for at most ``queue.max_messages`` unacknowledged
messages (MQTT v5 Receive Maximum). Brokers do not all enforce it exactly (mosquitto 2.0
lets a few more through), so the in-memory queue has the same bound and, when it is full,
the network thread waits for room: the broker then sees TCP flow control. Nothing is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..cascade import CascadeResult, Router, escalated
from ..cooperative import CooperativeRunner, InferenceResult
from ..errors import EdgeError
from ..pipeline import Finished, Pipeline
from ..stats import summary
from ..systemd import notify, watchdog_interval
from . import messages, payloads
from .config import SensorConfig
from .device import ResolvedProfile
from .ledger import AckLedger, Source
from .metrics import DaemonMetrics
from .mqtt import OFFLINE, ONLINE, connect_properties, subscriptions, user_properties

__all__ = ["Daemon"]

logger = logging.getLogger(__name__)

_TICK_S = 0.2

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class _Inbound:
    """A received sensor message, waiting in the queue."""

    source: Source
    sensor: SensorConfig | None
    topic: str
    payload: bytes
    dup: bool
    properties: Mapping[str, str]


@dataclass(slots=True)
class _Entry:
    """A message on its way to an answer: decoded (``feeds``), or with a ``problem`` already."""

    item: _Inbound
    given_id: str | None
    message_id: str | None
    problem: str | None = None
    feeds: Mapping[str, np.ndarray] | None = None
    routed: CascadeResult | None = None
    failure: Exception | None = None


class Daemon:
    """Runs one profile until :meth:`stop`; :meth:`run` returns the exit status."""

    def __init__(
        self,
        resolved: ResolvedProfile,
        device: CooperativeRunner,
        client: paho.Client,
        *,
        cascade: Router | None = None,
    ) -> None:
        self.plan = resolved
        self.profile = resolved.profile
        self.device = device
        self.cascade = cascade
        self.answered_by: Counter[str] = Counter()
        self.client = client
        self.ledger = AckLedger(self.profile.queue.answered_ids)
        self._queue: queue.Queue[_Inbound] = queue.Queue(maxsize=self.profile.queue.max_messages)
        self._stop = threading.Event()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._connect_failures = 0
        self._last_connect_warning = 0.0
        self._last_progress = time.monotonic()
        self._stalled = False
        self.behind = 0
        self._last_behind_warning = -60.0
        self.metrics = DaemonMetrics() if self.profile.metrics.enabled else None
        # Message id -> digest of the payload it answered; as many as the ledger remembers.
        self._digests: OrderedDict[str, bytes] = OrderedDict()
        self._ready = threading.Event()
        self._started = time.monotonic()
        self._latencies: deque[float] = deque(maxlen=1000)
        # Messages started and not yet published, in arrival order (one at a time with a cascade, or a
        # window of 1), and the ids of those in flight.
        self._pipeline: Pipeline[_Entry] = Pipeline(
            device, 1 if cascade is not None else self._window_wanted()
        )
        if self._pipeline.window > 1:
            logger.info("up to %d messages in flight to the edge server at once", self._pipeline.window)
        self._inflight_ids: set[str] = set()
        # Counters are written by the main thread only, except `duplicates` (both; an estimate).
        self.processed = 0
        self.errors = 0
        self.fallbacks = 0
        self.duplicates = 0
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish

    def _window_wanted(self) -> int:
        return max(1, self.profile.queue.inflight) if self.device.client is not None else 1

    # -- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to drain and exit; safe to call from a signal handler."""
        self._stop.set()

    def run(self) -> int:
        mqtt = self.profile.mqtt
        logger.info("connecting to %s as %s", mqtt.address, self.profile.client_id)
        self.client.connect_async(
            mqtt.host,
            mqtt.port,
            keepalive=mqtt.keepalive_s,
            clean_start=False,
            properties=connect_properties(self.profile),
        )
        if self.metrics is not None:
            settings = self.profile.metrics
            self.metrics.serve(settings.host, settings.port)
        self.client.loop_start()
        try:
            self._loop()
        finally:
            self._shutdown()
            if self.metrics is not None:
                self.metrics.close()
        return 0

    def _loop(self) -> None:
        watchdog = watchdog_interval()
        stats_every = self.profile.stats.interval_s
        next_ping = next_stats = time.monotonic()
        while not self._stop.is_set():
            try:
                item = self._queue.get_nowait() if self._pipeline else self._queue.get(timeout=_TICK_S)
            except queue.Empty:
                if self._pipeline:  # nothing new to start: publish what is in flight
                    self._finish(self._pipeline.pop())
            else:
                self._process(item)
            now = time.monotonic()
            if watchdog and now >= next_ping and self._healthy():
                notify("WATCHDOG=1")
                next_ping = now + watchdog
            if stats_every and now >= next_stats:
                next_stats = now + stats_every
                if self._connected.is_set():
                    self._publish(self.profile.topic("stats"), self.stats())

    def _shutdown(self) -> None:
        notify("STOPPING=1")
        logger.info(
            "stopping: finishing %d queued and %d in-flight message(s), up to %gs",
            self._queue.qsize(),
            len(self._pipeline),
            self.profile.queue.drain_timeout_s,
        )
        self._stopping.set()
        drained = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._process(item)
            drained += 1
        drained += len(self._pipeline)
        self._drain()
        deadline = time.monotonic() + self.profile.queue.drain_timeout_s
        while self.ledger.pending() and time.monotonic() < deadline and self._connected.is_set():
            time.sleep(0.02)
        if self.ledger.pending():
            logger.warning(
                "%d result(s) unconfirmed at exit; the broker will deliver their messages again",
                self.ledger.pending(),
            )
        if self._connected.is_set():
            info = self._publish(self.profile.topic("availability"), OFFLINE, retain=True)
            try:
                if info is not None:
                    info.wait_for_publish(timeout=min(5.0, max(self.profile.queue.drain_timeout_s, 0.5)))
            except (RuntimeError, ValueError) as err:
                logger.warning("could not publish offline: %s", err)
        self.client.disconnect()
        self.client.loop_stop()
        if self.cascade is not None:
            self.cascade.close()  # and the device with it
        else:
            self.device.close()
        logger.info(
            "stopped: %d processed (%d drained at shutdown), %d errors", self.processed, drained, self.errors
        )

    def _healthy(self) -> bool:
        """Started (READY sent), the network loop alive, and progress while messages wait; a stuck
        main loop stops pinging by itself.

        A broker that is down after READY does not make the daemon unhealthy: it reconnects by
        itself, and a restart would not help.
        """
        thread = getattr(self.client, "_thread", None)  # paho exposes no public accessor
        if not (self._ready.is_set() and thread is not None and thread.is_alive()):
            return False
        waiting = self._queue.qsize() > 0
        stalled = waiting and time.monotonic() - self._last_progress > self.profile.limits.stall_s
        if stalled and not self._stalled:
            logger.error(
                "no message answered for %.0fs while %d wait: no more watchdog pings",
                self.profile.limits.stall_s,
                self._queue.qsize(),
            )
        self._stalled = stalled
        return not stalled

    # -- the work ---------------------------------------------------------------------

    def _process(self, item: _Inbound) -> None:
        """Prepare ``item`` and send it on its way; publish what is done at the front, in arrival order."""
        entry = self._guarded(item, self._prepare, item)
        if entry is None:
            return
        if self.cascade is not None:  # the cascade decides message by message, one at a time
            if entry.feeds is not None:
                try:
                    entry.routed = self.cascade.infer(entry.feeds, request_id=entry.message_id or "")
                except Exception as err:
                    entry.failure = err
            self._guarded(item, self._complete, entry)
            self._last_progress = time.monotonic()
            return
        done: list[Finished[_Entry]] | None = None
        if entry.feeds is not None:
            try:
                done = self._pipeline.put(entry.feeds, entry, request_id=entry.message_id or "")
            except Exception as err:
                entry.failure = err
            else:
                self._inflight_ids.add(entry.message_id or "")
        for finished in done if done is not None else self._pipeline.hold(entry):
            self._finish(finished)

    def _internal_error(self, item: _Inbound, err: Exception) -> None:
        logger.error("unexpected failure on a message from %s", item.topic, exc_info=err)
        try:
            self._refuse(item, None, f"internal error: {type(err).__name__}: {str(err)[:200]}")
        except Exception:
            logger.exception("cannot publish the error document; the message stays unacknowledged")
            self.ledger.release(item.source)

    def _prepare(self, item: _Inbound) -> _Entry | None:
        """Decode ``item`` and check it against the ids answered already; None when it needs no answer
        of its own (a redelivery of one answered, acknowledged here)."""
        problem: str | None = None
        decoded: payloads.Decoded | None = None
        given_id: str | None = item.properties.get("id") or None
        if item.sensor is None:
            problem = "no sensor of this profile subscribes to this topic (a subscription left from an older profile?)"
        else:
            try:
                decoded = payloads.decode(
                    item.payload, item.sensor, self.plan.graph.inputs, item.properties, self.profile.limits
                )
                given_id = decoded.message_id
            except payloads.PayloadError as err:
                problem, given_id = str(err), err.message_id
        message_id = given_id or payloads.fallback_id(item.topic, item.source.mid)
        if message_id in self._inflight_ids:
            self._drain()  # a second copy of a message in flight: answer the first, then judge this one
        digest = hashlib.blake2b(item.payload, digest_size=16).digest()
        # A fallback id is only unique while the message is in flight: trust it for redeliveries only.
        if (given_id is not None or item.dup) and self.ledger.answered(message_id):
            if self._digests.get(message_id, digest) != digest:
                problem = f"id {message_id[:64]!r} was answered already, for another payload"
                return _Entry(item, given_id, None, problem=problem)
            self.duplicates += 1
            if self.metrics is not None:
                self.metrics.messages.labels("duplicate").inc()
            logger.info("message %s was answered already; acknowledging the redelivery", message_id)
            self._ack(self.ledger.duplicate(message_id, item.source))
            return None
        self._digests[message_id] = digest
        self._digests.move_to_end(message_id)
        while len(self._digests) > self.profile.queue.answered_ids:
            self._digests.popitem(last=False)
        feeds = decoded.feeds if decoded is not None else None
        return _Entry(item, given_id, message_id, problem=problem, feeds=feeds)

    def _complete(self, entry: _Entry) -> None:
        """Publish ``entry``'s result, or its error document."""
        item, message_id, problem = entry.item, entry.message_id, entry.problem
        body: dict[str, Any] | None = None
        if isinstance(entry.failure, EdgeError):
            problem = str(entry.failure)
        elif entry.failure is not None:  # a backend's own errors become an error result too
            logger.error("inference failed on message %s", message_id, exc_info=entry.failure)
            problem = f"inference failed: {entry.failure}"
        elif entry.routed is not None:
            routed = entry.routed
            result = routed.inference
            body = messages.result(
                message_id=message_id or "",
                topic=item.topic,
                profile=self.profile,
                model_name=self.plan.model_name,
                outputs=routed.output_info,
                inference=result,
                cascade=routed if self.cascade is not None else None,
            )
            self.answered_by[routed.answered_by] += 1
            self.processed += 1
            self.fallbacks += int(result.fallback)
            if self.metrics is not None:
                self.metrics.result(result, answered_by=routed.answered_by)
                self.metrics.queue_depth.set(self._queue.qsize())
                link = getattr(self.device.policy, "estimator", None)
                if link is not None:
                    estimate = link.estimate()
                    self.metrics.link(estimate.rtt_ms, estimate.mbit_per_s)
            self._latencies.append(result.timings.e2e_ms)
        if body is None:
            self._refuse(item, entry.given_id, str(problem), message_id=message_id)
            return
        self._publish(self.profile.topic("results"), body, sources=[item.source], message_id=message_id)

    def _finish(self, finished: Finished[_Entry]) -> None:
        """Publish the outcome of a message that left the pipeline."""
        entry = finished.tag
        self._inflight_ids.discard(entry.message_id or "")
        if finished.error is not None:
            entry.failure = finished.error
        elif finished.result is not None:
            entry.routed = self._routed(finished.result)
        self._guarded(entry.item, self._complete, entry)
        self._last_progress = time.monotonic()

    def _drain(self) -> None:
        for finished in self._pipeline.drain():
            self._finish(finished)

    def _guarded(self, item: _Inbound, step: Callable[[T], R], arg: T) -> R | None:
        """``step(arg)``; an unexpected failure answers ``item`` with an error document instead."""
        try:
            return step(arg)
        except Exception as err:  # one message must never take the daemon down, nor stay unanswered
            self._internal_error(item, err)
            return None

    def _routed(self, result: InferenceResult) -> CascadeResult:
        """A result of the model's cooperative path, as the answer of a profile without a cascade."""
        return escalated(result, self.plan.graph.outputs, 1.0, 0.0)

    def _refuse(
        self, item: _Inbound, given_id: str | None, problem: str, *, message_id: str | None = None
    ) -> None:
        """Answer ``item`` with an error document; it is acknowledged once the broker has that."""
        self.errors += 1
        if self.metrics is not None:
            self.metrics.messages.labels("error").inc()
        logger.warning(
            "message %s on %s: %s", (message_id or given_id or "?")[:80], item.topic, problem[:300]
        )
        body = messages.error(
            message_id=given_id, topic=item.topic, device_id=self.profile.device_id, message=problem
        )
        self._publish(self.profile.topic("errors"), body, sources=[item.source], message_id=message_id)

    def stats(self) -> dict[str, Any]:
        return messages.stats(
            device_id=self.profile.device_id,
            processed=self.processed,
            errors=self.errors,
            fallbacks=self.fallbacks,
            duplicates=self.duplicates,
            queue_depth=self._queue.qsize(),
            uptime_s=time.monotonic() - self._started,
            behind=self.behind,
            p50_ms=summary(list(self._latencies))["p50"],
            answered_by=dict(self.answered_by),
        )

    # -- MQTT -------------------------------------------------------------------------

    def _publish(
        self,
        topic: str,
        body: dict[str, Any] | bytes,
        *,
        sources: Iterable[Source] = (),
        message_id: str | None = None,
        retain: bool = False,
    ) -> paho.MQTTMessageInfo | None:
        """Every publish is QoS 1 and goes through here, so that every PUBACK is accounted for.

        None when paho refused the message outright (it will not be sent).
        """
        payload = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        sources = list(sources)
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            logger.error("cannot publish on %s: %s", topic, paho.error_string(info.rc))
            for source in sources:
                self.ledger.release(source)
            return None
        self._ack(self.ledger.published(info.mid, sources, message_id))
        return info

    def _ack(self, sources: Iterable[Source]) -> None:
        for source in sources:
            self.client.ack(source.mid, 1)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason.is_failure:
                logger.error("broker %s refused the connection: %s", self.profile.mqtt.address, reason)
                return
            if not flags.session_present:
                self.ledger.new_session()
            logger.info(
                "connected to %s (session %s)",
                self.profile.mqtt.address,
                "resumed" if flags.session_present else "new",
            )
            self._connected.set()
            self._connect_failures = 0
            client.subscribe(subscriptions(self.profile))
            self._publish(self.profile.topic("availability"), ONLINE, retain=True)
            if self.profile.home_assistant.enabled:
                self._publish_discovery()
        except Exception:  # paho's thread must survive
            logger.exception("on_connect failed")

    def _publish_discovery(self) -> None:
        for topic, config in messages.discovery(self.profile, self.plan.model_name):
            self._publish(topic, config, retain=True)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            logger.error("broker refused subscription(s): %s", ", ".join(refused))
        if not self._ready.is_set():
            self._ready.set()
            topics = ", ".join(s.topic for s in self.profile.sensors)
            logger.info("ready: %s subscribed to %s", self.profile.device_id, topics)
            notify("READY=1")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # Said at the first failure of an outage, then at most once a minute.
        now = time.monotonic()
        self._connect_failures += 1
        if self._connect_failures == 1 or now - self._last_connect_warning >= 60.0:
            self._last_connect_warning = now
            mqtt = self.profile.mqtt
            logger.warning(
                "cannot reach the MQTT broker %s (%d attempt%s so far); retrying every %g-%gs",
                mqtt.address,
                self._connect_failures,
                "" if self._connect_failures == 1 else "s",
                mqtt.reconnect_min_s,
                mqtt.reconnect_max_s,
            )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            logger.warning("disconnected from %s (%s); reconnecting", self.profile.mqtt.address, reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            if self.profile.home_assistant.enabled and message.topic == messages.ha_status_topic(
                self.profile
            ):
                if bytes(message.payload).strip() == b"online":
                    logger.info("Home Assistant is online: publishing discovery again")
                    self._publish_discovery()
                if message.qos > 0:  # a sensor filter that also matches it raised its QoS: done with it
                    client.ack(message.mid, message.qos)
                return
            if self._stopping.is_set():
                return  # left unacknowledged: the broker delivers it to the next run
            source = self.ledger.receive(message.mid)
            if source is None:
                self.duplicates += 1
                return  # a redelivery of a message already in hand
            item = _Inbound(
                source=source,
                sensor=self._sensor(message.topic),
                topic=message.topic,
                payload=bytes(message.payload),
                dup=bool(message.dup),
                properties=user_properties(message),
            )
            if self._queue.full():
                self._falling_behind()
            while True:
                try:
                    self._queue.put(item, timeout=_TICK_S)
                    return
                except queue.Full:
                    if self._stopping.is_set():
                        self.ledger.release(source)
                        return
        except Exception:  # paho's thread must survive
            logger.exception("cannot take a message from %s", getattr(message, "topic", "?"))

    def _falling_behind(self) -> None:
        # paho's thread only; said at most once a minute.
        self.behind += 1
        if self.metrics is not None:
            self.metrics.behind.inc()
        now = time.monotonic()
        if now - self._last_behind_warning >= 60.0:
            self._last_behind_warning = now
            logger.warning(
                "falling behind: messages arrive faster than they are answered (%d so far found the queue of %d "
                "full); the broker holds the rest for this session, up to its max_queued_messages",
                self.behind,
                self.profile.queue.max_messages,
            )

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        try:
            if reason.is_failure:
                # Acknowledging anyway: a broker that refuses our results (an ACL) would
                # otherwise redeliver the same messages forever.
                logger.error("broker refused publish %d: %s", mid, reason)
            self._ack(self.ledger.confirmed(mid))
        except Exception:  # paho's thread must survive
            logger.exception("on_publish failed")

    def _sensor(self, topic: str) -> SensorConfig | None:
        for sensor in self.profile.sensors:
            if paho.topic_matches_sub(sensor.match_filter, topic):
                return sensor
        return None
