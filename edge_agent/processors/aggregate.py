"""`aggregate`: send figures per window instead of every value (a 10 Hz sensor's minute).

Windows are aligned to the UTC clock: a window of 60 s starts on the minute, one of 3600 s on
the hour (each starts at a multiple of `window_s` since the epoch). Values are taken into
their window by their timestamp and committed there (see `durable.py`); once the window has
ended, the buffer's writer sends one record per stat, `<metric>_<stat>`, stamped with the
window's start and carrying `window_s`. A window without values sends nothing.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Literal

from edge_agent.errors import ConfigError
from edge_agent.processors.base import (
    Place,
    Problems,
    ProcessorConfig,
    Work,
    epoch,
    is_number,
    remake,
    series,
    value_keys,
)
from edge_agent.processors.drop import matcher
from edge_agent.processors.durable import WindowEntry, WindowKey
from edge_agent.records import Reading
from edge_agent.tables import check_range

STATS = ("mean", "min", "max", "count", "sum", "first", "last")


@dataclass(frozen=True, kw_only=True)
class AggregateConfig(ProcessorConfig):
    type: Literal["aggregate"] = "aggregate"
    metrics: tuple[str, ...]
    window_s: int = 60
    stats: tuple[str, ...] = ("mean", "min", "max", "count", "last")

    def check(self, where: str) -> None:
        if not self.metrics:
            raise ConfigError(f'{where} metrics: is empty; name the metrics, e.g. ["vibration"]')
        check_range(self.window_s, 1, 86_400, f"{where} window_s")
        if not self.stats:
            raise ConfigError(f"{where} stats: is empty; e.g. {list(STATS[:5])}")
        for stat in self.stats:
            if stat not in STATS:
                near = difflib.get_close_matches(stat, STATS, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ConfigError(
                    f"{where} stats: unknown stat {stat!r}; {hint}choose from {', '.join(STATS)}"
                )
        if len(set(self.stats)) != len(self.stats):
            raise ConfigError(f"{where} stats: a stat is named twice")


class Aggregate:
    """Long: readings of matching metrics go into windows. Wide: matching value keys leave
    the record for windows (a record left without a value is not sent); one record per
    series and window then holds `<key>_<stat>` for each.

    A value that is not a number stays as it was and is sent raw (counted, logged once).
    Readings stamped while the clock was not trusted are sent raw too: which window they
    belong to is not known yet.
    """

    def __init__(self, config: AggregateConfig, place: Place) -> None:
        self._config = config
        self._place = place
        self._match = matcher(config.metrics)
        self._ms = config.window_s * 1000
        self._spec = json.dumps(
            {
                "source": place.source,
                "shape": place.shape,
                "stats": list(config.stats),
                "id": place.id_field,
            }
        )
        self._problems = Problems(place, f"aggregate {list(config.metrics)}")

    def run(self, readings: list[Reading], work: Work) -> list[Reading]:
        if work.untrusted:
            return readings
        if self._place.shape == "long":
            return [r for r in readings if not self._took_long(r, work)]
        out = []
        for r in readings:
            left = self._take_wide(r, work)
            if left is r or value_keys(left.record, self._place.labels):
                out.append(left)
        return out

    def _took_long(self, reading: Reading, work: Work) -> bool:
        record = reading.record
        metric = record.get("metric")
        if not isinstance(metric, str) or not self._match.match(metric):
            return False
        key = self._key(reading, metric, work)
        if key is None:
            return False
        value = record.get("value")
        if not is_number(value):
            self._problems.report(work, "type", f"{value!r} is not a number; sent raw")
            return False
        assert isinstance(value, int | float)
        work.carried.windows.append(WindowEntry(key[0], key[1], value, reading))
        work.counts[f"processors.aggregated.{self._place.source}"] += 1
        return True

    def _take_wide(self, reading: Reading, work: Work) -> Reading:
        record = reading.record
        names = [k for k in value_keys(record, self._place.labels) if self._match.match(k)]
        taken = []
        for name in names:
            value = record[name]
            if not is_number(value):
                self._problems.report(work, "type", f"{name} = {value!r} is not a number; sent raw")
                continue
            key = self._key(reading, name, work)
            if key is None:
                return reading
            assert isinstance(value, int | float)
            raw = self._raw(reading, name)
            work.carried.windows.append(WindowEntry(key[0], key[1], value, raw))
            taken.append(name)
        if not taken:
            return reading
        work.counts[f"processors.aggregated.{self._place.source}"] += len(taken)
        return remake(reading, {k: v for k, v in record.items() if k not in taken})

    def _raw(self, reading: Reading, name: str) -> Reading:
        """What is sent of one value of a wide record if its window was already sent."""
        record = reading.record
        kept = {"timestamp": record.get("timestamp"), name: record[name]}
        kept.update((k, v) for k, v in record.items() if k in self._place.labels)
        return remake(reading, kept)

    def _key(self, reading: Reading, metric: str, work: Work) -> tuple[WindowKey, float] | None:
        """The value's window, and its time; None (reported) without a readable timestamp."""
        record = reading.record
        at = epoch(record.get("timestamp"))
        if at is None:
            self._problems.report(work, "time", "a record has no readable timestamp; sent raw")
            return None
        ms = round(at * 1000)
        start = (ms - ms % self._ms) / 1000
        key = WindowKey(
            reading.datasource_id,
            series(record, self._place),
            metric,
            start,
            self._config.window_s,
            self._spec,
        )
        return key, at
