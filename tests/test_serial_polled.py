"""Polled serial and serial framing, through real pseudo-terminals opened by pyserial by path.

A `PtyResponder` plays an instrument that answers only when asked (`R\\r\\n` -> `T=21.4`):
on time, late, or never. Linux pseudo-terminals ignore parity and stop bits, so framing is
checked as far as a pty allows: pyserial accepts the settings and lines flow; bad values are
refused before start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.buffer import BufferSession
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtyResponder
from edge_agent.testing.harness import run_cli
from tests.helpers import DATASOURCE, serial_connected, serial_source, wait_until, write_config


def temperature(request: bytes) -> str | None:
    return "T=21.4" if request == b"R\r\n" else None


@pytest.fixture
def responder(tmp_path: Path) -> Iterator[PtyResponder]:
    device = PtyResponder(tmp_path / "serial-by-id-usb-thermo", temperature).start()
    yield device
    device.stop()


def stamp(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_a_polled_device_is_asked_on_a_grid_and_its_answers_stamped_on_arrival(
    serial_agent: Callable[..., Agent], responder: PtyResponder, sandbox: Sandbox
) -> None:
    agent = serial_agent(port=responder.link, request="R\\r\\n", poll_interval_s=0.2)
    records = wait_until(lambda: len(sandbox.records(DATASOURCE)) >= 5 and sandbox.records())
    assert all(r["T"] == 21.4 for r in records)
    asked = [t for t, request in responder.requests]
    assert all(request == b"R\r\n" for _, request in responder.requests)
    # Each answer is stamped when it arrived: after its request went out, before the next.
    for record in records[:4]:
        t = stamp(record)
        assert any(-0.001 <= t - a < 0.2 for a in asked), (t, asked[:6])  # stamps: ms
    stats = agent.sources["weather"].stats
    assert stats.timeouts == 0 and stats.readings >= 5


def test_a_late_answer_is_a_timeout_and_never_taken_for_the_next_poll(
    serial_agent: Callable[..., Agent],
    responder: PtyResponder,
    sandbox: Sandbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    responder.delay_s = 0.3  # after the 0.15 s timeout, before the next poll at 0.5 s
    caplog.set_level(logging.INFO, logger="edge_agent.sources.serial")
    agent = serial_agent(
        port=responder.link, request="R\\r\\n", poll_interval_s=0.5, response_timeout_s=0.15
    )
    stats = agent.sources["weather"].stats
    wait_until(lambda: stats.timeouts >= 4 and responder.answered >= 3, what="late answers")
    assert sandbox.records(DATASOURCE) == [] and stats.readings == 0
    warnings = [r for r in caplog.records if "no answer from" in r.getMessage()]
    assert len(warnings) == 1, "an incident is logged once, not once per poll"
    assert serial_connected(agent), "an unanswered poll does not reopen the port"
    responder.delay_s = 0.0
    wait_until(lambda: sandbox.records(DATASOURCE), what="answers once the device is quick")
    wait_until(lambda: any("answers again" in r.getMessage() for r in caplog.records))


def test_a_device_that_never_answers_is_counted_and_the_source_keeps_polling(
    serial_agent: Callable[..., Agent], tmp_path: Path, sandbox: Sandbox
) -> None:
    mute = PtyResponder(tmp_path / "serial-by-id-usb-mute", lambda request: None).start()
    try:
        agent = serial_agent(
            port=mute.link,
            request="\\x02READ\\x03\\n",
            poll_interval_s=0.1,
            response_timeout_s=0.05,
        )
        stats = agent.sources["weather"].stats
        wait_until(lambda: stats.timeouts >= 5, what="unanswered polls counted")
        assert mute.requests[0][1] == b"\x02READ\x03\n"
        assert len(mute.requests) >= stats.timeouts
        assert serial_connected(agent) and agent.sources["weather"].alive
    finally:
        mute.stop()


def buffer_counters(agent: Agent) -> dict[str, int]:
    session = BufferSession(agent.config.buffer_path)
    try:
        return session.stats().counters
    finally:
        session.close()


def test_polls_that_overrun_the_grid_are_missed_and_counted_as_for_modbus(
    serial_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """A poll that waits its whole response_timeout_s (here the whole interval) ends past the
    next grid point: that point is missed, and the next poll waits for the one after. Counted
    in the source's stats and the buffer's `missed_poll.<source>`, as a Modbus source counts."""
    mute = PtyResponder(tmp_path / "serial-by-id-usb-mute", lambda request: None).start()
    try:
        agent = serial_agent(
            port=mute.link, request="R\\r\\n", poll_interval_s=0.1, response_timeout_s=0.1
        )
        source = agent.sources["weather"]
        wait_until(lambda: source.stats.timeouts >= 4, what="unanswered polls")
        source.stop()
    finally:
        mute.stop()
    stats = source.stats
    assert stats.missed_polls >= stats.timeouts - 1 >= 3, stats
    assert len(mute.requests) <= stats.timeouts + 1, "no catch-up poll after a missed one"
    wait_until(
        lambda: buffer_counters(agent).get("missed_poll.weather") == stats.missed_polls,
        what="the missed polls in the buffer's counters",
    )


def test_a_long_poll_interval_keeps_the_heartbeat_beating(
    serial_agent: Callable[..., Agent], responder: PtyResponder
) -> None:
    """The watchdog calls a source stalled after 45 s without a heartbeat: a source polling
    once a minute must beat while it waits, or the service would be restarted."""
    agent = serial_agent(port=responder.link, request="R\\r\\n", poll_interval_s=60.0)
    source = agent.sources["weather"]
    wait_until(lambda: responder.answered == 1, what="the first poll")
    polled_at = time.monotonic()
    wait_until(lambda: source.heartbeat > polled_at + 4.0, timeout=15, what="a heartbeat")
    assert len(responder.requests) == 1 and source.alive


@pytest.mark.parametrize(
    "framing",
    [
        {"parity": "E"},
        {"bytesize": 7, "parity": "O", "stopbits": 2},
        {"parity": "N", "stopbits": 1.5, "bytesize": 5, "xonxoff": True},
    ],
)
def test_framing_settings_open_the_port_and_lines_flow(
    serial_agent: Callable[..., Agent],
    responder: PtyResponder,
    sandbox: Sandbox,
    framing: dict[str, object],
) -> None:
    serial_agent(port=responder.link, request="R\\r\\n", poll_interval_s=0.2, **framing)
    wait_until(lambda: sandbox.records(DATASOURCE), what="a reading through the framed port")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"parity": "X"}, "parity: expected one of 'N' | 'E' | 'O' | 'M' | 'S'"),
        ({"bytesize": 9}, "bytesize: expected a value from 5 to 8"),
        ({"stopbits": 3}, "stopbits: expected 1, 1.5 or 2"),
        ({"rtscts": True, "xonxoff": True}, "only one of rtscts"),
        ({"request": "R\\q"}, "unknown escape \\q"),
        ({"request": "R\\r\\n", "response_timeout_s": 2.0}, "longer than poll_interval_s"),
        ({"poll_interval_s": 2.0}, "only a polled source takes it"),
    ],
)
def test_bad_framing_and_polling_keys_stop_the_agent_with_exit_2(
    tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url="http://127.0.0.1:9/restapi/datasource/insert",
        data_dir=tmp_path / "data",
        sources=[serial_source(tmp_path / "ttyUSB0", **extra)],
    )
    run = run_cli("run", "--config", str(config))
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "data" / "buffer.db").exists()
