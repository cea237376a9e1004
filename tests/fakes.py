"""Fakes where a real part adds nothing: a clock the test moves by hand."""

from __future__ import annotations

import threading


class FakeClock:
    """Wall and monotonic clocks that move only when told; `jump` moves the wall alone."""

    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self._lock = threading.Lock()
        self._wall = wall
        self._mono = mono

    def wall(self) -> float:
        with self._lock:
            return self._wall

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._wall += seconds
            self._mono += seconds

    def jump(self, seconds: float) -> None:
        with self._lock:
            self._wall += seconds
