"""What the daemon publishes: results (top-k or raw outputs), errors, stats, Home Assistant discovery."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge import models
from edge.cooperative import InferenceResult, StageTimings
from edge.daemon import messages
from edge.daemon.profiles import parse
from edge.errors import ConfigError
from edge.graph import ModelGraph

GRAPH = ModelGraph.from_file(models.model_path("digits_resnet"))
OUTPUT = GRAPH.outputs[0]
PROFILE = """
device_id = "box"
[model]
path = "digits_resnet"
labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
[split]
type = "fixed"
k = 8
[mqtt]
host = "h"
[[sensors]]
topic = "s/+"
format = "json"
"""


def inference(values: list[int], *, fallback: bool = False) -> InferenceResult:
    return InferenceResult(
        outputs={OUTPUT.name: np.array([values], dtype=np.int8)},
        split_point=8,
        fallback=fallback,
        timings=StageTimings(head_ms=1.0, e2e_ms=3.0),
        bytes_sent=2048,
        fallback_reason="UNAVAILABLE: gone" if fallback else None,
    )


def test_dequantize_uses_scale_and_zero_point() -> None:
    scale, zero_point = OUTPUT.quantization or (0.0, 0)
    got = messages.dequantize(np.array([zero_point, zero_point + 10], dtype=np.int8), OUTPUT)
    np.testing.assert_allclose(got, [0.0, 10 * scale])


def test_a_result_carries_top_k_labels_cut_fallback_and_timings() -> None:
    profile = parse(PROFILE)
    values = [-43, 50, 0, 100, -43, -43, -43, 99, -43, -43]
    body = messages.result(
        message_id="m1",
        topic="s/a",
        profile=profile,
        model_name="digits_resnet",
        outputs=GRAPH.outputs,
        inference=inference(values, fallback=True),
    )
    assert [e["label"] for e in body["top_k"]] == ["three", "seven", "one"]
    assert [e["index"] for e in body["top_k"]] == [3, 7, 1]
    scale, zero_point = OUTPUT.quantization or (0.0, 0)
    logits = (np.array(values, dtype=np.float64) - zero_point) * scale
    assert body["top_k"][0]["logit"] == logits[3]
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert [e["probability"] for e in body["top_k"]] == [softmax[3], softmax[7], softmax[1]]
    assert body["id"] == "m1" and body["topic"] == "s/a" and body["cut"] == 8
    assert body["fallback"] is True and body["fallback_reason"].startswith("UNAVAILABLE")
    assert body["timings"]["e2e_ms"] == 3.0 and "outputs" not in body
    json.dumps(body)  # serialisable as it is


def test_a_softmax_output_gives_its_own_probabilities() -> None:
    probabilities = np.array([0.05, 0.7, 0.25, 0.0])
    entries = messages.top_k(probabilities, 2, ["a", "b", "c", "d"])
    assert entries == [
        {"index": 1, "label": "b", "probability": 0.7},
        {"index": 2, "label": "c", "probability": 0.25},
    ]


def test_top_k_zero_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"results\.top_k"):
        parse(PROFILE + "[results]\ntop_k = 0\n")


def test_include_raw_publishes_the_raw_outputs() -> None:
    profile = parse(PROFILE + "[results]\ninclude_raw = true\n")
    body = messages.result(
        message_id="m",
        topic="s/a",
        profile=profile,
        model_name="d",
        outputs=GRAPH.outputs,
        inference=inference(list(range(10))),
    )
    assert len(body["top_k"]) == 3
    out = body["outputs"][OUTPUT.name]
    assert out["shape"] == [1, 10]
    np.testing.assert_allclose(out["values"], messages.dequantize(np.arange(10, dtype=np.int8), OUTPUT))


def test_discovery_configs_point_at_the_daemons_topics() -> None:
    profile = parse(PROFILE + '[home_assistant]\nenabled = true\ndiscovery_prefix = "ha"\n')
    (label_topic, label), (latency_topic, latency) = messages.discovery(profile, "digits_resnet")
    assert label_topic == "ha/sensor/box/label/config" and latency_topic == "ha/sensor/box/latency/config"
    assert label["state_topic"] == "edge/box/results" and latency["state_topic"] == "edge/box/stats"
    assert (
        label["availability_topic"] == "edge/box/availability" and label["unique_id"] != latency["unique_id"]
    )


def test_error_and_stats_documents() -> None:
    err = messages.error(message_id=None, topic="s/a", device_id="box", message="not valid JSON")
    assert err["id"] is None and err["error"] == "not valid JSON" and err["topic"] == "s/a"
    stats = messages.stats(
        device_id="box",
        processed=3,
        errors=1,
        fallbacks=2,
        duplicates=0,
        queue_depth=4,
        uptime_s=12.34,
        p50_ms=1.5,
    )
    assert stats["processed"] == 3 and stats["queue_depth"] == 4 and stats["uptime_s"] == 12.3
