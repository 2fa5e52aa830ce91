"""The link estimator, fed synthetic (bytes, transfer time) samples and probes."""

from __future__ import annotations

import numpy as np
import pytest

from edge.link import LinkEstimator, fit_line


class Clock:
    """A settable clock for the estimator's sample ages."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def transfer(nbytes: int, mbit: float, rtt_ms: float) -> float:
    return rtt_ms + nbytes / (mbit * 1000.0 / 8.0)


@pytest.mark.parametrize(("mbit", "rtt"), [(1.0, 40.0), (10.0, 5.0), (100.0, 5.0), (100.0, 0.3)])
def test_fit_recovers_bandwidth_and_rtt_from_varied_sizes(mbit, rtt):
    rng = np.random.default_rng(0)
    est = LinkEstimator(clock=Clock())
    for nbytes in rng.choice([1_000, 4_700, 25_000, 150_000], size=24):
        est.observe_transfer(int(nbytes), transfer(int(nbytes), mbit, rtt) * rng.uniform(0.97, 1.03))
    e = est.estimate()
    assert e.method == "fit"
    assert e.mbit_per_s == pytest.approx(mbit, rel=0.1)
    assert e.rtt_ms == pytest.approx(rtt, rel=0.1, abs=0.2)


def test_fit_ignores_outliers():
    est = LinkEstimator(clock=Clock())
    for i in range(20):
        nbytes = 10_000 if i % 2 else 60_000
        est.observe_transfer(nbytes, transfer(nbytes, 10.0, 5.0))
    for _ in range(4):  # a few requests stuck behind a retransmission
        est.observe_transfer(10_000, 500.0)
    e = est.estimate()
    assert e.mbit_per_s == pytest.approx(10.0, rel=0.05)
    assert e.rtt_ms == pytest.approx(5.0, rel=0.05)


def test_one_size_uses_probe_rtt():
    est = LinkEstimator(clock=Clock())
    for _ in range(3):
        est.observe_rtt(20.0)
    for _ in range(10):
        est.observe_transfer(50_000, transfer(50_000, 10.0, 20.0))
    e = est.estimate()
    assert e.method == "probe"
    assert e.rtt_ms == pytest.approx(20.0)
    assert e.mbit_per_s == pytest.approx(10.0)


def test_one_size_without_probes_blames_the_link():
    est = LinkEstimator(clock=Clock())
    for _ in range(5):
        est.observe_transfer(50_000, 60.0)
    e = est.estimate()
    # rtt and bandwidth cannot be told apart: all of it is counted as bandwidth, a conservative guess.
    assert e.rtt_ms == 0.0
    assert e.transfer_ms(50_000) == pytest.approx(60.0)


def test_no_samples_no_bandwidth():
    est = LinkEstimator(clock=Clock())
    est.observe_rtt(5.0)
    e = est.estimate()
    assert not e.usable and e.method == "none"
    assert e.rtt_ms == 5.0


def test_payloads_too_small_to_time_give_a_lower_bound():
    est = LinkEstimator(clock=Clock())
    est.observe_rtt(5.0)
    for nbytes in (100, 8_000, 100, 8_000):
        est.observe_transfer(nbytes, 5.01)
    e = est.estimate()
    assert e.method == "bound" and e.usable
    # The largest payload took no measurable time; the estimate says at most the noise floor.
    assert e.transfer_ms(8_000) <= 0.5
    assert e.rtt_ms == 5.0


def test_one_delayed_payload_among_untimeable_ones_is_not_the_link():
    """A fast link, payloads of one size (as a cap on bytes sent gives), one of four held up by a
    scheduling hiccup: that one alone clears the timing floor, and must not set the bandwidth
    (it once gave 0.99 Mbit/s on loopback, and the planner kept the device alone)."""
    est = LinkEstimator(clock=Clock())
    for _ in range(4):
        est.observe_rtt(0.54)
    for ms in (0.55, 0.56, 8.8, 0.55):
        est.observe_transfer(1_024, ms)
    e = est.estimate()
    assert e.method == "bound", e
    assert e.transfer_ms(1_024) <= 0.5


def test_stale_samples_expire_and_bandwidth_is_remembered():
    clock = Clock()
    est = LinkEstimator(max_age_s=30.0, clock=clock)
    for nbytes in (1_000, 40_000) * 5:
        est.observe_transfer(nbytes, transfer(nbytes, 10.0, 40.0))
    assert est.estimate().rtt_ms == pytest.approx(40.0)
    clock.now = 100.0
    est.observe_rtt(8.0)  # the round trip got shorter while the device was idle
    e = est.estimate()
    assert e.method == "remembered"
    assert e.rtt_ms == pytest.approx(8.0)
    assert e.mbit_per_s == pytest.approx(10.0)


def test_estimate_follows_a_changed_link():
    est = LinkEstimator(window=16, clock=Clock())
    est.observe_rtt(5.0)
    for nbytes in (1_000, 40_000) * 8:
        est.observe_transfer(nbytes, transfer(nbytes, 100.0, 5.0))
    for nbytes in (1_000, 40_000) * 8:  # the window now holds only the slow link
        est.observe_transfer(nbytes, transfer(nbytes, 1.0, 5.0))
    assert est.estimate().mbit_per_s == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize(
    ("xs", "ys", "expected"),
    [
        ([0, 1, 2, 3], [1, 3, 5, 7], (2.0, 1.0)),
        ([5, 5, 5], [1, 2, 3], None),
        ([0, 10, 20, 30, 40], [0, 10, 20, 1000, 40], (1.0, 0.0)),
    ],
)
def test_fit_line(xs, ys, expected):
    fit = fit_line(xs, ys)
    if expected is None:
        assert fit is None
    else:
        assert fit == pytest.approx(expected)


@pytest.mark.parametrize(("mbit", "burst"), [(1.0, 3028), (10.0, 3028), (100.0, 12_500)])
def test_token_bucket_burst_becomes_a_negative_offset(mbit, burst):
    """A shaper lets ``burst`` bytes through at line rate: small payloads cost little beyond the rtt."""
    rate = mbit * 125.0  # bytes per ms
    est = LinkEstimator(clock=Clock())
    for _ in range(3):
        est.observe_rtt(7.0)
    for nbytes in (2_280, 10_408, 33_928, 151_528) * 2:
        est.observe_transfer(nbytes, 7.0 + max(0, nbytes - burst) / rate)
    e = est.estimate()
    assert e.method == "fit" and e.rtt_ms == pytest.approx(7.0)
    assert e.offset_ms < 0
    for nbytes in (1_000, 5_704, 60_000, 150_000):
        truth = max(0, nbytes - burst) / rate
        # Within 10% or 1 ms; counting the burst as round trip instead would be off by burst / rate.
        assert abs(e.transfer_ms(nbytes) - truth) <= max(1.0, 0.1 * truth)


def test_a_line_fitted_to_small_payloads_is_not_extrapolated_past_the_large_ones_seen():
    """A shaper's burst lets small payloads through at line rate: fitted on those alone, the line
    claims a fast link, and a 150 KB cut would look cheap (the planner once chose it at 1 Mbit/s
    and took 1.25 s a request). Past the largest recent payload, the large payloads' rate applies."""
    clock = Clock()
    est = LinkEstimator(max_age_s=30.0, clock=clock)
    est.observe_rtt(6.0)
    for nbytes in (32_000, 100_000, 150_000):
        est.observe_transfer(nbytes, transfer(nbytes, 1.0, 6.0))  # the probes at connect: 1 Mbit/s
    clock.now = 100.0  # those have aged out of the fit; only small requests since, through the burst
    est.observe_rtt(6.0)
    for i in range(12):
        nbytes = (1_500, 2_400, 3_000)[i % 3]
        est.observe_transfer(nbytes, 6.0 + nbytes / 1_000_000)  # nearly flat: the bucket's burst
    e = est.estimate()
    assert e.fit_max_bytes == 3_000
    assert e.beyond_bytes_per_ms == pytest.approx(125.0, rel=0.01)  # 1 Mbit/s
    assert e.transfer_ms(150_000) > 1_100  # at 1 Mbit/s, not the burst's rate
    assert e.transfer_ms(2_400) < 1  # within what was seen, the fit stands


def test_large_payloads_as_fast_as_the_fit_change_nothing():
    clock = Clock()
    est = LinkEstimator(max_age_s=30.0, clock=clock)
    for nbytes in (32_000, 64_000):
        est.observe_transfer(nbytes, transfer(nbytes, 100.0, 1.0))
    clock.now = 100.0
    for nbytes in (1_000, 4_000, 8_000) * 3:
        est.observe_transfer(nbytes, transfer(nbytes, 10.0, 1.0))
    e = est.estimate()
    assert e.beyond_bytes_per_ms is None
    assert e.transfer_ms(100_000) == pytest.approx(100_000 / 1_250, rel=0.05)
