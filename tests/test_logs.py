"""Log lines: journald priorities when stderr is the journal, plain timestamped lines otherwise;
repeated lines paced by the rate limit.

The agent runs as a real process; its stderr is a file whose device and inode stand in for the
journal's stream (systemd passes them in JOURNAL_STREAM, and journald reads `<N>` at the start
of each line as the entry's priority).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from edge_agent.logs import RateLimitedLog
from edge_agent.sandbox import Sandbox
from tests.helpers import AgentProcess, serial_source, write_config

# An agent whose serial port does not exist logs an error (the port) beside its info lines.
MISSING_PORT = "/dev/serial/by-id/no-such-adapter"


def run_agent(tmp_path: Path, sandbox: Sandbox, journal: str | None) -> list[str]:
    """Start an agent, wait for its error about the port, stop it; its log lines.

    `journal`: "match" sets JOURNAL_STREAM to the log file's device:inode, "other" to another
    file's, None leaves it unset.
    """
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(Path(MISSING_PORT))],
    )
    log_path = tmp_path / "agent.log"
    log_path.touch()
    env = {}
    if journal is not None:
        st = os.stat(log_path if journal == "match" else config)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    agent = AgentProcess(config, log_path, env=env).start()
    try:
        agent.wait_log("retrying every")
        agent.wait_log("agent: started")
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
    return agent.log_text().splitlines()


def test_lines_carry_journald_priorities_when_stderr_is_the_journal(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    lines = run_agent(tmp_path, sandbox, "match")
    assert lines
    assert all(re.match(r"<[2-7]>[A-Z]+ ", line) for line in lines), lines
    assert any(line.startswith("<6>INFO agent: started") for line in lines), lines
    assert any(line.startswith("<3>ERROR serial weather: cannot open") for line in lines), lines
    # No timestamp of our own: the journal adds one.
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", line) for line in lines), lines


def test_no_priorities_when_stderr_is_not_the_journal(tmp_path: Path, sandbox: Sandbox) -> None:
    for journal in (None, "other"):  # unset, or inherited by a process writing elsewhere
        run_dir = tmp_path / str(journal)
        run_dir.mkdir()
        lines = run_agent(run_dir, sandbox, journal)
        assert not any(line.startswith("<") for line in lines), lines
        stamped = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) "
        assert all(re.match(stamped, line) for line in lines), lines


def test_rate_limited_lines_pace_each_key_and_tally_what_they_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    logger = logging.getLogger("tests.rate_limit")  # not under edge_agent, which may not propagate
    tallied = RateLimitedLog(logger, 60.0, clock=lambda: now[0])
    exact = RateLimitedLog(logger, 60.0, tally=False, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(3):
            tallied(logging.WARNING, "a")
            exact(logging.WARNING, "x", key="one")
        exact(logging.WARNING, "y", key="two")  # its own pace
        exact(logging.WARNING, "forced", key="one", force=True)
        now[0] += 59.0
        tallied(logging.WARNING, "a")
        exact(logging.WARNING, "x", key="one")  # 59 s after the forced line
        now[0] += 1.0
        tallied(logging.WARNING, "a")
        exact(logging.WARNING, "x", key="two")
        exact.hold("three")
        exact(logging.WARNING, "held", key="three")
        exact.forget(lambda key: key == "one")
        exact(logging.WARNING, "news", key="one")
    assert [r.getMessage() for r in caplog.records] == [
        "a",
        "x",
        "y",
        "forced",
        "a (3 more like this since the last report)",
        "x",
        "news",
    ]
