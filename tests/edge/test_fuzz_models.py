"""Fuzzing model files: 300 mutations of a shipped model (bytes flipped in the flatbuffer, truncated,
names made binary), each parsed, its cuts computed and one cut split, without loading it on a backend:
each either works or is one EdgeError in one line; no other exception, no hang."""

from __future__ import annotations

import random

import pytest

from edge import models
from edge.errors import EdgeError
from edge.graph import ModelGraph
from edge.partition import split_model

ORIGINAL = models.model_path("digits_tiny").read_bytes()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:
        del buf[rng.randrange(8, len(buf)) :]
    elif kind == 2:  # a region of the tables (the first kilobytes hold offsets and names)
        start = rng.randrange(0, min(len(buf), 4096))
        for i in range(start, min(len(buf), start + rng.randint(1, 64))):
            buf[i] = rng.randrange(256)
    else:
        i = rng.randrange(len(buf))
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(buf)


@pytest.mark.parametrize("batch", range(3))
def test_mutated_models_parse_or_fail_in_one_line(batch: int) -> None:
    rng = random.Random(500 + batch)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(100):
        data = _mutate(ORIGINAL, rng)
        try:
            graph = ModelGraph(data, source="fuzz.tflite")
            cuts = graph.cuts()
            if graph.num_operators > 1:
                split_model(graph, graph.num_operators // 2)
            assert len(cuts) == graph.num_operators + 1
        except EdgeError as err:
            assert "\n" not in str(err).strip(), str(err)[:300]
            outcomes["refused"] += 1
        else:
            outcomes["parsed"] += 1
    assert sum(outcomes.values()) == 100 and outcomes["refused"] > 0, outcomes
