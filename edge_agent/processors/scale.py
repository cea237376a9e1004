"""`scale`: a metric's value times `scale` plus `offset` (unit conversion, calibration)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from edge_agent.errors import ConfigError
from edge_agent.processors.base import Place, Problems, ProcessorConfig, Work, is_number, remake
from edge_agent.records import Reading


@dataclass(frozen=True, kw_only=True)
class ScaleConfig(ProcessorConfig):
    type: Literal["scale"] = "scale"
    metric: str
    scale: float = 1.0
    offset: float = 0.0

    def check(self, where: str) -> None:
        if not self.metric.strip():
            raise ConfigError(f"{where} metric: must not be empty")
        for key, value in (("scale", self.scale), ("offset", self.offset)):
            if not math.isfinite(value):
                raise ConfigError(f"{where} {key}: expected a finite number, got {value!r}")


class Scale:
    """Long: the value of readings of `metric`. Wide: the value under key `metric`.

    A value that is not a number, or a result too large for JSON, is left as it was, counted
    and logged once; so is a wide record without the key (a misspelt name shows there).
    """

    def __init__(self, config: ScaleConfig, place: Place) -> None:
        self._config = config
        self._place = place
        self._problems = Problems(place, f"scale {config.metric!r}")

    def run(self, readings: list[Reading], work: Work) -> list[Reading]:
        key = "value" if self._place.shape == "long" else self._config.metric
        out = []
        for r in readings:
            record = r.record
            if self._place.shape == "long" and record.get("metric") != self._config.metric:
                out.append(r)
                continue
            if key not in record:
                self._problems.report(
                    work, "missing", f"a record has no key {key!r} to scale; check the name"
                )
                out.append(r)
                continue
            out.append(self._scaled(r, key, work))
        return out

    def _scaled(self, reading: Reading, key: str, work: Work) -> Reading:
        value = reading.record[key]
        if not is_number(value):
            self._problems.report(work, "type", f"{value!r} is not a number; left as it is")
            return reading
        result = value * self._config.scale + self._config.offset
        if not math.isfinite(result):
            self._problems.report(work, "range", f"{value!r} scaled is out of range; left as is")
            return reading
        return remake(reading, {**reading.record, key: result})
