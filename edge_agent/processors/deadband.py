"""`deadband`: send a metric's value only when it moved by more than `delta` since the last
value sent, or `heartbeat_s` passed since then.

The last value sent and its time, per series, are committed with the readings that carry
them (`Carried.state`), so after a restart the agent goes on from what it had sent: it does
not send every value again, and never forgets one it committed.
"""

from __future__ import annotations

import json
import math
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
from edge_agent.records import Reading
from edge_agent.tables import check_range

# Series tracked per deadband at most (MQTT topic fields can name any number of devices);
# values of further series are all sent, counted as errors.
MAX_SERIES = 10_000


@dataclass(frozen=True, kw_only=True)
class DeadbandConfig(ProcessorConfig):
    type: Literal["deadband"] = "deadband"
    metric: str
    delta: float
    heartbeat_s: float = 300.0

    def check(self, where: str) -> None:
        if not self.metric.strip():
            raise ConfigError(f"{where} metric: must not be empty")
        if not math.isfinite(self.delta) or self.delta < 0:
            raise ConfigError(f"{where} delta: expected a number 0 or more, got {self.delta!r}")
        check_range(self.heartbeat_s, 0, 366 * 86_400, f"{where} heartbeat_s")


class Deadband:
    """Long: readings of `metric`. Wide: the key `metric`, removed from a record when it did
    not move (a record left without a value is dropped).

    Values that are not numbers are always sent (counted and logged once). Readings stamped
    while the clock was not trusted are sent and do not move the state: their times are not
    real yet.
    """

    def __init__(self, config: DeadbandConfig, place: Place, state: dict[str, str]) -> None:
        self._config = config
        self._place = place
        self.scope = f"deadband/{place.source}/{config.metric}"
        self._last: dict[str, tuple[float, float]] = {}
        for key, text in state.items():
            value, at = json.loads(text)
            self._last[key] = (float(value), float(at))
        self._problems = Problems(place, f"deadband {config.metric!r}")
        self._key = "value" if place.shape == "long" else config.metric  # where the value is

    def run(self, readings: list[Reading], work: Work) -> list[Reading]:
        out = []
        for r in readings:
            record = r.record
            if self._key not in record or not self._mine(record) or self._passes(record, work):
                out.append(r)
            elif self._place.shape == "wide":
                left = {k: v for k, v in record.items() if k != self._key}
                if value_keys(left, self._place.labels):
                    out.append(remake(r, left))
        return out

    def _mine(self, record: dict[str, object]) -> bool:
        return self._place.shape == "wide" or record.get("metric") == self._config.metric

    def _passes(self, record: dict[str, object], work: Work) -> bool:
        """Whether the value is sent; if so, it becomes the last value sent."""
        value = record[self._key]
        at = epoch(record.get("timestamp"))
        if not is_number(value):
            self._problems.report(work, "type", f"{value!r} is not a number; sent as it is")
            return True
        if at is None:
            self._problems.report(work, "time", "a record has no readable timestamp; sent")
            return True
        if work.untrusted:
            return True
        assert isinstance(value, int | float)
        key = series(record, self._place)
        last = self._last.get(key)
        if last is not None:
            moved = abs(value - last[0]) > self._config.delta
            beat = self._config.heartbeat_s > 0 and at - last[1] >= self._config.heartbeat_s
            if not moved and not beat:
                work.counts[f"processors.filtered.{self._place.source}"] += 1
                return False
        elif len(self._last) >= MAX_SERIES:
            self._problems.report(work, "series", f"over {MAX_SERIES} series; sending all")
            return True
        self._last[key] = (float(value), at)
        work.carried.state.append((self.scope, key, json.dumps([value, at])))
        return True
