"""What every processor shares: its config base class, the work of one put, record helpers.

A processor takes the readings of one put (one line, one poll, a batch of MQTT messages) and
returns what is left of them. It may also hand the buffer things to commit with them
(`Work.carried`: deadband state, values for aggregate windows), count what it did, and report
a problem once. Processors know the shape of their source's records:

- long: one reading per value, with `metric` and `value`;
- wide: one reading per line, a key per value. Its *labels* (tags, `device_id`, MQTT topic
  fields) say where the values come from; every other key but `timestamp` is a value.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from edge_agent.processors.durable import Carried
from edge_agent.records import Reading

log = logging.getLogger("edge_agent.processors")

Shape = Literal["long", "wide"]


@dataclass(frozen=True, kw_only=True)
class ProcessorConfig:
    """The key every `[[sources.processors]]` table has; each type adds its own."""

    type: str

    def check(self, where: str) -> None:
        """The type's own checks; `where` names the file, the source and the processor."""


@dataclass(frozen=True)
class Place:
    """Where a processor runs: its source, the shape of its records and their labels."""

    source: str
    shape: Shape
    labels: frozenset[str]
    id_field: str | None = None  # `record_id_field`: aggregates get an id of their own


@dataclass
class Work:
    """One put on its way through the processors."""

    untrusted: bool  # stamped while the clock was not trusted: the timestamps are not real
    carried: Carried = field(default_factory=Carried)
    counts: Counter[str] = field(default_factory=Counter)


class Problems:
    """A processor's problems: each counted (`processors.errors.<source>`), each kind logged
    once (the count tells how often it happened since)."""

    def __init__(self, place: Place, processor: str) -> None:
        self._place = place
        self._processor = processor
        self._said: set[str] = set()

    def report(self, work: Work, kind: str, message: str) -> None:
        work.counts[f"processors.errors.{self._place.source}"] += 1
        if kind in self._said or len(self._said) > 100:
            return
        self._said.add(kind)
        log.warning(
            "source %s: processor %s: %s (counted in processors.errors.%s; said once)",
            self._place.source,
            self._processor,
            message,
            self._place.source,
        )


def is_number(value: Any) -> bool:
    return type(value) in (int, float)


def value_keys(record: Mapping[str, Any], labels: frozenset[str]) -> list[str]:
    """The keys of a wide record that hold values (not its timestamp, not a label)."""
    return [k for k in record if k != "timestamp" and k not in labels]


def series(record: Mapping[str, Any], place: Place) -> str:
    """What tells one series of values from another, as text: in the long shape the record
    without its timestamp and value (its metric, tags and fields); in the wide shape its
    labels. Values of different devices on one MQTT source are never mixed."""
    if place.shape == "long":
        named = {k: v for k, v in record.items() if k not in ("timestamp", "value")}
    else:
        named = {k: v for k, v in record.items() if k in place.labels}
    return json.dumps(named, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def epoch(stamp: Any) -> float | None:
    """Seconds since the epoch of a record's ISO 8601 timestamp; None if it is not one."""
    if not isinstance(stamp, str):
        return None
    try:
        parsed = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    seconds = parsed.timestamp()
    return seconds if math.isfinite(seconds) else None


def remake(reading: Reading, record: dict[str, Any]) -> Reading:
    """A reading with a changed record (processors run before ids and clock repair)."""
    return Reading(reading.datasource_id, record)
