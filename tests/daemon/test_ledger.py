"""The ack ledger: a sensor message is acknowledged only after the result answering it is confirmed."""

from __future__ import annotations

import threading

from edge.daemon.ledger import AckLedger, Source


def test_a_message_is_acknowledged_at_its_results_puback() -> None:
    ledger = AckLedger()
    ledger.new_session()
    source = ledger.receive(10)
    assert source == Source(1, 10)
    assert ledger.published(501, [source], "m1") == []
    assert ledger.pending() == 1
    assert ledger.confirmed(501) == [source]
    assert ledger.pending() == 0
    assert ledger.confirmed(501) == []  # a second PUBACK acknowledges nothing twice


def test_a_puback_that_beats_publish_back_still_acknowledges() -> None:
    ledger = AckLedger()
    ledger.new_session()
    source = ledger.receive(3)
    assert source is not None
    assert ledger.confirmed(77) == []  # arrives before the worker learns its mid
    assert ledger.published(77, [source], "m") == [source]
    assert ledger.pending() == 0


def test_other_publishes_absorb_their_pubacks() -> None:
    ledger = AckLedger()
    ledger.new_session()
    ledger.published(5, [])  # availability, stats
    assert ledger.confirmed(5) == []
    source = ledger.receive(1)
    assert source is not None
    # mid 5 is reused for a result: its PUBACK must not be taken as already seen
    assert ledger.published(5, [source], "r") == []
    assert ledger.confirmed(5) == [source]


def test_a_redelivery_of_a_held_message_is_dropped() -> None:
    ledger = AckLedger()
    ledger.new_session()
    first = ledger.receive(8)
    assert first is not None
    assert ledger.receive(8) is None
    ledger.published(1, [first], "m")
    assert ledger.confirmed(1) == [first]
    assert ledger.receive(8) == Source(1, 8)  # acknowledged, so mid 8 may name a new message


def test_a_duplicate_id_rides_on_the_pending_answer_or_is_acked_at_once() -> None:
    ledger = AckLedger()
    ledger.new_session()
    first, again, later = ledger.receive(1), ledger.receive(2), ledger.receive(3)
    assert first and again and later
    ledger.published(100, [first], "same")
    assert ledger.answered("same") and not ledger.answered("other")
    assert ledger.duplicate("same", again) == []  # not before the answer is confirmed
    assert ledger.confirmed(100) == [first, again]
    assert ledger.duplicate("same", later) == [later]


def test_a_lost_session_voids_held_ids() -> None:
    ledger = AckLedger()
    ledger.new_session()
    old = ledger.receive(4)
    assert old is not None
    ledger.published(9, [old], "m")
    ledger.new_session()  # the broker forgot us: mid 4 now means nothing
    fresh = ledger.receive(4)
    assert fresh == Source(2, 4)
    assert ledger.confirmed(9) == []  # the old message is answered but not acknowledged
    ledger.published(10, [fresh], "n")
    assert ledger.confirmed(10) == [fresh]


def test_released_messages_are_never_acknowledged() -> None:
    ledger = AckLedger()
    ledger.new_session()
    source = ledger.receive(6)
    assert source is not None
    ledger.release(source)
    ledger.published(1, [source], "m")
    assert ledger.confirmed(1) == []


def test_answered_ids_are_bounded() -> None:
    ledger = AckLedger(remember=16)
    ledger.new_session()
    for n in range(40):
        ledger.published(n + 1, [], f"id-{n}")
    assert not ledger.answered("id-0")
    assert ledger.answered("id-39") and ledger.answered("id-24")


def test_concurrent_pubacks_and_publishes_ack_everything_once() -> None:
    ledger = AckLedger()
    ledger.new_session()
    sources = [ledger.receive(mid) for mid in range(1, 2001)]
    acked: list[Source] = []
    lock = threading.Lock()

    def network() -> None:
        for mid in range(1, 2001):
            got = ledger.confirmed(10_000 + mid)
            with lock:
                acked.extend(got)

    thread = threading.Thread(target=network)
    thread.start()
    for mid, source in enumerate(sources, start=1):
        assert source is not None
        got = ledger.published(10_000 + mid, [source], f"m{mid}")
        with lock:
            acked.extend(got)
    thread.join(10)
    assert sorted(s.mid for s in acked) == list(range(1, 2001))
