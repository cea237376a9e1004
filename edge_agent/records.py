"""Readings and the records they become.

A source turns one line or message into named values; a `RecordBuilder` turns those values
into `Reading`s, each holding the JSON object that will be sent for one data source. The
`long` shape makes one record per value (`metric`, `value`); `wide` makes one record per
reading with a key per value. Tags and the device id are added to every record; they win
over a value of the same name, so a sensor cannot overwrite them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Value = int | float | str | bool


@dataclass(frozen=True, slots=True)
class Reading:
    datasource_id: str
    record: dict[str, Any]
    # Monotonic time of the reading when the wall clock was not trusted as it was stamped:
    # the buffer holds it and corrects `record["timestamp"]` once the clock is trusted.
    mono: float | None = None


class RecordBuilder:
    def __init__(
        self,
        datasource_id: str,
        shape: Literal["long", "wide"],
        tags: Mapping[str, str],
        device_id: str | None,
    ) -> None:
        self.datasource_id = datasource_id
        self.shape = shape
        self._tags = dict(tags)
        if device_id is not None:
            self._tags.setdefault("device_id", device_id)

    def build(self, values: Mapping[str, Value], timestamp: str) -> list[Reading]:
        if self.shape == "wide":
            record: dict[str, Any] = {"timestamp": timestamp, **values, **self._tags}
            record["timestamp"] = timestamp
            return [Reading(self.datasource_id, record)]
        return [
            Reading(
                self.datasource_id,
                {"timestamp": timestamp, "metric": name, "value": value, **self._tags},
            )
            for name, value in values.items()
        ]
