"""Which batch the uploader sends next: the drain policy (README "After an outage").

Pending readings fall into lanes, tried in this order each round:

    high     priority "high" readings, whenever any is pending (they never wait to fill),
             except that after HIGH_RUN high batches in a row the next request goes to
             another lane if one has a batch ready: a chatty high source starves nothing
    live     normal readings accepted in the last `live_window_s`
    backlog  normal readings accepted before that, oldest first
    low      priority "low" readings, only when no other lane has a batch ready

With `drain = "live_first"`, live and backlog share the requests while both have a batch
ready: the backlog takes `backlog_share` of them (a credit that grows by the share each such
round and is spent whole), so history fills in steadily and the oldest readings are never
starved. With `drain = "oldest_first"` live and backlog are one lane, oldest first, and a
batch is labelled by its first reading's age. A batch that is not full and whose first reading
is younger than `flush_interval_s` is not ready: it waits to fill while other lanes go on.

Each lane's head is one lookup on the index (priority, created) (store.py), so choosing costs
a few page reads however deep the backlog; the batch is then the head's data source and schema
from there (`BufferSession.batch_at`), within the usual count and byte limits.

`DrainView` is what an operator is shown of the backlog: how many readings, how old the
oldest, and how long it takes to drain at the rate backlog readings were delivered lately
(`RateMeter`, fed by the uploader).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Literal

from edge_agent.buffer import Batch, BufferSession, Head
from edge_agent.config import EndpointConfig
from edge_agent.store import HIGH, LOW, NORMAL

Lane = Literal["high", "live", "backlog", "low"]
LANES: tuple[Lane, ...] = ("high", "live", "backlog", "low")
# High batches in a row before another lane with a batch ready gets a request: high takes
# at most HIGH_RUN of every HIGH_RUN + 1 requests while others wait.
HIGH_RUN = 4
# A batch not full waits for flush_interval_s only if it is at least this share of full.
_FULL_SHARE = 0.9
# Backlog readings delivered over this many seconds give the drain rate.
RATE_WINDOW_S = 60.0


@dataclass(frozen=True)
class Pick:
    """What a round found: a batch to send now, or how long until one is ready."""

    batch: Batch | None
    wait_s: float = 0.0  # when `batch` is None: until a waiting batch is ready (1 s if none)
    waiting: bool = False  # when `batch` is None: some batch waits to fill (else none pending)


class DrainPolicy:
    """Chooses the next batch by lanes; keeps the fair-share credit and the run of high
    batches between rounds."""

    def __init__(self) -> None:
        self._credit = 0.0
        self._high_run = 0  # high batches picked in a row

    def pick(
        self,
        session: BufferSession,
        ep: EndpointConfig,
        byte_limit: int,
        now: float,
        exclude: frozenset[str] = frozenset(),
        skip: frozenset[int] = frozenset(),
    ) -> Pick:
        """The batch to send now (`now` is the wall clock), per the lanes above."""
        cutoff = now - ep.live_window_s
        waits: list[float] = []

        def build(head: Head, lane: Lane) -> Batch:
            return session.batch_at(head, ep.max_batch_records, byte_limit, skip, lane)

        def ready(head: Head | None, lane: Lane) -> _Ready | None:
            """The lane's batch if it may go now; only a young head needs the batch built
            to tell (is it full?), the others are built once chosen."""
            if head is None:
                return None
            age = now - head.created
            # A reading "from the future" means the wall clock went back since it was
            # stored: send it rather than wait out the jump.
            if lane == "high" or not 0 <= age < ep.flush_interval_s:
                return _Ready(head, lane, None)
            batch = build(head, lane)
            if _full(batch, ep, byte_limit):
                return _Ready(head, lane, batch)
            waits.append(ep.flush_interval_s - age)
            return None

        def head(
            priority: int, since: float | None = None, before: float | None = None
        ) -> Head | None:
            return session.lane_head(priority, since, before, exclude, skip)

        high = ready(head(HIGH), "high")
        found = high if self._high_run < HIGH_RUN else None
        if found is None:
            if ep.drain == "live_first":
                live = ready(head(NORMAL, since=cutoff), "live")
                backlog = ready(head(NORMAL, before=cutoff), "backlog")
                found = self._share(live, backlog, ep.backlog_share)
            else:
                first = head(NORMAL)
                lane: Lane = "backlog" if first is not None and first.created < cutoff else "live"
                found = ready(first, lane)
        if found is None:
            found = ready(head(LOW), "low")
        found = found or high  # high's turn, or nothing else is ready
        self._high_run = self._high_run + 1 if found is not None and found is high else 0
        if found is None:
            return Pick(None, max(0.0, min(waits, default=1.0)), bool(waits))
        return Pick(found.batch or build(found.head, found.lane))

    def _share(self, live: _Ready | None, backlog: _Ready | None, share: float) -> _Ready | None:
        """Live first, except that the backlog takes `share` of the rounds where both wait."""
        if live is None or backlog is None:
            return live or backlog
        self._credit += share
        if self._credit >= 1.0:
            self._credit -= 1.0
            return backlog
        return live


@dataclass(frozen=True)
class _Ready:
    head: Head
    lane: Lane
    batch: Batch | None  # built already (to see it was full), or None


def _full(batch: Batch, ep: EndpointConfig, byte_limit: int) -> bool:
    return len(batch.rows) >= ep.max_batch_records or batch.nbytes >= _FULL_SHARE * byte_limit


class RateMeter:
    """Backlog readings delivered over the last RATE_WINDOW_S seconds (monotonic time).

    The uploader adds; the status thread reads: a lock keeps the two apart.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._started: float | None = None
        self._lock = threading.Lock()
        self.total = 0  # readings counted since the start

    def add(self, n: int, at: float) -> None:
        with self._lock:
            self.total += n
            if self._started is None:
                self._started = at
            self._events.append((at, n))
            self._forget(at)

    def rate(self, at: float) -> float | None:
        """Readings per second over the window (or since the first delivery, if sooner);
        None before anything was measured."""
        with self._lock:
            if self._started is None:
                return None
            self._forget(at)
            span = min(self._window_s, at - self._started)
            total = sum(n for _, n in self._events)
            return total / span if span > 0 else None

    def _forget(self, at: float) -> None:
        while self._events and self._events[0][0] <= at - self._window_s:
            self._events.popleft()


@dataclass(frozen=True)
class DrainView:
    """The backlog as shown to an operator: pending readings accepted before the live
    window, how old the oldest is, the rate backlog readings were delivered at lately, and
    the time to drain it at that rate (None while nothing was measured, or nothing moves)."""

    backlog_readings: int
    oldest_backlog_age_s: float | None
    rate_per_s: float | None
    eta_s: float | None

    @classmethod
    def of(
        cls, readings: int, oldest_created: float | None, rate: float | None, now: float
    ) -> DrainView:
        age = None if oldest_created is None else max(0.0, now - oldest_created)
        if readings == 0:
            eta: float | None = 0.0
        elif rate is None or rate <= 0:
            eta = None
        else:
            eta = readings / rate
        return cls(readings, age if readings else None, rate, eta)

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "backlog_readings": self.backlog_readings,
            "oldest_backlog_age_s": self.oldest_backlog_age_s,
            "backlog_rate_per_s": self.rate_per_s,
            "backlog_eta_s": self.eta_s,
        }


def drain_view(
    session: BufferSession, live_window_s: float, rate: float | None, now: float
) -> DrainView:
    """The backlog of the buffer `session` reads, at `rate` (`Uploader.backlog_rate`)."""
    readings, oldest = session.backlog(now - live_window_s)
    return DrainView.of(readings, oldest, rate, now)
