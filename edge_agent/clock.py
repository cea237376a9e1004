"""Time: UTC stamps for readings, and the clock the rest of the agent reads.

Every timestamp the agent sends is ISO 8601 UTC with a `Z` suffix and milliseconds, made by
`utc_stamp`. Components take a `Clock` so tests can drive time without sleeping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol


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


# The agent cannot have been built after the clock it runs under: a wall clock before this
# (2026-11-01T00:00:00Z) is certainly wrong, e.g. a Raspberry Pi that booted without an RTC.
BUILD_EPOCH = 1_793_491_200.0

_TIME_ERROR = 5
_STA_UNSYNC = 0x0040


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>; only `status` is read. The padding covers the
    # reserved tail so the kernel never writes past the structure.
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("rest", ctypes.c_long * 32),
    ]


def kernel_ntp_synced() -> bool | None:
    """The kernel's NTP status via adjtimex (read-only); None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and not tx.status & _STA_UNSYNC


def boot_id() -> str:
    """This boot's id (Linux); monotonic readings of different boots cannot be compared."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "process-" + uuid.uuid4().hex


@dataclass(frozen=True)
class Stamp:
    """When a reading was taken: its UTC text, and its monotonic time if the wall is unsure."""

    text: str
    mono: float | None  # set only while the clock is not trusted: the reading is held


class ClockGuard:
    """Decides whether the wall clock can be trusted, and stamps readings accordingly.

    Untrusted: the wall clock is before the agent's build, or before the newest time already
    stored; or the kernel says NTP is not synchronised and `require_ntp_sync` is set; or the
    wall clock jumped against the monotonic clock (until it has been steady for `settle_s`).
    While untrusted, readings carry their monotonic time and are held; once trusted, their
    timestamps are rewritten as monotonic time plus the offset between the two clocks.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        trust_clock: bool = False,
        require_ntp_sync: bool = False,
        newest_known: float | None = None,
        jump_tolerance_s: float = 2.0,
        settle_s: float = 10.0,
        ntp_synced: Callable[[], bool | None] = kernel_ntp_synced,
    ) -> None:
        self._clock = clock
        self._always = trust_clock
        self._require_ntp = require_ntp_sync
        self._floor = max(BUILD_EPOCH, newest_known or 0.0)
        self._tolerance = jump_tolerance_s
        self._settle_s = settle_s
        self._ntp_synced = ntp_synced
        self._lock = threading.Lock()
        self._offset = self._measure()
        self._steady_since = clock.monotonic()
        self.jumps = 0
        self.reason: str | None = None if trust_clock else self._judge()
        self.trusted = self.reason is None

    def _measure(self) -> float:
        return self._clock.wall() - self._clock.monotonic()

    def _judge(self) -> str | None:
        """Why the clock is not trusted now, or None."""
        wall = self._clock.wall()
        if wall < self._floor:
            return f"the wall clock ({utc_stamp(wall)}) is earlier than {utc_stamp(self._floor)}"
        if self._require_ntp and self._ntp_synced() is False:
            return "the kernel says the clock is not NTP-synchronised (require_ntp_sync)"
        if self._clock.monotonic() - self._steady_since < self._settle_s and self.jumps:
            return "the wall clock jumped and has not been steady for long enough"
        return None

    def check(self) -> bool:
        """Look at the clocks again (every second or so); True when it became trusted now."""
        if self._always:
            return False
        with self._lock:
            offset = self._measure()
            if abs(offset - self._offset) > self._tolerance:
                self.jumps += 1
                self._steady_since = self._clock.monotonic()
                self._offset = offset
                self.trusted = False
            self.reason = self._judge()
            became = not self.trusted and self.reason is None
            if became:
                self._offset = offset
                self.trusted = True
            elif self.reason is not None:
                self.trusted = False
            return became

    @property
    def offset(self) -> float:
        """Wall minus monotonic, as measured while trusted."""
        return self._offset

    def stamp(self) -> Stamp:
        with self._lock:
            mono = self._clock.monotonic()
            if self._always or self.trusted:
                return Stamp(utc_stamp(self._clock.wall()), None)
            return Stamp(utc_stamp(self._clock.wall()), mono)
