"""An intake that keeps readings and counters in memory: drives a source without an agent.

For tests and benches that exercise one source alone. It keeps what a source hands over, in
order, and the counters it adds to; nothing is durable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from edge_agent.records import Reading


class MemoryIntake:
    """`edge_agent.sources.base.Intake`, in memory; `keep=False` only counts readings."""

    def __init__(self, keep: bool = True) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self.readings: list[Reading] = []
        self.received = 0
        self.counters: dict[str, int] = {}
        self.dead_letters: list[tuple[str, str]] = []

    def put(
        self,
        readings: Sequence[Reading],
        on_durable: Callable[[], None] | None = None,
        device_time: bool = False,
    ) -> bool:
        with self._lock:
            self.received += len(readings)
            if self._keep:
                self.readings.extend(readings)
        if on_durable is not None:
            on_durable()
        return True

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def commit_soon(self) -> None:
        pass

    def put_dead_letter(
        self,
        datasource_id: str,
        record_text: str,
        reason: str,
        origin: str,
        on_durable: Callable[[], None] | None = None,
    ) -> bool:
        with self._lock:
            self.dead_letters.append((record_text, reason))
        if on_durable is not None:
            on_durable()
        return True

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.record for r in self.readings]

    def counter(self, name: str) -> int:
        with self._lock:
            return self.counters.get(name, 0)
