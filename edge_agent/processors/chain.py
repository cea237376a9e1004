"""A source's processors between it and the agent: the intake the source is given.

`ProcessingIntake` takes the readings of each put through the source's processors in order,
then hands what is left, and what the processors want committed with it (`Carried`), to the
agent's intake. One put at a time: processors keep state (deadband), and what a put carries
must reach the buffer in the order it was made.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from edge_agent.processors.base import Work
from edge_agent.processors.durable import Carried
from edge_agent.processors.registry import Processor
from edge_agent.records import Reading


class Downstream(Protocol):
    """The agent's intake, as the processors see it."""

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        device_time: bool = False,
        carried: Carried | None = None,
    ) -> bool: ...

    def count(self, name: str, n: int = 1) -> None: ...

    def commit_soon(self) -> None: ...

    def put_dead_letter(
        self,
        datasource_id: str,
        record_text: str,
        reason: str,
        origin: str,
        on_durable: Callable[[], None] | None = None,
    ) -> bool: ...

    def clock_trusted(self) -> bool: ...


class ProcessingIntake:
    """An `Intake` (sources/base.py) that runs a source's processors on what it puts."""

    def __init__(self, downstream: Downstream, processors: list[Processor]) -> None:
        self._downstream = downstream
        self._processors = processors
        self._lock = threading.Lock()

    def use(self, processors: list[Processor]) -> None:
        """Run these from the next put on (a reload changed them)."""
        with self._lock:
            self._processors = processors

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        device_time: bool = False,
    ) -> bool:
        untrusted = not device_time and not self._downstream.clock_trusted()
        with self._lock:
            work = Work(untrusted)
            left = list(readings)
            for processor in self._processors:
                left = processor.run(left, work)
            for name, n in work.counts.items():
                self._downstream.count(name, n)
            return self._downstream.put(left, on_durable, device_time, work.carried or None)

    def count(self, name: str, n: int = 1) -> None:
        self._downstream.count(name, n)

    def commit_soon(self) -> None:
        self._downstream.commit_soon()

    def put_dead_letter(
        self,
        datasource_id: str,
        record_text: str,
        reason: str,
        origin: str,
        on_durable: Callable[[], None] | None = None,
    ) -> bool:
        return self._downstream.put_dead_letter(
            datasource_id, record_text, reason, origin, on_durable
        )
