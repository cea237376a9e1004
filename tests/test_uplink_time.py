"""Time from the uplink: the API's Date confirms the clock or stands in for it, never a
portal's; readings a previous boot held come out estimated, within the documented bound.

The field cases run as real processes: the agent under libfaketime (`faketime`, the wall
clock 3 h behind as fake-hwclock leaves it, the monotonic clock real) with NTP reported
unsynchronised, and a reboot played with a new boot id and a time namespace whose
monotonic clock starts near zero (`unshare --time`).
"""

from __future__ import annotations

import email.utils
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.buffer import BufferSession
from edge_agent.clock import BOOT_ID_FILE_ENV, BUILD_EPOCH, NTP_SYNCED_ENV, ClockGuard
from edge_agent.config import EndpointConfig
from edge_agent.exchange import Reply
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.simulator import PtySensor, kv_line
from edge_agent.testing.harness import free_port
from edge_agent.uplink_time import UplinkTime, sample_from, uplink_usable
from edge_agent.uploader import judge
from tests.fakes import FakeClock
from tests.helpers import DATASOURCE, AgentProcess, serial_source, wait_until, write_config
from tests.test_service import edge_agent_status, metric, scrape, with_status

TRUE_NOW = BUILD_EPOCH + 40 * 86400
URL = "https://api.example.com/restapi/datasource/insert"
API_OK = b'{"message": "Data successfully inserted"}'


def reply(
    server_time: float | None,
    *,
    status: int = 200,
    body: bytes = API_OK,
    content_type: str = "application/json",
    elapsed_s: float = 0.02,
) -> Reply:
    date = None if server_time is None else email.utils.formatdate(server_time, usegmt=True)
    return Reply(status, "", content_type, None, body, True, date, elapsed_s)


def answer_from(uplink: UplinkTime, r: Reply, probe: bool = False) -> None:
    uplink.observe(r, judge(r, False, 0.0), probe)


# -- one answer's Date ---------------------------------------------------------------------


@given(
    st.floats(min_value=TRUE_NOW, max_value=TRUE_NOW + 1e6),
    st.floats(min_value=0.0, max_value=5.0),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_a_date_bounds_the_true_offset_by_its_second_and_the_round_trip(
    true_time: float, rtt: float, share: float
) -> None:
    sent = 500.0
    written = sent + share * rtt  # when the server wrote its Date, on our monotonic clock
    date = email.utils.formatdate(true_time, usegmt=True)
    sample = sample_from(date, sent, sent + rtt)
    assert sample is not None
    assert sample.low - 1e-6 <= true_time - written <= sample.high + 1e-6
    assert sample.error == pytest.approx(0.5 + rtt / 2)


def test_only_the_apis_own_answers_tell_the_time() -> None:
    clock = FakeClock(TRUE_NOW)
    uplink = UplinkTime(clock, URL, DATASOURCE)
    portal = b"<!DOCTYPE html><html>Sign in</html>"
    answer_from(uplink, reply(TRUE_NOW, body=portal, content_type="text/html"))
    answer_from(uplink, reply(TRUE_NOW, body=portal, content_type="text/html"), probe=True)
    answer_from(uplink, reply(TRUE_NOW, status=503, body=b'{"message": "busy"}'))
    answer_from(uplink, reply(TRUE_NOW, status=401, body=b'{"message": "no"}'), probe=True)
    answer_from(uplink, reply(TRUE_NOW, status=400, body=b'{"message": "bad"}'))  # a batch's
    answer_from(uplink, reply(TRUE_NOW, status=400, body=b"empty"), probe=True)
    assert uplink.latest() is None
    answer_from(uplink, reply(TRUE_NOW, status=400, body=b'{"message": "empty"}'), probe=True)
    assert uplink.latest() is not None  # the API refusing the probe's empty list
    answer_from(uplink, reply(TRUE_NOW + 1))  # a delivered batch
    agreed = uplink.agreed()
    assert agreed is not None and abs(agreed.offset - (TRUE_NOW + 1.5 - 1000.0)) <= 1.0


def test_two_answers_that_disagree_are_not_trusted() -> None:
    clock = FakeClock(TRUE_NOW)
    uplink = UplinkTime(clock, URL, DATASOURCE)
    answer_from(uplink, reply(TRUE_NOW))
    assert uplink.agreed() is None, "one answer is not enough"
    clock.advance(1.0)
    answer_from(uplink, reply(TRUE_NOW + 1.0 + 30.0))  # a server whose Date wanders
    assert uplink.agreed() is None
    clock.advance(1.0)
    answer_from(uplink, reply(TRUE_NOW + 2.0 + 30.0))
    agreed = uplink.agreed()
    assert agreed is not None and agreed.error <= 1.0


def test_only_an_authenticated_endpoint_is_a_time_source() -> None:
    def ep(url: str, **kw: Any) -> EndpointConfig:
        return EndpointConfig(url=url, token_env="T", **kw)

    assert uplink_usable(ep(URL)) is None
    assert uplink_usable(ep("http://127.0.0.1:8080/x")) is None
    assert uplink_usable(ep("http://localhost:8080/x")) is None
    assert uplink_usable(ep("http://[::1]:8080/x")) is None
    assert "verify_tls" in (uplink_usable(ep(URL, verify_tls=False)) or "")
    assert "plain http" in (uplink_usable(ep("http://api.example.com/x")) or "")


# -- the guard's decisions -----------------------------------------------------------------


def guard_with(clock: FakeClock, ntp: bool | None = False) -> tuple[ClockGuard, UplinkTime]:
    uplink = UplinkTime(clock, URL, DATASOURCE)
    return ClockGuard(clock, ntp_synced=lambda: ntp, uplink=uplink), uplink


def test_a_plausible_clock_waits_for_one_answer_that_agrees() -> None:
    clock = FakeClock(TRUE_NOW)
    guard, uplink = guard_with(clock)
    assert not guard.trusted and guard.source == "none" and uplink.wanted
    assert "not confirmed yet" in (guard.reason or "")
    assert guard.stamp().mono is not None  # held meanwhile
    answer_from(uplink, reply(TRUE_NOW + 1.2))
    assert guard.check() is True and guard.source == "system"
    assert "Date" in (guard.confirmed_by or "") and not uplink.wanted


def test_a_clock_3_hours_behind_is_replaced_by_two_answers_that_agree() -> None:
    clock = FakeClock(TRUE_NOW - 3 * 3600, mono=1000.0)
    guard, uplink = guard_with(clock)
    answer_from(uplink, reply(TRUE_NOW))
    guard.check()
    assert guard.source == "none" and "-10800" in (guard.reason or "")
    clock.advance(1.0)
    answer_from(uplink, reply(TRUE_NOW + 1.0))
    guard.check()
    assert not guard.trusted and guard.source == "uplink" and not uplink.wanted
    assert guard.uplink_offset is not None
    assert abs(guard.uplink_offset - (TRUE_NOW - 1000.0)) <= 1.0
    assert guard.wall_error is not None and abs(guard.wall_error + 10800) <= 1.0
    # NTP sets the clock: the answers already taken confirm it at once.
    clock.jump(3 * 3600)
    assert guard.check() is True and guard.source == "system"


def test_ntp_sync_confirms_without_asking_the_endpoint() -> None:
    guard, uplink = guard_with(FakeClock(TRUE_NOW), ntp=True)
    assert guard.trusted and guard.confirmed_by == "NTP" and not uplink.wanted


def test_an_api_that_sends_no_date_leaves_the_clock_as_without_the_option() -> None:
    clock = FakeClock(TRUE_NOW)
    guard, uplink = guard_with(clock)
    answer_from(uplink, reply(None))
    assert guard.check() is True and "no Date" in (guard.confirmed_by or "")


# -- real processes ------------------------------------------------------------------------


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install {package}; scripts/test does)")
    return path


def write_seqs(sensor: PtySensor, start: int, count: int) -> dict[int, float]:
    """Lines seq start..start+count-1, 20 a second; when each was written (true time)."""
    written: dict[int, float] = {}
    for seq in range(start, start + count):
        written[seq] = time.time()
        assert sensor.write_line(kv_line(seq, written[seq]))
        time.sleep(0.05)
    return written


def received(sandbox: Sandbox) -> dict[int, dict[str, Any]]:
    records = sandbox.records(DATASOURCE)
    by_seq = {int(r["seq"]): r for r in records}
    assert len(by_seq) == len(records), "a reading arrived twice"
    return by_seq


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def held(db: Path) -> int:
    session = BufferSession(db)
    try:
        return session.stats().held
    finally:
        session.close()


def stale_clock_agent(
    tmp_path: Path, sandbox: Sandbox, sensor: PtySensor
) -> tuple[AgentProcess, str]:
    """The agent under a wall clock 3 h behind (fake-hwclock after a power cut), NTP off;
    and its status page's address."""
    need("faketime", "faketime")
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(sensor.link)],
    )
    port = free_port()
    agent = AgentProcess(
        with_status(config, port),
        tmp_path / "agent.log",
        # libfaketime itself, as the `faketime` command sets it up, without the command,
        # which would stay the agent's parent and not pass signals on. ld.so expands $LIB.
        env={
            "LD_PRELOAD": "/usr/$LIB/faketime/libfaketime.so.1",
            "FAKETIME": "-3h",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            NTP_SYNCED_ENV: "no",
        },
    )
    return agent.start(), f"http://127.0.0.1:{port}/"


def assert_stamped_by_the_endpoint(got: dict[int, dict[str, Any]], sent: dict[int, float]) -> None:
    for seq, at in sent.items():
        record = got[seq]
        assert record["time_quality"] == "uplink", record
        assert abs(seconds(record["timestamp"]) - at) <= 1.5, (record, at)


def test_without_ntp_one_probe_confirms_a_right_clock_and_readings_go_exact(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(pty_sensor.link)],
    )
    agent = AgentProcess(config, tmp_path / "agent.log", env={NTP_SYNCED_ENV: "no"}).start()
    try:
        agent.wait_log("serial weather: reading")
        sent = write_seqs(pty_sensor, 0, 20)
        wait_until(lambda: len(received(sandbox)) == 20, timeout=20, what="every reading")
        for seq, at in sent.items():
            record = received(sandbox)[seq]
            assert "time_quality" not in record, record
            assert -0.002 <= seconds(record["timestamp"]) - at <= 0.5, (record, at)
        # One exchange confirmed it: the probe (an empty list, which the sandbox refuses).
        assert sandbox.stats()["by_status"].get("400") == 1, sandbox.stats()
        assert "the clock is trusted (confirmed by the Date of" in agent.log_text()
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


def test_a_server_refusing_gzip_confirms_the_clock_and_gets_every_reading(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    # 415 to gzip, the clock not confirmed (gzip = "auto", time_from_uplink, no NTP): the
    # probe goes plain and confirms the clock; the first upload falls back to plain JSON.
    sandbox.set_faults(Faults(no_gzip=True))
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(pty_sensor.link)],
    )
    agent = AgentProcess(config, tmp_path / "agent.log", env={NTP_SYNCED_ENV: "no"}).start()
    try:
        agent.wait_log("serial weather: reading")
        write_seqs(pty_sensor, 0, 20)
        wait_until(lambda: len(received(sandbox)) == 20, timeout=20, what="every reading")
        by_status = sandbox.stats()["by_status"]
        assert by_status.get("400") == 1 and by_status.get("415") == 1, by_status
        assert "the clock is trusted (confirmed by the Date of" in agent.log_text()
        assert agent.log_text().count("does not take gzip (415)") == 1, agent.log_text()
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


def test_a_wall_clock_3_hours_behind_never_stamps_a_reading(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    agent, base = stale_clock_agent(tmp_path, sandbox, pty_sensor)
    try:
        agent.wait_log("serial weather: reading")
        sent = write_seqs(pty_sensor, 0, 30)
        wait_until(lambda: len(received(sandbox)) == 30, timeout=20, what="every reading")
        assert_stamped_by_the_endpoint(received(sandbox), sent)
        assert held(tmp_path / "data" / "buffer.db") == 0, "nothing is held for ever"

        # Said once, and shown where an operator looks.
        assert agent.log_text().count("off the time of") == 1, agent.log_text()
        doc = json.loads(edge_agent_status(agent.config, "--json").stdout)
        assert doc["clock"]["source"] == "uplink" and doc["clock"]["trusted"] is True
        assert abs(doc["clock"]["offset_s"] + 10800) <= 2.0, doc["clock"]
        assert "against the endpoint's time" in edge_agent_status(agent.config).stdout
        assert abs(metric(scrape(base), "edge_agent_clock_offset_seconds") + 10800) <= 2.0
        assert "against the endpoint&#x27;s time" in httpx.get(base, timeout=5).text
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


def test_dates_that_disagree_hold_the_readings_until_two_agree(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    sandbox.set_faults(Faults(date_skew_step_s=30.0))  # each answer's Date 30 s further off
    agent, _ = stale_clock_agent(tmp_path, sandbox, pty_sensor)
    try:
        agent.wait_log("serial weather: reading")
        sent = write_seqs(pty_sensor, 0, 10)
        wait_until(
            lambda: sandbox.stats()["by_status"].get("400", 0) >= 4, what="four probes answered"
        )
        assert sandbox.records() == [], "no reading may leave with an untrusted time"
        assert held(tmp_path / "data" / "buffer.db") == 10
        doc = json.loads(edge_agent_status(agent.config, "--json").stdout)
        assert doc["clock"]["source"] == "none" and doc["clock"]["trusted"] is False

        sandbox.set_faults(Faults())  # the server's clock is right again
        sent.update(write_seqs(pty_sensor, 10, 10))
        wait_until(lambda: len(received(sandbox)) == 20, timeout=20, what="every reading")
        assert_stamped_by_the_endpoint(received(sandbox), sent)
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


def test_readings_held_by_a_previous_boot_are_sent_once_estimated_within_the_bound(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    unshare = need("unshare", "util-linux")
    boot_a, boot_b = tmp_path / "boot-a", tmp_path / "boot-b"
    boot_a.write_text("boot-a\n")
    boot_b.write_text("boot-b\n")
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(pty_sensor.link)],
    )
    db = tmp_path / "data" / "buffer.db"

    # Boot A: only a captive portal answers, which is no time source: readings are held.
    sandbox.set_faults(Faults(portal=True))
    env = {NTP_SYNCED_ENV: "no"}
    first = AgentProcess(config, tmp_path / "a.log", env={**env, BOOT_ID_FILE_ENV: str(boot_a)})
    first.start()
    try:
        first.wait_log("serial weather: reading")
        sent = write_seqs(pty_sensor, 0, 20)
        wait_until(lambda: held(db) == 20, what="20 readings held")
        assert sandbox.records() == []
        first.kill9()  # power cut
    finally:
        first.ensure_dead()

    # Boot B, a while later: a new boot id, a monotonic clock that started a second or two
    # ago (a time namespace), and an endpoint whose Date confirms the clock.
    time.sleep(3.0)
    sandbox.set_faults(Faults())
    shift = -(int(time.monotonic()) - 1)
    boot_began = time.time() - (time.monotonic() + shift)
    namespace = [unshare, "--time", f"--monotonic={shift}"]
    if os.geteuid() != 0:
        namespace[1:1] = ["--user", "--map-root-user"]
    second = AgentProcess(
        config,
        tmp_path / "b.log",
        env={**env, BOOT_ID_FILE_ENV: str(boot_b)},
        prefix=namespace,
    ).start()
    try:
        wait_until(lambda: len(received(sandbox)) == 20, timeout=20, what="the held readings")
        got = received(sandbox)
        # The documented bound: an estimate is never earlier than the truth, and late by at
        # most the time from the previous boot's last held reading to this boot's start.
        bound = boot_began - sent[19]
        for seq, at in sent.items():
            record = got[seq]
            assert record["time_quality"] == "estimated", record
            late = seconds(record["timestamp"]) - at
            assert -0.01 <= late <= bound + 0.5, (record, at, bound)
            assert record["timestamp"][:4] == datetime.fromtimestamp(at, UTC).strftime("%Y")
        assert held(db) == 0
        time.sleep(1.0)
        assert len(sandbox.records(DATASOURCE)) == 20, "each is sent once"
        assert second.terminate() == 0
    finally:
        second.ensure_dead()


def test_the_sandbox_skews_its_date_on_demand(sandbox: Sandbox) -> None:
    sandbox.set_faults(Faults(date_skew_s=-3600.0, date_skew_step_s=10.0))
    dates = []
    for _ in range(2):
        answer = httpx.get(sandbox.url.replace("/restapi/datasource/insert", "/_admin/stats"))
        dates.append(email.utils.parsedate_to_datetime(answer.headers["Date"]).timestamp())
    assert abs(dates[0] - (time.time() - 3600)) <= 2.0
    assert abs(dates[1] - dates[0] - 10.0) <= 2.0
