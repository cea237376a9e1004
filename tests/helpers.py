"""Test plumbing: waiting with a failing test, and the shared harness (config files, the agent
as a real process), which lives in edge_agent.testing.harness for the scripts too."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.buffer import BufferSession
from edge_agent.testing.harness import (
    DATASOURCE,
    TOKEN,
    AgentProcess,
    serial_source,
    write_config,
)

if TYPE_CHECKING:
    from edge_agent.agent import Agent

__all__ = [
    "DATASOURCE",
    "TOKEN",
    "AgentProcess",
    "counters",
    "serial_connected",
    "serial_source",
    "wait_until",
    "write_config",
]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll until `predicate()` is truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


def serial_connected(agent: Agent, name: str = "weather") -> bool:
    """Whether the agent's serial source `name` has its port open."""
    return agent.sources[name].stats.connected


def counters(db: Path) -> dict[str, int]:
    """The counters of the buffer database `db` (dropped, ...), read beside the agent."""
    with BufferSession(db) as session:
        return session.stats().counters
