"""Repeated log lines are bounded: the first of a kind at once, then one per interval with the count
held back; kinds apart; the memory of kinds bounded. With a real logger and a clock the test moves."""

from __future__ import annotations

import logging

import pytest

from edge.ratelog import MAX_KINDS, RateLimitedLog


def test_a_flood_logs_once_a_minute_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("flood"), interval_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="flood"):
        written = [log.log(logging.INFO, "refused", "refused %s", "x") for _ in range(1000)]
        now[0] = 61.0
        log.log(logging.INFO, "refused", "refused %s", "x")
        log.log(logging.INFO, "other", "another kind")
    assert sum(written) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused x",
        "refused x (999 more like it in the last 60 s, not logged)",
        "another kind",
    ]


def test_the_kinds_remembered_are_bounded() -> None:
    log = RateLimitedLog(logging.getLogger("kinds"), interval_s=60.0, clock=lambda: 0.0)
    for i in range(MAX_KINDS * 3):
        log.log(logging.DEBUG, f"k{i}", "line")
    assert len(log._kinds) == MAX_KINDS
