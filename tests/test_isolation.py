"""A 5xx that follows a record, not the server: isolation.py through the uploader.

The uploader runs its thread on a real buffer (the harness of test_uploader.py) and sends over
real HTTP to the sandbox, whose `fail_value` fault answers 500 to any insert holding one value:
a server-side bug set off by one odd record. The age of a suspect record is driven with a fake
clock handed to the uploader; everything else (backoff, the sandbox, SQLite) runs for real.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.buffer import Batch, BatchRow
from edge_agent.clock import Clock, SystemClock
from edge_agent.config import Secret
from edge_agent.isolation import REASON, Isolation, Rules, Step
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.status import Health, Status, render_page, render_status_text
from edge_agent.uploader import Uploader
from tests.fakes import FakeClock
from tests.helpers import DATASOURCE, TOKEN, wait_until
from tests.test_status import NOW, changed, make_snapshot
from tests.test_uploader import Harness, endpoint, open_harness, record

BOOM = "boom"  # the value the sandbox's server bug chokes on
BUG = "Internal server error (sandbox fault fail_value=boom)"


def start(h: Harness, sandbox: Sandbox, clock: Clock, **overrides: Any) -> Uploader:
    settings = {"url": sandbox.url, "backoff_base_s": 0.05, "backoff_max_s": 0.5, **overrides}
    up = Uploader(endpoint(**settings), Secret(TOKEN), h.buffer, rng=random.Random(3), clock=clock)
    up.start()
    h.uploaders.append(up)
    return up


def stored_seqs(sandbox: Sandbox) -> list[int]:
    return [int(r["seq"]) for r in sandbox.records(DATASOURCE)]


def failures(sandbox: Sandbox) -> int:
    return int(sandbox.stats()["by_status"].get("500", 0))


def test_a_record_the_server_always_fails_on_is_set_aside_while_its_data_source_flows(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.set_faults(Faults(fail_value=BOOM))
    clock = FakeClock(time.time())
    with open_harness(tmp_path) as h:
        up = start(h, sandbox, clock)  # poison_attempts = 5, poison_min_age_s = 600
        h.put([record(i, kind=BOOM if i == 57 else "ok") for i in range(200)])
        # Three 5xx in a row (backoff 0.05 to 0.2 s), then the bisection: seconds, not ever.
        wait_until(lambda: len(stored_seqs(sandbox)) == 199, timeout=30, what="the 199 good")
        assert sorted(stored_seqs(sandbox)) == [i for i in range(200) if i != 57]
        wait_until(lambda: h.pending() == 1, what="the last good batch settled")
        assert h.dead_letters() == []
        wait_until(lambda: up.stats.suspects == 1, what="one record sent alone")
        (line,) = h.logs.matching("the server fails on a record of data source", logging.WARNING)
        assert f"(500: {BUG})" in line and "the rest of the data source goes on" in line

        # Later readings of the same data source go out while the suspect waits its turn.
        h.put([record(i) for i in range(200, 300)])
        wait_until(lambda: len(stored_seqs(sandbox)) == 299, what="later readings delivered")

        # Each round: another request succeeds, then the suspect is due and fails alone.
        # The uploader has one thread: once the good reading is in, the try before is settled.
        seq = 300
        while True:
            h.put([record(seq)])

            def stored(n: int = seq) -> bool:
                return len(stored_seqs(sandbox)) == n

            wait_until(stored, what=f"reading {seq}")
            seq += 1
            if h.dead_letters():
                break
            assert seq < 320, "the suspect was never set aside"
            before = failures(sandbox)
            clock.advance(100.0)

            def tried(n: int = before) -> bool:
                return failures(sandbox) > n

            wait_until(tried, what="its next try")
        # Strikes 2 to 7 came at 100 to 600 s: 5 strikes by 400 s, the age of 600 s at the 7th.
        assert seq == 307
        (dead,) = h.dead_letters()
        assert dead["record"]["seq"] == 57 and dead["record"]["kind"] == BOOM
        assert dead["status"] == 500
        assert dead["reason"] == f"{BUG} ({REASON})"
        assert dead["attempts"] >= 5
        wait_until(lambda: h.pending() == 0, what="the last good reading settled")
        assert up.stats.records_set_aside == 1 and up.stats.records_dead_lettered == 1
        wait_until(lambda: up.stats.suspects == 0, what="the suspect forgotten")
        (line,) = h.logs.matching("it is set aside in dead letters", logging.WARNING)
        assert f"data source {DATASOURCE} alone 7 times over 600 s" in line

        # Fixed server: requeued, it is delivered like any reading.
        sandbox.set_faults(Faults())
        session = h.session()
        try:
            assert session.requeue_dead_letters().moved == 1
        finally:
            session.close()
        wait_until(lambda: 57 in stored_seqs(sandbox), what="the requeued record delivered")
        wait_until(lambda: h.pending() == 0, what="the requeued record settled")
        assert sorted(stored_seqs(sandbox)) == list(range(seq))
        assert h.dead_letters() == []


@pytest.mark.parametrize("count", [1, 60])
def test_a_server_down_for_everyone_sets_nothing_aside_and_backs_off(
    sandbox: Sandbox, tmp_path: Path, count: int
) -> None:
    sandbox.set_faults(Faults(status=500))
    clock = FakeClock(time.time())
    with open_harness(tmp_path) as h:
        # The strictest rules: a second failure alone after another success would do.
        up = start(h, sandbox, clock, poison_attempts=2, poison_min_age_s=0.0)
        h.put([record(i) for i in range(count)])
        for _ in range(6):
            before = sandbox.stats()["requests"]
            clock.advance(1000.0)  # any record sent alone would be due again, and old enough

            def tried(n: int = before) -> bool:
                return bool(sandbox.stats()["requests"] > n)

            wait_until(tried, what="another try")
        if count > 1:
            wait_until(lambda: up.stats.split_requests >= 4, what="two halvings tried")
        requests = sandbox.stats()["requests"]  # first: the uploader counts after the answer
        stats = up.stats
        assert h.dead_letters() == []
        assert h.pending() == count
        assert stats.records_set_aside == 0
        assert stats.suspects == 0  # nothing is sent alone: the server answered nobody
        if count > 1:
            # Every third failure of the batch costs its two halves; both fail: back off.
            assert stats.split_requests <= 2 * (stats.retries // 3 + 1)
            assert requests <= stats.retries + stats.split_requests + 1
        sandbox.set_faults(Faults())
        clock.advance(1000.0)
        wait_until(lambda: h.pending() == 0, what="delivery once the server is back")
        assert sorted(stored_seqs(sandbox)) == list(range(count))
        assert h.dead_letters() == []


def test_a_server_failing_half_the_requests_at_random_sets_nothing_aside(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.set_faults(Faults(fail_rate=0.5, seed=11))  # 503 to half the inserts
    with open_harness(tmp_path) as h:
        # A small age with the real clock: suspects are tried alone some 20 times over it.
        up = start(h, sandbox, SystemClock(), poison_min_age_s=2.0, max_batch_records=50)
        seq = 0
        deadline = time.monotonic() + 60
        started = time.monotonic()
        while time.monotonic() - started < 6 or up.stats.split_requests == 0:
            assert time.monotonic() < deadline, "no batch failed three times in a row"
            h.put([record(i) for i in range(seq, seq + 20)])
            seq += 20
            time.sleep(0.1)
        sandbox.set_faults(Faults())
        wait_until(lambda: h.pending() == 0, timeout=30, what="everything delivered")
        assert h.dead_letters() == []
        assert up.stats.records_set_aside == 0
        assert sorted(set(stored_seqs(sandbox))) == list(range(seq))


# --------------------------------------------------------------------------- the rules alone


def batch(first: int, count: int) -> Batch:
    rows = tuple(BatchRow(i, "{}") for i in range(first, first + count))
    return Batch(DATASOURCE, 1, rows, 0.0)


RULES = Rules(attempts=3, min_age_s=60.0, retry_base_s=1.0, retry_max_s=300.0)


def test_network_failures_never_count_toward_a_split() -> None:
    iso = Isolation(RULES, FakeClock(0.0))
    whole = batch(1, 8)
    for _ in range(10):
        assert iso.answered(whole, None, delivered=False) is None
    assert iso.answered(whole, 500, delivered=False) is Step.BACK_OFF
    assert iso.answered(whole, 503, delivered=False) is Step.BACK_OFF
    assert iso.answered(whole, None, delivered=False) is None  # neither counts nor resets
    assert iso.answered(whole, 502, delivered=False) is Step.SPLIT


def test_one_half_succeeding_keeps_the_bisection_going_down_to_a_suspect() -> None:
    clock = FakeClock(0.0)
    iso = Isolation(RULES, clock)
    whole = batch(1, 4)
    for _ in range(2):
        iso.answered(whole, 500, delivered=False)
    assert iso.answered(whole, 500, delivered=False) is Step.SPLIT
    left, right = whole.split()
    assert iso.answered(left, 500, delivered=False) is Step.HOLD  # its sibling decides
    assert iso.answered(right, 200, delivered=True) is None
    assert iso.resume() == [left]  # the server is up: sent again, split if it fails again
    assert iso.answered(left, 500, delivered=False) is Step.SPLIT
    one, two = left.split()
    assert iso.answered(one, 200, delivered=True) is None
    assert iso.answered(two, 500, delivered=False) is Step.HOLD
    iso.end()
    assert iso.suspects == 1 and iso.watch(2) == (1, 1, 0.0)
    # Left out of its data source's batches, sent alone when its turn comes.
    assert iso.skipped() == {2} and iso.due() == []
    clock.advance(1.0)
    assert iso.due() == [2]


def test_a_suspect_is_set_aside_only_after_strikes_with_successes_between_and_its_age() -> None:
    clock = FakeClock(0.0)
    iso = Isolation(RULES, clock)
    alone = batch(9, 1)
    for _ in range(3):  # the lone reading of a slow source, in an outage: backoff as ever
        assert iso.answered(alone, 500, delivered=False) is Step.BACK_OFF
    assert iso.suspects == 0
    iso.answered(batch(10, 5), 200, delivered=True)  # but another data source goes through
    assert iso.answered(alone, 500, delivered=False) is Step.HOLD  # strike 1
    for _ in range(5):  # nothing else succeeds: the server may be down, no strike
        clock.advance(100.0)
        assert iso.answered(alone, 500, delivered=False) is Step.HOLD
    assert iso.watch(9) == (6, 1, 500.0)  # tried alone 6 times, 1 strike
    iso.answered(batch(20, 5), 200, delivered=True)
    assert iso.answered(alone, 500, delivered=False) is Step.HOLD  # strike 2
    iso.answered(batch(30, 5), 200, delivered=True)
    assert iso.answered(alone, 500, delivered=False) is Step.SET_ASIDE  # strike 3, 500 s old
    iso.forget([9])
    assert iso.suspects == 0


def test_both_halves_failing_means_down_and_needs_a_fresh_streak() -> None:
    iso = Isolation(RULES, FakeClock(0.0))
    whole = batch(1, 6)
    for _ in range(2):
        iso.answered(whole, 500, delivered=False)
    assert iso.answered(whole, 500, delivered=False) is Step.SPLIT
    left, right = whole.split()
    assert iso.answered(left, 500, delivered=False) is Step.HOLD
    assert iso.answered(right, 500, delivered=False) is Step.BACK_OFF
    iso.end()
    assert iso.resume() == [] and iso.suspects == 0
    assert iso.answered(whole, 500, delivered=False) is Step.BACK_OFF
    assert iso.answered(whole, 500, delivered=False) is Step.BACK_OFF
    assert iso.answered(whole, 500, delivered=False) is Step.SPLIT


def test_the_status_page_and_text_show_records_the_server_fails_on_alone() -> None:
    snap = make_snapshot()
    doc = Status(snap, Health(True, (), ()))
    assert "the server fails on records alone" not in render_status_text(doc, NOW)
    doc = Status(changed(snap, uploader={"suspects": 1, "records_set_aside": 2}), doc.health)
    shown = "1 record sent alone, 2 records set aside to dead letters"
    assert f"<dt>failing on one record</dt><dd>{shown}</dd>" in render_page(doc, [], NOW)
    assert f"  the server fails on records alone: {shown}" in render_status_text(doc, NOW)
