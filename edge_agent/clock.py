"""Time: UTC stamps for readings, and the clock the rest of the agent reads.

Every timestamp the agent sends is ISO 8601 UTC with a `Z` suffix and milliseconds, made by
`utc_stamp`. Components take a `Clock` so tests can drive time without sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float:
        """Seconds since the epoch (may jump when NTP corrects it)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary start; never goes back."""
        ...


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def utc_stamp(epoch_seconds: float) -> str:
    """`2025-01-01T12:00:00.123Z` for the given time (milliseconds truncated, not rounded)."""
    millis = int(epoch_seconds * 1000)
    seconds, ms = divmod(millis, 1000)
    t = time.gmtime(seconds)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{ms:03d}Z"
    )
