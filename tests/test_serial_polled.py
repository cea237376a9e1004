"""Polled serial and serial framing, through real pseudo-terminals opened by pyserial by path.

A `PtyResponder` plays an instrument that answers only when asked (`R\\r\\n` -> `T=21.4`):
on time, late, or never. Linux pseudo-terminals ignore parity and stop bits, so framing is
checked as far as a pty allows: pyserial accepts the settings and lines flow; bad values are
refused before start.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtyResponder
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
    run = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "data" / "buffer.db").exists()
