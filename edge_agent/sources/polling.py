"""The poll schedule shared by the sources that ask their device (polled serial, Modbus).

Polls run on a fixed grid of `poll_interval_s` from the first one, on the monotonic clock, so
they do not drift. A poll that runs past the next grid point (a slow device, a timeout as long
as the interval) makes the points it overran count as missed, and the next poll waits for the
next point: never a burst of catch-up polls. Both sources count missed polls alike, in
`SourceStats.missed_polls` and in the buffer's counter `missed_poll.<source>`.

The wait between polls beats the source's heartbeat, so a long `poll_interval_s` does not
look like a stalled source to the service's watchdog.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_agent.sources.base import Intake, ThreadedSource

_HEARTBEAT_S = 5.0  # the service's watchdog calls a source stalled after 45 s


class PollGrid:
    """Poll times on a fixed grid: no drift, and no catch-up burst after a slow poll."""

    def __init__(self, interval: float, start: float) -> None:
        self.interval = interval
        self.next_at = start

    def delay(self, now: float) -> float:
        return max(0.0, self.next_at - now)

    def advance(self, now: float) -> int:
        """Move past a poll that ended at `now`; returns the grid points it overran."""
        self.next_at += self.interval
        if self.next_at > now:
            return 0
        missed = int((now - self.next_at) // self.interval) + 1
        self.next_at += missed * self.interval
        return missed


class PolledSource(ThreadedSource):
    """A source thread that polls its device on a `PollGrid` (see the module docstring)."""

    def __init__(self, name: str, intake: Intake) -> None:
        super().__init__(name)
        self._intake = intake

    def _poll_interval(self) -> float:
        """The configured interval, read at every poll: a reload may change it."""
        raise NotImplementedError

    def _poll_on_grid(self, poll: Callable[[], None]) -> None:
        """Call `poll` on the grid until the source stops; what `poll` raises ends it."""
        grid = PollGrid(self._poll_interval(), time.monotonic())
        while not self._sleep(grid.delay(time.monotonic())):
            poll()
            grid.interval = self._poll_interval()
            missed = grid.advance(time.monotonic())
            if missed:
                self.stats.missed_polls += missed
                self._intake.count(f"missed_poll.{self.name}", missed)

    def _sleep(self, seconds: float) -> bool:
        """Wait until the next poll, beating the heartbeat for the watchdog; True: stop."""
        end = time.monotonic() + seconds
        while True:
            self.heartbeat = now = time.monotonic()
            if now >= end:
                return self._stop.is_set()
            if self._stop.wait(min(end - now, _HEARTBEAT_S)):
                return True
