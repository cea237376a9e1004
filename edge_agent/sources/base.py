"""The source contract: what every source offers the agent, and what the agent offers it.

A source reads from one device or broker in its own thread and hands readings to `Intake`.
It knows nothing about batching, retries or HTTP. It survives its device going away: it
logs once, backs off, reopens. A stopped source cannot be started again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edge_agent.records import Reading


class Intake(Protocol):
    """Where sources put readings (the agent's side of the contract)."""

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        device_time: bool = False,
    ) -> bool:
        """Queue readings for the buffer; `on_durable` runs once they are committed.

        `device_time`: the timestamps came from the device, not from our clock, so an
        untrusted clock must not hold or rewrite them. Returns False when the agent is
        stopping and the readings were not taken.
        """
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add to a persistent counter (e.g. `dropped.unparseable.<source>`)."""
        ...

    def commit_soon(self) -> None:
        """Commit what is queued now rather than at the end of the commit interval."""
        ...

    def put_dead_letter(
        self,
        datasource_id: str,
        record_text: str,
        reason: str,
        origin: str,
        on_durable: Callable[[], None] | None = None,
    ) -> bool:
        """Keep input that could not be read in `dead_letters`, with the next commit.

        `record_text` must be JSON text; `on_durable` runs once it is committed. Returns False
        when the agent is stopping and nothing was kept.
        """
        ...


@dataclass
class SourceStats:
    connected: bool = False
    lines: int = 0  # lines or messages received
    readings: int = 0  # readings emitted
    parse_errors: int = 0
    reconnects: int = 0
    last_error: str | None = None
    last_data: float | None = None  # wall clock of the last line or message


class Source(Protocol):
    name: str
    stats: SourceStats
    heartbeat: float

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    @property
    def alive(self) -> bool: ...


class ThreadedSource:
    """Start/stop plumbing shared by sources that read in one thread of their own."""

    name: str

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = SourceStats()
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError(f"source {self.name} was already started")
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError
