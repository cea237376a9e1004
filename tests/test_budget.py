"""The daily byte budget (budget.py) and gzip = "auto": the pacing rule with a fake clock, and
the uploader against the sandbox over real HTTP, with the day turned by that clock.

The sandbox counts what it received (`wire_bytes`: request lines, headers and bodies), so the
budget is checked on the server's side. The uploader also counts the answers, so its own figure
is never below the sandbox's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_agent.budget import (
    DAY_S,
    META_KEY,
    RESERVE_SHARE,
    BudgetView,
    DailyBudget,
    day_number,
    day_text,
    size_text,
)
from edge_agent.buffer import Buffer, BufferSession
from edge_agent.config import BufferConfig, EndpointConfig, Secret, parse_size
from edge_agent.records import Reading
from edge_agent.sandbox import DEFAULT_DATASOURCE, DEFAULT_TOKEN, Faults, Sandbox
from edge_agent.simulator import PtySensor
from edge_agent.uplink_time import UplinkTime
from edge_agent.uploader import Uploader
from tests.fakes import FakeClock
from tests.helpers import DATASOURCE, TOKEN, AgentProcess, serial_source, wait_until, write_config
from tests.test_config import ENV, ISSUE_EXAMPLE, error_of, write
from tests.test_uploader import LogLines

# 2027-03-01T00:00:00Z: the start of a UTC day.
DAY0 = day_number("2027-03-01") * DAY_S
LIMIT = 20_000


# --------------------------------------------------------------------------- the rule


def test_high_and_live_may_spend_all_the_backlog_leaves_a_reserve_that_shrinks() -> None:
    clock = FakeClock(DAY0)  # 00:00: the whole reserve is kept
    budget = DailyBudget(10_000, clock)
    reserve = int(RESERVE_SHARE * 10_000)
    assert budget.room("high") == budget.room("live") == 10_000
    assert budget.room("backlog") == budget.room("low") == 10_000 - reserve
    assert budget.allows(10_000 - reserve, "backlog") == 0.0
    # One byte into the reserve: the backlog waits until the reserve has shrunk by a byte.
    wait = budget.allows(10_000 - reserve + 1, "backlog")
    assert 0 < wait <= DAY_S / (RESERVE_SHARE * 10_000) + 1
    assert budget.allows(10_000 - reserve + 1, "live") == 0.0
    clock.advance(DAY_S / 2)  # 12:00: half the reserve is left
    assert budget.room("backlog") == 10_000 - reserve // 2
    clock.advance(DAY_S / 2 - 1)  # 23:59:59: almost nothing is kept back any more
    assert budget.room("backlog") == 10_000 - 1


def test_a_spent_budget_waits_for_the_next_utc_day_and_the_day_resets_the_count() -> None:
    clock = FakeClock(DAY0 + 22 * 3600)
    budget = DailyBudget(10_000, clock)
    budget.spend(9_500)
    assert budget.allows(400, "high") == 0.0
    assert budget.allows(600, "high") == pytest.approx(2 * 3600)  # to 00:00 UTC
    assert budget.room("high") == 500
    clock.advance(2 * 3600)
    assert budget.allows(600, "high") == 0.0
    view = budget.view()
    assert (view.used, view.remaining, view.day) == (0, 10_000, "2027-03-02")


def test_a_wall_clock_set_back_carries_the_count_to_its_day_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(DAY0 + 3600)
    budget = DailyBudget(10_000, clock)
    budget.spend(9_000)
    caplog.set_level(logging.WARNING, "edge_agent.budget")
    clock.jump(-30 * DAY_S)  # a gateway that lost its time: the day must not start again
    view = budget.view()
    assert (view.day, view.used) == ("2027-01-30", 9_000)  # the clock's day, with the count
    assert view.resets_at == DAY0 - 29 * DAY_S
    assert budget.allows(2_000, "high") == pytest.approx(23 * 3600)  # to the clock's 00:00
    stored = budget.ahead(500)  # the buffer holds the later day: write on the clock's
    assert stored is not None and json.loads(stored)["day"] == "2027-01-30"
    assert json.loads(stored)["bytes"] >= 9_500
    clock.jump(-DAY_S)  # back again: still carried, but said only once
    assert budget.view().used == 9_000
    (said,) = [r.getMessage() for r in caplog.records]
    assert "clock's UTC day (2027-01-30) is earlier than the day counted (2027-03-01)" in said
    assert "9 kB used is carried over" in said
    clock.advance(DAY_S)  # the clock's day moves forward: a new day from 0
    assert (budget.view().day, budget.view().used) == ("2027-01-30", 0)


def test_budget_view_is_a_frozen_snapshot_of_the_figures() -> None:
    clock = FakeClock(DAY0 + 6 * 3600)
    budget = DailyBudget(10_000, clock)
    budget.spend(2_500)
    view = budget.view()
    assert view == BudgetView(
        limit=10_000,
        used=2_500,
        remaining=7_500,
        day="2027-03-01",
        resets_at=float(DAY0 + DAY_S),
        waiting=False,
        spent=False,
    )
    assert view.resets_in(clock.wall()) == 18 * 3600
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.used = 0  # type: ignore[misc]  # a frozen field, on purpose
    budget.spend(1)
    assert view.used == 2_500  # a snapshot: later spending does not change it
    unlimited = DailyBudget(None, clock).view()
    assert (unlimited.limit, unlimited.remaining) == (None, None)


def test_the_stored_count_is_never_below_what_was_sent() -> None:
    clock = FakeClock(DAY0 + 3600)
    budget = DailyBudget(100_000, clock)
    first = budget.ahead(1_500)  # nothing stored covers this request: write ahead
    assert first is not None and json.loads(first)["bytes"] >= 1_500
    assert budget.ahead(500) is None  # covered by the headroom written ahead
    budget.spend(2_000)
    settled = json.loads(budget.settled())
    assert settled == {"day": "2027-03-01", "bytes": 2_000 + 1_000}  # plus 1 % headroom
    assert json.loads(budget.exact())["bytes"] == 2_000
    again = DailyBudget(100_000, clock)
    again.load(budget.settled())
    assert again.view().used == 3_000  # after a crash: at most the headroom too much


def test_loading_a_stored_count_carries_a_later_day_to_the_clocks_and_ignores_garbage() -> None:
    clock = FakeClock(DAY0 + 3600)
    budget = DailyBudget(10_000, clock)
    budget.load(json.dumps({"day": "2027-02-28", "bytes": 9_999}))  # yesterday's
    assert budget.view().used == 0
    budget.load(json.dumps({"day": "2027-03-01", "bytes": 4_000}))
    assert budget.view().used == 4_000
    budget.load("not json")
    budget.load(json.dumps({"day": "someday"}))
    assert budget.view().used == 4_000
    budget.load(json.dumps({"day": "2027-03-05", "bytes": 6_000}))  # the clock is behind
    assert (budget.view().day, budget.view().used) == ("2027-03-01", 6_000)  # carried over
    stored = budget.ahead(100)  # what the buffer holds is another day's: written anew
    assert stored is not None and json.loads(stored)["day"] == "2027-03-01"
    clock.advance(DAY_S)
    assert (budget.view().day, budget.view().used) == ("2027-03-02", 0)


def test_days_and_sizes_read_as_people_write_them() -> None:
    assert day_text(day_number("2027-03-01")) == "2027-03-01"
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("200KiB") == 204_800
    assert parse_size("20kB") == 20_000
    assert parse_size(4096) == 4096
    assert size_text(500_000_000) == "500 MB"
    assert size_text(20_000) == "20 kB"
    for bad in ("lots", "5 parsecs", "0MB", "-1MB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# --------------------------------------------------------------------------- config


def with_endpoint(line: str) -> str:
    return ISSUE_EXAMPLE.replace("timeout_s = 10.0", f"timeout_s = 10.0\n{line}")


def test_max_bytes_per_day_takes_a_size_or_bytes_and_defaults_to_no_limit(
    tmp_path: Path,
) -> None:
    from edge_agent.config import load_config

    plain = load_config(write(tmp_path, ISSUE_EXAMPLE), environ=ENV).endpoint
    assert (plain.max_bytes_per_day, plain.bytes_per_day, plain.gzip) == (None, None, "auto")
    for line, expected in (('max_bytes_per_day = "500MB"', 500_000_000), ("", None)):
        ep = load_config(write(tmp_path, with_endpoint(line)), environ=ENV).endpoint
        assert ep.bytes_per_day == expected
    ep = load_config(
        write(tmp_path, with_endpoint("max_bytes_per_day = 8_000_000")), environ=ENV
    ).endpoint
    assert ep.bytes_per_day == 8_000_000


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('max_bytes_per_day = "lots"', "[endpoint] max_bytes_per_day: 'lots' is not a size"),
        ('max_bytes_per_day = "1MB"', "less than 4 × max_batch_bytes"),
        ("max_bytes_per_day = true", "expected a whole number or a string in quotes"),
        ('gzip = "yes"', "[endpoint] gzip: expected true or false or one of 'auto', got 'yes'"),
    ],
)
def test_bad_budget_and_gzip_values_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    assert message in error_of(tmp_path, with_endpoint(line))


def test_gzip_takes_true_false_and_auto(tmp_path: Path) -> None:
    from edge_agent.config import load_config

    for value, expected in (("true", True), ("false", False), ('"auto"', "auto")):
        ep = load_config(write(tmp_path, with_endpoint(f"gzip = {value}")), environ=ENV).endpoint
        assert ep.gzip == expected


# --------------------------------------------------------------------------- against the sandbox


@dataclass
class Rig:
    """A real buffer, the sandbox over real HTTP, and uploaders on a fake clock."""

    path: Path
    sandbox: Sandbox
    clock: FakeClock
    buffer: Buffer
    logs: LogLines
    uploaders: list[Uploader] = field(default_factory=list)

    def put(self, first: int, n: int) -> None:
        readings = [Reading(DEFAULT_DATASOURCE, record(i)) for i in range(first, first + n)]
        assert self.buffer.put(readings)
        assert self.buffer.flush()

    def start(self, **overrides: Any) -> Uploader:
        ep = EndpointConfig(
            url=self.sandbox.url,
            token_file="unused",
            flush_interval_s=0.0,
            timeout_s=5.0,
            backoff_base_s=0.01,
            backoff_max_s=0.05,
            max_batch_records=10,
            max_batch_bytes=2048,
        )
        up = Uploader(
            dataclasses.replace(ep, **overrides),
            Secret(DEFAULT_TOKEN),
            self.buffer,
            clock=self.clock,
        )
        up.start()
        self.uploaders.append(up)
        return up

    def stop(self, up: Uploader) -> None:
        up.stop(10.0)
        assert not up.alive

    def pending(self) -> int:
        s = BufferSession(self.buffer.path)
        try:
            return s.pending_count()
        finally:
            s.close()

    def stored_meta(self, key: str) -> str | None:
        s = BufferSession(self.buffer.path)
        try:
            return s.read_meta(key)
        finally:
            s.close()

    def seqs(self) -> list[int]:
        return sorted(int(r["seq"]) for r in self.sandbox.records())

    def wire(self) -> int:
        return int(self.sandbox.stats()["wire_bytes"])


def record(seq: int) -> dict[str, Any]:
    return {"timestamp": "2027-03-01T12:00:00.000Z", "metric": "level", "value": seq, "seq": seq}


@contextlib.contextmanager
def open_rig(path: Path, wall: float) -> Iterator[Rig]:
    logs = LogLines()
    logger = logging.getLogger("edge_agent.uploader")
    level = logger.level
    logger.addHandler(logs)
    logger.setLevel(logging.DEBUG)
    clock = FakeClock(wall)
    buffer = Buffer(path / "buffer.db", BufferConfig(commit_interval_ms=5, sync="normal"), clock)
    buffer.open()
    with Sandbox() as sandbox:
        rig = Rig(path, sandbox, clock, buffer, logs)
        try:
            yield rig
        finally:
            for up in rig.uploaders:
                up.stop(10.0)
            buffer.close()
            logger.removeHandler(logs)
            logger.setLevel(level)


def test_a_small_budget_keeps_the_day_under_it_and_the_rest_arrives_the_next_day(
    tmp_path: Path,
) -> None:
    # 23:59:59: the backlog's reserve is down to nothing, so the whole budget is spent.
    with open_rig(tmp_path, DAY0 + DAY_S - 1) as rig:
        rig.put(0, 200)  # about 28 kB as plain JSON in requests of 10: more than a day's
        up = rig.start(max_bytes_per_day=LIMIT, gzip=False)
        wait_until(lambda: up.budget_view().spent, what="the day's budget spent")
        first_day = rig.wire()
        view = up.budget_view()
        assert first_day <= LIMIT
        assert first_day <= view.used <= LIMIT  # it also counts the answers
        assert view.waiting and view.day == "2027-03-01"
        delivered = len(rig.seqs())
        assert 0 < delivered < 200
        assert rig.pending() == 200 - delivered  # nothing dropped: they wait
        (spent,) = rig.logs.matching("daily byte budget of 20 kB spent", logging.WARNING)
        assert f"{200 - delivered} readings wait until 00:00 UTC" in spent

        rig.clock.advance(1)  # 00:00:00 of the next UTC day
        wait_until(lambda: rig.pending() == 0, timeout=20, what="the rest, the next day")
        assert rig.seqs() == list(range(200))
        assert rig.wire() - first_day <= LIMIT
        assert rig.logs.matching("a new UTC day (2027-03-02) began; sending resumes")
        after = up.budget_view()
        assert after.day == "2027-03-02" and not after.waiting and not after.spent
        assert after.used >= rig.wire() - first_day


def test_a_restart_does_not_reset_the_days_count(tmp_path: Path) -> None:
    with open_rig(tmp_path, DAY0 + 12 * 3600) as rig:
        rig.put(0, 200)
        first = rig.start(max_bytes_per_day=LIMIT, gzip=False)
        wait_until(lambda: first.budget_view().waiting, what="the budget holding readings back")
        rig.stop(first)
        used = first.budget_view().used
        requests = rig.sandbox.stats()["requests"]
        stored = json.loads(rig.stored_meta(META_KEY) or "{}")
        assert stored == {"day": "2027-03-01", "bytes": used}  # exact at a clean stop

        second = rig.start(max_bytes_per_day=LIMIT, gzip=False)
        wait_until(lambda: second.budget_view().waiting, what="the second run holding back")
        assert second.budget_view().used == used
        assert rig.sandbox.stats()["requests"] == requests  # it spent nothing more
        assert rig.wire() <= LIMIT


def test_a_day_stored_while_the_clock_was_a_year_ahead_does_not_freeze_the_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "edge_agent.budget")
    with open_rig(tmp_path, DAY0 + DAY_S - 1) as rig:  # 23:59:59
        rig.put(0, 30)
        s = BufferSession(rig.buffer.path)
        try:  # a run a year ahead spent its day
            s.write_meta(META_KEY, json.dumps({"day": "2028-03-01", "bytes": LIMIT}))
        finally:
            s.close()
        up = rig.start(max_bytes_per_day=LIMIT, gzip=False)
        wait_until(lambda: up.budget_view().spent, what="the carried count holding back")
        assert up.budget_view().day == "2027-03-01"  # the clock's day, not the stored one
        assert rig.sandbox.stats()["requests"] == 0  # the day was spent: carried over
        rig.clock.advance(1)  # the clock's next day: not a year later
        wait_until(lambda: rig.pending() == 0, timeout=20, what="the readings, the next day")
        assert rig.seqs() == list(range(30))
        rig.stop(up)
        stored = json.loads(rig.stored_meta(META_KEY) or "{}")
        assert stored == {"day": "2027-03-02", "bytes": up.budget_view().used}
    (said,) = [r.getMessage() for r in caplog.records if "carried over" in r.getMessage()]
    assert "(2027-03-01) is earlier than the day counted (2028-03-01)" in said


def test_clock_probes_stay_within_the_budget_and_go_again_the_next_day(tmp_path: Path) -> None:
    """A server whose Date never confirms the clock: the uploader probes every second (on
    the fake monotonic clock here), each probe weighed like a high-priority request."""
    limit = 5_000
    with open_rig(tmp_path, DAY0 + 12 * 3600) as rig:
        up = Uploader(
            EndpointConfig(url=rig.sandbox.url, token_file="unused", max_bytes_per_day=limit),
            Secret(DEFAULT_TOKEN),
            rig.buffer,
            clock=rig.clock,
        )
        source = up.time_source = UplinkTime(rig.clock, rig.sandbox.url, DEFAULT_DATASOURCE)
        up.start()
        rig.uploaders.append(up)
        wait_until(lambda: source.probes == 1, what="the first probe")
        for _ in range(limit // 100):  # more rounds than the budget has probes for
            before = source.probes
            rig.clock.advance(1.0)  # the next probe is due
            with contextlib.suppress(AssertionError):
                wait_until(lambda: source.probes > before, timeout=2.0)  # noqa: B023
            if source.probes == before:
                break  # no room for another probe
        probes = rig.sandbox.stats()["requests"]
        assert 3 <= probes < limit // 100, "probes went on past the budget"
        assert rig.wire() <= up.budget_view().used <= limit
        assert up.budget_view().remaining < rig.wire() // probes + 512  # no room for one more
        rig.clock.advance(DAY_S)  # the next UTC day: probes go again
        wait_until(lambda: rig.sandbox.stats()["requests"] > probes, what="a probe, next day")
        assert up.budget_view().day == "2027-03-02"


def test_gzip_auto_falls_back_on_415_for_good_and_everything_arrives(tmp_path: Path) -> None:
    with open_rig(tmp_path, DAY0 + 12 * 3600) as rig:
        rig.sandbox.set_faults(Faults(no_gzip=True))
        rig.put(0, 50)
        first = rig.start()  # gzip = "auto", the default
        wait_until(lambda: rig.pending() == 0, what="delivery as plain JSON")
        assert rig.seqs() == list(range(50))
        assert rig.sandbox.stats()["by_status"] == {"200": 5, "415": 1}
        (said,) = rig.logs.matching("does not take gzip (415)", logging.WARNING)
        assert "from now on, also after a restart" in said
        rig.stop(first)

        second = rig.start()  # remembered in the buffer: no refused request again
        rig.put(50, 20)
        wait_until(lambda: rig.pending() == 0, what="delivery after the restart")
        assert rig.seqs() == list(range(70))
        assert rig.sandbox.stats()["by_status"] == {"200": 7, "415": 1}
        assert len(rig.logs.matching("does not take gzip (415)")) == 1
        assert rig.logs.matching("refused gzip before")
        rig.stop(second)


def dead_letters(rig: Rig) -> list[dict[str, Any]]:
    s = BufferSession(rig.buffer.path)
    try:
        return s.dead_letters()
    finally:
        s.close()


def test_gzip_auto_falls_back_on_400_to_gzip_when_plain_json_goes_through(
    tmp_path: Path,
) -> None:
    with open_rig(tmp_path, DAY0 + 12 * 3600) as rig:
        rig.sandbox.set_faults(Faults(gzip_400=True))
        rig.put(0, 50)
        first = rig.start()  # gzip = "auto", the default
        wait_until(lambda: rig.pending() == 0, what="delivery as plain JSON")
        assert rig.seqs() == list(range(50))
        assert dead_letters(rig) == []
        assert rig.sandbox.stats()["by_status"] == {"200": 5, "400": 1}
        (said,) = rig.logs.matching("answered 400 to gzip", logging.WARNING)
        assert "plain JSON from now on, also after a restart" in said
        assert rig.stored_meta("gzip_refused_url") == rig.sandbox.url
        rig.stop(first)

        second = rig.start()  # remembered in the buffer: no gzip request again
        rig.put(50, 20)
        wait_until(lambda: rig.pending() == 0, what="delivery after the restart")
        assert rig.seqs() == list(range(70))
        assert rig.sandbox.stats()["by_status"] == {"200": 7, "400": 1}
        assert len(rig.logs.matching("answered 400 to gzip")) == 1
        rig.stop(second)


def test_a_bad_record_under_gzip_auto_is_tried_plain_once_then_split_as_usual(
    tmp_path: Path,
) -> None:
    with open_rig(tmp_path, DAY0 + 12 * 3600) as rig:
        rig.sandbox.set_faults(Faults(reject_fields={"seq": "3"}))
        rig.put(0, 10)  # one batch, seq 3 refused
        rig.start()
        wait_until(lambda: rig.pending() == 0, what="the batch settled")
        assert rig.seqs() == [i for i in range(10) if i != 3]
        assert [d["record"]["seq"] for d in dead_letters(rig)] == [3]
        assert not rig.logs.matching("400 to gzip")
        assert rig.stored_meta("gzip_refused_url") is None
        # The batch gzip, then plain (both 400); the halves gzip: once a gzip request was
        # delivered, a 400 to gzip is about the records and no plain try is made.
        requests = rig.sandbox.stats()["requests"]
        rig.sandbox.set_faults(Faults(reject_fields={"seq": "13"}))
        rig.put(10, 10)
        wait_until(lambda: rig.pending() == 0, what="the second batch settled")
        assert len(dead_letters(rig)) == 2
        bisection = 1 + 2 * 4  # split_bound(10, 1): 9 requests at most, none plain
        assert rig.sandbox.stats()["requests"] - requests <= bisection
        assert rig.seqs() == [i for i in range(20) if i not in (3, 13)]


def test_gzip_true_takes_a_400_to_gzip_as_bad_records(tmp_path: Path) -> None:
    with open_rig(tmp_path, DAY0 + 12 * 3600) as rig:
        rig.sandbox.set_faults(Faults(gzip_400=True))
        rig.put(0, 2)
        rig.start(gzip=True)
        wait_until(lambda: rig.pending() == 0, what="the batch settled")
        assert len(dead_letters(rig)) == 2 and rig.seqs() == []
        assert rig.sandbox.stats()["by_status"] == {"400": 3}
        assert not rig.logs.matching("400 to gzip")


def test_gzip_auto_compresses_where_the_server_takes_it(tmp_path: Path) -> None:
    with open_rig(tmp_path, DAY0 + 12 * 3600) as rig:
        rig.put(0, 50)
        rig.start()
        wait_until(lambda: rig.pending() == 0, what="delivery")
        stats = rig.sandbox.stats()
        assert stats["by_status"] == {"200": 5}
        plain = sum(len(json.dumps(r)) for r in rig.sandbox.records())
        assert stats["bytes"] < plain  # the bodies came compressed


def test_kill_9_while_the_budget_holds_back_does_not_spend_the_day_again(
    tmp_path: Path, pty_sensor: PtySensor
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    buffer = Buffer(data_dir / "buffer.db", BufferConfig(sync="normal"))
    buffer.open()
    assert buffer.put([Reading(DATASOURCE, record(i)) for i in range(200)])
    assert buffer.flush()
    buffer.close()
    holding = ("daily byte budget of 20 kB spent", "the backlog waits while the rest is kept")
    with Sandbox(tokens=[TOKEN], datasources=[DATASOURCE]) as sandbox:
        config = write_config(
            tmp_path / "agent.toml",
            url=sandbox.url,
            data_dir=data_dir,
            sources=[serial_source(pty_sensor.link)],
            agent={"trust_clock": True},  # no clock probes: every request carries readings
            endpoint={
                "max_bytes_per_day": "20kB",
                "max_batch_records": 10,
                "max_batch_bytes": 2048,
                "gzip": False,
            },
        )
        agent = AgentProcess(config, tmp_path / "agent.log").start()
        try:
            wait_until(
                lambda: any(text in agent.log_text() for text in holding),
                timeout=30,
                what="the budget holding readings back",
            )
            agent.kill9()
            sent = sandbox.stats()
            assert 0 < sent["wire_bytes"] <= LIMIT
            held_lines = sum(agent.log_text().count(text) for text in holding)

            agent.start()
            wait_until(
                lambda: sum(agent.log_text().count(text) for text in holding) > held_lines,
                timeout=30,
                what="the restarted agent holding readings back",
            )
            assert sandbox.stats()["requests"] == sent["requests"]  # nothing spent twice
        finally:
            agent.ensure_dead()
