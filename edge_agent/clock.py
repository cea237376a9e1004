"""Time: the formats of the agent's UTC stamps, and the clock the rest of the agent reads.

Every timestamp the agent sends is ISO 8601 UTC with a `Z` suffix and milliseconds. This
module owns that format, in its three forms:

    utc_stamp       epoch seconds -> `2025-01-01T12:00:00.123Z`
    SecondStamps    utc_stamp for a stream of times, the date and time of day made once a second
    sql_utc_stamp   the same stamp made by SQLite, from an SQL expression of epoch seconds

and the other forms a time takes: `readable_utc` for people (log lines), `brief_utc` for people
where room is short (the status page and `edge-agent status`), `file_stamp` in a file name.

Components take a `Clock` so tests can drive time without sleeping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from edge_agent.uplink_time import UplinkTime


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


class SecondStamps:
    """`utc_stamp`, with the date and time of day reused while the second stays the same.

    Messages come thousands a second: formatting the whole stamp for each one is a tenth of
    the agent's work per message.
    """

    def __init__(self) -> None:
        self._last: tuple[int, str] = (0, utc_stamp(0)[:-4])  # 'YYYY-MM-DDTHH:MM:SS.'
        self._last_stamp: tuple[int, str] = (0, utc_stamp(0))

    def __call__(self, epoch_seconds: float) -> str:
        millis = int(epoch_seconds * 1000)  # as utc_stamp rounds
        last_millis, stamp = self._last_stamp
        if millis == last_millis:  # thousands a second: many share a millisecond
            return stamp
        second, ms = divmod(millis, 1000)
        last_second, head = self._last
        if second != last_second:
            head = utc_stamp(second)[:-4]
            self._last = (second, head)  # one tuple: a reader never sees a torn pair
        stamp = f"{head}{ms:03d}Z"
        self._last_stamp = (millis, stamp)
        return stamp


def sql_utc_stamp(epoch_seconds: str) -> str:
    """SQL that makes `utc_stamp`'s format from the SQL expression `epoch_seconds`
    (SQLite's `%f` is seconds with milliseconds: `SS.SSS`)."""
    return f"strftime('%Y-%m-%dT%H:%M:%fZ', {epoch_seconds}, 'unixepoch')"


def readable_utc(epoch_seconds: float) -> str:
    """`2025-01-01 12:00:00 UTC`: a time for people, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_seconds))


def brief_utc(epoch_seconds: float) -> str:
    """`2025-01-01 12:00:00Z`: a time for people where room is short (status page and text)."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch_seconds))


def file_stamp(epoch_seconds: float) -> str:
    """`20250101T120000Z`: a time in a file name."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch_seconds))


# The agent cannot have been built after the clock it runs under: a wall clock before this
# (2026-11-01T00:00:00Z) is certainly wrong, e.g. a Raspberry Pi that booted without an RTC.
BUILD_EPOCH = 1_793_491_200.0

# Two clocks agree when they are this close (seconds): the endpoint's Date and the wall
# clock, or two answers of the endpoint (uplink_time.py).
AGREE_S = 2.0

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


# Facts of the host the agent reads, each in one place, with an environment variable that
# points it elsewhere: for tests that play a reboot or a host without NTP in real processes,
# and for hosts where the usual place lies (README, Time).
BOOT_ID_FILE_ENV = "EDGE_AGENT_BOOT_ID_FILE"
NTP_SYNCED_ENV = "EDGE_AGENT_NTP_SYNCED"
_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def host_ntp_synced() -> bool | None:
    """Whether the clock is NTP-synchronised: `EDGE_AGENT_NTP_SYNCED` (`yes`/`no`) when set,
    else the kernel's answer."""
    told = os.environ.get(NTP_SYNCED_ENV, "").strip().lower()
    if told in ("yes", "no"):
        return told == "yes"
    return kernel_ntp_synced()


def boot_id() -> str:
    """This boot's id (Linux); monotonic readings of different boots cannot be compared.

    Read from `EDGE_AGENT_BOOT_ID_FILE` when set, else from the kernel."""
    path = os.environ.get(BOOT_ID_FILE_ENV) or _BOOT_ID_FILE
    try:
        return Path(path).read_text().strip() or "process-" + uuid.uuid4().hex
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

    With `uplink` (time_from_uplink), the wall clock must also be confirmed, by the kernel
    reporting NTP sync or by the endpoint's Date agreeing with it within AGREE_S; a jump asks
    for confirmation again. While it is not trusted and the endpoint's last two answers agree,
    `uplink_offset` is their time: the agent stamps readings with it instead of holding them.
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
        ntp_synced: Callable[[], bool | None] = host_ntp_synced,
        uplink: UplinkTime | None = None,
    ) -> None:
        self._clock = clock
        self._always = trust_clock
        self._require_ntp = require_ntp_sync
        self._floor = max(BUILD_EPOCH, newest_known or 0.0)
        self._tolerance = jump_tolerance_s
        self._settle_s = settle_s
        self._ntp_synced = ntp_synced
        self._uplink = None if trust_clock or require_ntp_sync else uplink
        self._lock = threading.Lock()
        self._offset = self._measure()
        self._steady_since = clock.monotonic()
        self.jumps = 0
        self.confirmed_by: str | None = None  # what confirmed the wall clock, with `uplink`
        self.uplink_offset: float | None = None  # true minus monotonic time, from the endpoint
        self.uplink_error: float | None = None  # the most uplink_offset can be off by
        self.reason: str | None = None if trust_clock else self._judge()
        self.trusted = self.reason is None
        self._use_uplink()

    def _measure(self) -> float:
        return self._clock.wall() - self._clock.monotonic()

    def _judge(self) -> str | None:
        """Why the clock is not trusted now, or None."""
        wall = self._clock.wall()
        if wall < self._floor:
            return f"the wall clock ({utc_stamp(wall)}) is earlier than {utc_stamp(self._floor)}"
        if self._require_ntp and self._ntp_synced() is False:
            return "the kernel says the clock is not NTP-synchronised (require_ntp_sync)"
        if self._uplink is not None:
            return self._confirmation(wall - self._clock.monotonic())
        if not self._steady():
            return "the wall clock jumped and has not been steady for long enough"
        return None

    def _steady(self) -> bool:
        return not self.jumps or self._clock.monotonic() - self._steady_since >= self._settle_s

    def _confirmation(self, offset: float) -> str | None:
        """Why the wall clock (wall minus monotonic = `offset`) is not confirmed, or None."""
        assert self._uplink is not None
        if self._ntp_synced() is True and self._steady():
            self.confirmed_by = "NTP"
            return None
        latest = self._uplink.latest()
        if latest is not None and latest.distance(offset) <= AGREE_S:
            self.confirmed_by = f"the Date of {self._uplink.url}"
            return None
        if latest is not None:
            return (
                f"the system clock is {offset - latest.offset:+.1f} s off the time of "
                f"{self._uplink.url}"
            )
        if self._uplink.no_date and self._steady():
            # Nothing can confirm it: trust it as without time_from_uplink, rather than hold
            # every reading for ever (the agent said so once).
            self.confirmed_by = "nothing (the endpoint sends no Date header)"
            return None
        return "not confirmed yet: waiting for NTP or an answer of the endpoint (time_from_uplink)"

    def _use_uplink(self) -> None:
        """The endpoint's time while the wall clock is not trusted; probe while there is none."""
        if self._uplink is None:
            return
        agreed = None if self.trusted else self._uplink.agreed()
        self.uplink_offset = None if agreed is None else agreed.offset
        self.uplink_error = None if agreed is None else agreed.error
        self._uplink.wanted = not self.trusted and agreed is None

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
            self._use_uplink()
            return became

    @property
    def offset(self) -> float:
        """Wall minus monotonic, as measured while trusted."""
        return self._offset

    @property
    def source(self) -> str:
        """Where readings' times come from now: "system", "uplink", or "none" (held)."""
        if self._always or self.trusted:
            return "system"
        return "none" if self.uplink_offset is None else "uplink"

    @property
    def confirming(self) -> bool:
        """Waiting for a first word on the wall clock (no answer of the endpoint yet)."""
        return self._uplink is not None and self._uplink.latest() is None and self.jumps == 0

    @property
    def wall_error(self) -> float | None:
        """How far the system clock is ahead of the endpoint's time (seconds), when known."""
        latest = None if self._uplink is None else self._uplink.latest()
        return None if latest is None else self._measure() - latest.offset

    def stamp(self) -> Stamp:
        with self._lock:
            mono = self._clock.monotonic()
            if self._always or self.trusted:
                return Stamp(utc_stamp(self._clock.wall()), None)
            return Stamp(utc_stamp(self._clock.wall()), mono)
