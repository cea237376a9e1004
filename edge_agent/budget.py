"""The daily byte budget: how many bytes the uploader may put on the wire per UTC day.

`[endpoint] max_bytes_per_day` caps what one UTC day's requests cost: each request line,
its headers and its body as sent (after gzip), and the answer's status line, headers and
body as received. TCP, TLS and DNS overhead is not counted: leave a margin under a data
plan. The uploader asks `allows` before each request and `spend`s what the exchange cost
after it, so the day's total stays under the budget; when it is spent, readings wait in the
buffer for the next UTC day. Nothing is dropped for the budget.

Priorities: high-priority and live readings may spend the whole budget. The backlog (and
low-priority readings) may spend it except a reserve kept for readings yet to come, which
shrinks with the day: `RESERVE_SHARE` of the budget at 00:00 UTC, nothing at 24:00. So fresh
data always finds room, and what the day did not need for it goes to the backlog before
the day ends.

Durability: the count lives in the buffer's `meta` table (`META_KEY`), so a restart does
not spend the day twice. The value stored is never below what was sent: before a request
that the stored value does not cover, the uploader writes ahead (`ahead`) the count plus
the request plus a headroom of 1 % of the budget; the headroom travels with each ack's
transaction (`settled`), so in steady state no write is added. A clean stop stores the
exact figure; a crash may count up to the headroom that was not sent.

The day is always the injected `Clock`'s UTC day (tests turn it by hand). When the clock's day
is earlier than the day counted (a wall clock set back, a gateway booted without a real-time
clock, or a day stored while the clock was ahead), the count carries over to the clock's day:
a clock set back cannot spend a day twice, and a clock that was once a year ahead does not
leave the budget spent for a year. When the day moves forward the count starts from 0.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import threading
from dataclasses import dataclass

from edge_agent.clock import Clock

log = logging.getLogger(__name__)

DAY_S = 86_400
META_KEY = "uplink_bytes_day"
# The share of the budget kept at 00:00 UTC for high-priority and live readings; it shrinks
# to nothing by the end of the day.
RESERVE_SHARE = 0.2
# The part of the budget written ahead of what was sent, so that a crash never undercounts.
HEADROOM_SHARE = 0.01
# What an answer is assumed to cost when a request is weighed (the insert API's answer is a
# status line, a few headers and a short JSON message); the real size is counted after it.
ANSWER_ALLOWANCE = 512
# Lanes that may spend the whole budget; any other lane leaves the reserve.
FIRST_LANES = frozenset({"high", "live"})


_EPOCH = datetime.date(1970, 1, 1)


def day_text(day: int) -> str:
    """`2026-11-02` for a day number (days since the epoch, UTC)."""
    return (_EPOCH + datetime.timedelta(days=day)).isoformat()


def day_number(text: str) -> int:
    return (datetime.date.fromisoformat(text) - _EPOCH).days


def size_text(nbytes: int) -> str:
    """`500 MB`, `1.5 GB`, `20 kB`: decimal units, as data plans count."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes} B"


@dataclass(frozen=True)
class BudgetView:
    """The budget's figures at one moment, for the status page, /metrics and the log."""

    limit: int | None  # bytes per UTC day; None: no limit (bytes are still counted)
    used: int  # bytes on the wire on `day`
    remaining: int | None  # bytes left today; None without a limit
    day: str  # the UTC day counted, 2026-11-02
    resets_at: float  # epoch seconds of the next 00:00 UTC
    waiting: bool  # the uploader holds readings back for the budget now
    spent: bool  # the budget is spent: only the next day sends again

    def resets_in(self, now: float) -> float:
        return max(0.0, self.resets_at - now)


class DailyBudget:
    """The uploader thread counts and asks; any thread may take a `view`."""

    def __init__(self, limit: int | None, clock: Clock) -> None:
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._day = int(clock.wall() // DAY_S)
        self._used = 0  # bytes sent on `_day`
        # What the buffer holds for `_day` (never below `_used` once written; 0: nothing yet).
        self._stored = 0
        self.waiting = False
        self.spent = False
        self._said_behind = False  # the clock behind the day counted was logged

    # -- persistence -----------------------------------------------------------------------

    def load(self, stored: str | None) -> None:
        """Take the figure kept in the buffer (`META_KEY`): today's, or a later day's carried
        over to today (the clock was ahead when it was stored, or is behind now)."""
        if not stored:
            return
        try:
            doc = json.loads(stored)
            day, used = day_number(str(doc["day"])), int(doc["bytes"])
        except (ValueError, KeyError, TypeError):
            return  # unreadable: count from zero rather than stop uploading
        with self._lock:
            self._roll()
            if day > self._day:  # carried over; the buffer holds another day: write anew
                self._behind(self._day, day, used)
                self._used = max(self._used, used)
            elif day == self._day:
                self._used = max(self._used, used)
                self._stored = max(self._stored, self._used)

    def ahead(self, nbytes: int) -> str | None:
        """Before sending `nbytes`: a value to store first when the stored one does not cover
        them (then store it before sending), else None."""
        with self._lock:
            self._roll()
            if self.limit is None or self._used + nbytes <= self._stored:
                return None
            self._stored = self._used + nbytes + self._headroom()
            return self._text(self._stored)

    def settled(self) -> str:
        """The value to store with an ack: what was sent, plus the headroom with a limit."""
        with self._lock:
            self._roll()
            extra = 0 if self.limit is None else self._headroom()
            self._stored = max(self._stored, self._used + extra)
            return self._text(self._stored)

    def exact(self) -> str:
        """The value to store at a clean stop: what was sent, no headroom."""
        with self._lock:
            self._roll()
            self._stored = self._used
            return self._text(self._used)

    def _headroom(self) -> int:
        assert self.limit is not None
        return max(1, int(self.limit * HEADROOM_SHARE))

    def _text(self, nbytes: int) -> str:
        return json.dumps({"day": day_text(self._day), "bytes": nbytes})

    # -- pacing ----------------------------------------------------------------------------

    def allows(self, nbytes: int, lane: str = "backlog") -> float:
        """0.0 when a request of `nbytes` may go now; else the seconds until it may.

        A request that would pass the budget waits for the next UTC day; a backlog one that
        would only eat into the reserve waits until the reserve has shrunk enough.
        """
        with self._lock:
            now = self._roll()
            if self.limit is None:
                return 0.0
            left = (self._day + 1) * DAY_S - now  # seconds to the next day
            if self._used + nbytes > self.limit:
                return max(left, 0.001)
            if lane in FIRST_LANES:
                return 0.0
            room = self.limit - self._used - nbytes  # what must still be kept back
            reserve = RESERVE_SHARE * self.limit * left / DAY_S
            if room >= reserve:
                return 0.0
            # The reserve shrinks linearly: it is down to `room` this many seconds from now.
            return max(left - room * DAY_S / (RESERVE_SHARE * self.limit), 0.001)

    def room(self, lane: str = "backlog") -> int | None:
        """Bytes a request of `lane` may cost now (None: no limit); `allows` agrees."""
        with self._lock:
            now = self._roll()
            if self.limit is None:
                return None
            room = self.limit - self._used
            if lane not in FIRST_LANES:
                left = (self._day + 1) * DAY_S - now
                room -= math.ceil(RESERVE_SHARE * self.limit * left / DAY_S)
            return max(0, room)

    def spend(self, nbytes: int) -> None:
        with self._lock:
            self._roll()
            self._used += nbytes

    def _roll(self) -> float:
        """Move to the clock's day: from 0 if it is later, with the count if it is earlier;
        returns the wall clock."""
        now = self._clock.wall()
        day = int(now // DAY_S)
        if day > self._day:
            self._day, self._used, self._stored = day, 0, 0
        elif day < self._day:
            self._behind(day, self._day, self._used)
            # The count carries over; the buffer holds the later day: the next request
            # writes the count ahead on this one.
            self._day, self._stored = day, 0
        return now

    def _behind(self, day: int, counted: int, used: int) -> None:
        """Say once that the clock's day is earlier than a day counted (lock held)."""
        if self._said_behind:
            return
        self._said_behind = True
        log.warning(
            "uploader: daily byte budget: the clock's UTC day (%s) is earlier than the day "
            "counted (%s): the clock was ahead or went back; %s used is carried over to %s",
            day_text(day),
            day_text(counted),
            size_text(used),
            day_text(day),
        )

    def view(self) -> BudgetView:
        with self._lock:
            self._roll()
            return BudgetView(
                limit=self.limit,
                used=self._used,
                remaining=None if self.limit is None else max(0, self.limit - self._used),
                day=day_text(self._day),
                resets_at=float((self._day + 1) * DAY_S),
                waiting=self.waiting,
                spent=self.spent,
            )
