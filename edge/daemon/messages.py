"""The JSON documents the daemon publishes: results, errors, stats and Home Assistant discovery.

Pure functions from values to dicts; the daemon serialises and publishes them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import __version__
from ..cascade import CascadeResult
from ..cooperative import InferenceResult
from ..graph import TensorInfo
from ..outputs import dequantize, is_distribution, probabilities
from .config import DeviceProfile

__all__ = ["dequantize", "discovery", "error", "ha_status_topic", "result", "stats", "top_k"]


def top_k(values: np.ndarray, k: int, labels: Sequence[str] | None) -> list[dict[str, Any]]:
    """The ``k`` most likely classes, each with its ``probability``.

    When ``values`` already form a distribution (a softmax output), they are the probabilities.
    Otherwise they are logits: each entry also carries its ``logit``, and the probability is
    their softmax.
    """
    order = np.argsort(-values, kind="stable")[:k]
    distribution = is_distribution(values)
    chances = probabilities(values)
    entries = []
    for i in order:
        entry: dict[str, Any] = {"index": int(i), "label": labels[i] if labels else str(int(i))}
        if not distribution:
            entry["logit"] = float(values[i])
        entry["probability"] = float(chances[i])
        entries.append(entry)
    return entries


def result(
    *,
    message_id: str,
    topic: str,
    profile: DeviceProfile,
    model_name: str,
    outputs: Sequence[TensorInfo],
    inference: InferenceResult,
    cascade: CascadeResult | None = None,
) -> dict[str, Any]:
    """One message's answer: top-k (one-output models) or every output, plus how it was computed.

    With a cascade, ``outputs`` are the answering model's, and the document says which stage
    answered (``answered_by``), the small model's ``confidence`` and the ``threshold`` in force;
    ``cut`` is null when the small model answered."""
    body: dict[str, Any] = {
        "id": message_id,
        "topic": topic,
        "device_id": profile.device_id,
        "model": model_name,
    }
    if len(outputs) == 1:
        tensor = outputs[0]
        body["top_k"] = top_k(
            dequantize(inference.outputs[tensor.name], tensor).reshape(-1),
            profile.results.top_k,
            profile.model.labels,
        )
    if len(outputs) != 1 or profile.results.include_raw:
        body["outputs"] = {
            t.name: {
                "shape": list(inference.outputs[t.name].shape),
                "values": dequantize(inference.outputs[t.name], t).reshape(-1).tolist(),
            }
            for t in outputs
        }
    if cascade is not None:
        body.update(
            answered_by=cascade.answered_by,
            confidence=round(cascade.confidence, 6),
            threshold=cascade.threshold,
        )
    body.update(
        cut=None if cascade is not None and not cascade.escalated else inference.split_point,
        fallback=inference.fallback,
        fallback_reason=inference.fallback_reason,
        bytes_sent=inference.bytes_sent,
        **({"lossy": True} if inference.lossy else {}),
        timings=inference.timings.as_dict(),
        ts=round(time.time(), 3),
    )
    return body


def error(*, message_id: str | None, topic: str, device_id: str, message: str) -> dict[str, Any]:
    """A message that could not be processed."""
    return {
        "id": message_id,
        "topic": topic,
        "device_id": device_id,
        "error": message,
        "ts": round(time.time(), 3),
    }


def stats(
    *,
    device_id: str,
    processed: int,
    errors: int,
    fallbacks: int,
    duplicates: int,
    queue_depth: int,
    uptime_s: float,
    p50_ms: float,
    behind: int = 0,
    answered_by: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Counters since start, the queue's depth now, and the median end-to-end latency of recent results.

    ``answered_by`` counts results by the stage that gave them (with a cascade: the local share
    is ``device-small`` over all, the escalation rate the rest).

    ``behind`` counts the messages that arrived to a full queue: the broker held the rest of the
    burst for this session meanwhile, up to its own limit (mosquitto's max_queued_messages)."""
    return {
        "device_id": device_id,
        "processed": processed,
        "errors": errors,
        "fallbacks": fallbacks,
        "duplicates": duplicates,
        "queue_depth": queue_depth,
        "behind": behind,
        "answered_by": dict(answered_by or {}),
        "uptime_s": round(uptime_s, 1),
        "p50_ms": p50_ms,
        "ts": round(time.time(), 3),
    }


def ha_status_topic(profile: DeviceProfile) -> str:
    """Where Home Assistant says ``online`` after it starts: the cue to publish discovery again."""
    return f"{profile.home_assistant.discovery_prefix}/status"


def discovery(profile: DeviceProfile, model_name: str) -> list[tuple[str, dict[str, Any]]]:
    """Home Assistant MQTT discovery: (topic, config) for the last label and the median latency sensors."""
    ha = profile.home_assistant
    device_id = profile.device_id
    device = {
        "identifiers": [f"edge-{device_id}"],
        "name": ha.name or device_id,
        "model": model_name,
        "manufacturer": "edge-coop",
        "sw_version": __version__,
    }
    availability = profile.topic("availability")
    common = {
        "availability_topic": availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "origin": {"name": "edge-coop", "sw_version": __version__},
    }
    label = {
        **common,
        "name": "Last label",
        "unique_id": f"edge_{device_id}_label",
        "state_topic": profile.topic("results"),
        "value_template": "{{ value_json.top_k[0].label if value_json.top_k else '' }}",
        "json_attributes_topic": profile.topic("results"),
        "icon": "mdi:label",
    }
    latency = {
        **common,
        "name": "Median latency",
        "unique_id": f"edge_{device_id}_p50_ms",
        "state_topic": profile.topic("stats"),
        "value_template": "{{ value_json.p50_ms }}",
        "unit_of_measurement": "ms",
        "state_class": "measurement",
        "json_attributes_topic": profile.topic("stats"),
        "icon": "mdi:timer-outline",
    }
    prefix = f"{ha.discovery_prefix}/sensor/{device_id}"
    return [(f"{prefix}/label/config", label), (f"{prefix}/latency/config", latency)]
