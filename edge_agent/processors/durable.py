"""What processors keep in buffer.db, and the buffer writer's half of `aggregate`.

A put carries, besides its readings, what its processors want committed with them
(`Carried`): deadband state (the last value sent, per series) and values for aggregate
windows. The buffer's writer commits both in the same transaction as the readings, so what
the state says was sent was committed, and a value taken into a window is accepted exactly
like a reading: an MQTT message is acknowledged once it is in a committed window, and never
waits for the window to end.

Windows (table `windows`, see store.py) hold running figures, one row per series, metric and
window: count, sum, min, max, first and last. They are not uploaded. Once a window has ended
(on the UTC clock, plus `GRACE_S` for readings on their way), the writer turns it into
aggregate readings and deletes it, in one transaction: every window is sent exactly once,
and counts every value committed into it, whatever crash comes in between. The writer never
closes a window while a value for it waits to be committed. A value whose window was already
sent (a device timestamp far in the past) is sent raw instead, and counted as late.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from edge_agent.clock import utc_stamp
from edge_agent.records import Reading

# A window is closed this long after it ended: a reading stamped just before the end may
# still be on its way from its source to the buffer.
GRACE_S = 3.0
# Rough bytes a window value or a state row adds to a commit (for the buffer's estimates).
_ENTRY_BYTES = 16
_STATE_BYTES = 120
_CLOSED_UNTIL = "windows_closed_until"


@dataclass(frozen=True)
class WindowKey:
    """One series' window: its values are summed up in one row of `windows`."""

    datasource_id: str
    series: str  # JSON of what tells the series apart (`base.series`)
    metric: str
    start: float  # seconds since the epoch, a multiple of window_s
    window_s: int
    spec: str  # JSON: {"source", "shape", "stats", "id"}: how the window becomes records

    @property
    def end(self) -> float:
        return self.start + self.window_s


@dataclass
class WindowEntry:
    """One value for a window, with the reading that is sent instead if it comes late."""

    key: WindowKey
    at: float  # the value's timestamp, seconds since the epoch
    value: int | float
    raw: Reading


@dataclass
class Carried:
    """What a put carries besides its readings, committed with them."""

    windows: list[WindowEntry] = field(default_factory=list)
    state: list[tuple[str, str, str]] = field(default_factory=list)  # (scope, key, value)

    def __bool__(self) -> bool:
        return bool(self.windows or self.state)

    @property
    def size(self) -> int:
        return len(self.windows) + len(self.state)

    @property
    def nbytes(self) -> int:
        return _ENTRY_BYTES * len(self.windows) + _STATE_BYTES * len(self.state)

    def earliest_end(self) -> float | None:
        return min((e.key.end for e in self.windows), default=None)


def save_state(conn: sqlite3.Connection, rows: Iterable[tuple[str, str, str]]) -> None:
    """Upsert processor state rows; call inside the commit that holds what they describe."""
    conn.executemany(
        "INSERT INTO processor_state(scope, key, value) VALUES (?, ?, ?) "
        "ON CONFLICT(scope, key) DO UPDATE SET value = excluded.value",
        list(rows),
    )


def load_state(conn: sqlite3.Connection, scope: str) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM processor_state WHERE scope = ?", (scope,)))


class Windows:
    """The writer's view of the open windows (writer thread only).

    `begin` starts a commit; `apply` and `close` run inside the writer's transaction, on
    working copies that `keep` makes current once it commits (a rollback just begins again).
    """

    def __init__(self) -> None:
        self.closed_until = 0.0  # every window that ended by then has been sent
        self._next_end: float | None = None  # the earliest end of an open window
        self._closed = 0.0
        self._next: float | None = None

    def load(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_CLOSED_UNTIL,)).fetchone()
        self.closed_until = float(row[0]) if row else 0.0
        self._next_end = conn.execute("SELECT min(start + window_s) FROM windows").fetchone()[0]
        self.begin()

    def begin(self) -> None:
        self._closed, self._next = self.closed_until, self._next_end

    def keep(self) -> None:
        self.closed_until, self._next_end = self._closed, self._next

    def next_end(self) -> float | None:
        return self._next_end

    def apply(
        self, conn: sqlite3.Connection, entries: list[WindowEntry], counts: Counter[str]
    ) -> list[Reading]:
        """Add values to their windows; returns the readings of late values, to send raw."""
        groups: dict[WindowKey, list[WindowEntry]] = {}
        late: list[Reading] = []
        for e in entries:
            if e.key.end <= self._closed:
                counts[f"processors.late.{_source(e.key)}"] += 1
                late.append(e.raw)
            else:
                groups.setdefault(e.key, []).append(e)
        if groups:
            conn.executemany(_UPSERT, [_summary(k, es) for k, es in groups.items()])
            soonest = min(k.end for k in groups)
            self._next = soonest if self._next is None else min(self._next, soonest)
        return late

    def close(self, conn: sqlite3.Connection, until: float, counts: Counter[str]) -> list[Reading]:
        """Turn every window that ended by `until` into its aggregate readings, delete it."""
        if until <= self._closed or self._next is None or self._next > until:
            return []  # nothing to close: `closed_until` need not move
        rows = conn.execute(
            "SELECT datasource_id, series, metric, start, window_s, spec, n, total, low, "
            "high, first, last FROM windows WHERE start + window_s <= ? "
            "ORDER BY start, datasource_id, series, metric",
            (until,),
        ).fetchall()
        conn.execute("DELETE FROM windows WHERE start + window_s <= ?", (until,))
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (_CLOSED_UNTIL, repr(until))
        )
        self._closed = until
        self._next = conn.execute("SELECT min(start + window_s) FROM windows").fetchone()[0]
        return _aggregates(rows, counts)


_UPSERT = (
    "INSERT INTO windows(datasource_id, series, metric, start, window_s, spec, n, total, low, "
    "high, first, first_at, last, last_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(datasource_id, series, metric, start, window_s) DO UPDATE SET "
    "spec = excluded.spec, n = n + excluded.n, total = total + excluded.total, "
    "low = min(low, excluded.low), high = max(high, excluded.high), "
    "first = CASE WHEN excluded.first_at < first_at THEN excluded.first ELSE first END, "
    "first_at = min(first_at, excluded.first_at), "
    "last = CASE WHEN excluded.last_at >= last_at THEN excluded.last ELSE last END, "
    "last_at = max(last_at, excluded.last_at)"
)


def _summary(key: WindowKey, entries: list[WindowEntry]) -> tuple[Any, ...]:
    values = [e.value for e in entries]
    first = min(entries, key=lambda e: e.at)
    last = max(reversed(entries), key=lambda e: e.at)  # the latest; of equals, the last put
    return (
        key.datasource_id,
        key.series,
        key.metric,
        key.start,
        key.window_s,
        key.spec,
        len(values),
        float(sum(values)),
        min(values),
        max(values),
        first.value,
        first.at,
        last.value,
        last.at,
    )


def _source(key: WindowKey) -> str:
    return str(json.loads(key.spec)["source"])


def _aggregates(rows: list[tuple[Any, ...]], counts: Counter[str]) -> list[Reading]:
    """The records of closed windows: long, one per stat; wide, one per series and window
    with a key per metric and stat."""
    readings: list[Reading] = []
    for (ds, series, start, window_s, spec_text), group in groupby(
        rows, key=lambda r: (r[0], r[1], r[3], r[4], r[5])
    ):
        spec = json.loads(spec_text)
        labels = json.loads(series)
        stamp = utc_stamp(start)
        counts[f"processors.windows.{spec['source']}"] += 1
        if spec["shape"] == "long":
            metric = labels.pop("metric", None)
            for row in group:
                figures = _figures(row)
                for stat in spec["stats"]:
                    record = {
                        "timestamp": stamp,
                        "metric": f"{metric if metric is not None else row[2]}_{stat}",
                        "value": figures[stat],
                        "window_s": window_s,
                        **labels,
                    }
                    _add_id(record, spec, ds, series + row[2] + stat, start)
                    readings.append(Reading(ds, record))
            continue
        record = {"timestamp": stamp}
        for row in group:
            figures = _figures(row)
            record.update({f"{row[2]}_{stat}": figures[stat] for stat in spec["stats"]})
        record["window_s"] = window_s
        record.update(labels)
        _add_id(record, spec, ds, series, start)
        readings.append(Reading(ds, record))
    return readings


def _figures(row: tuple[Any, ...]) -> dict[str, Any]:
    n, total, low, high, first, last = row[6:12]
    return {
        "mean": total / n,
        "min": low,
        "max": high,
        "count": n,
        "sum": total,
        "first": first,
        "last": last,
    }


def _add_id(record: dict[str, Any], spec: dict[str, Any], ds: str, what: str, start: float) -> None:
    """With `record_id_field`, an aggregate's id is made from what it sums up: the same
    window always gets the same id, so the server can deduplicate a resend."""
    name = spec.get("id")
    if name and name not in record:
        digest = hashlib.sha256(f"{ds}\x1f{what}".encode()).hexdigest()[:14]
        record[name] = f"{int(start * 1000):012x}{digest}"
