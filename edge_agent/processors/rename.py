"""`rename`: a metric (long) or a key (wide) gets another name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edge_agent.errors import ConfigError
from edge_agent.processors.base import Place, ProcessorConfig, Work, remake
from edge_agent.records import Reading


@dataclass(frozen=True, kw_only=True)
class RenameConfig(ProcessorConfig):
    type: Literal["rename"] = "rename"
    from_: str = field(metadata={"key": "from"})
    to: str

    def check(self, where: str) -> None:
        for key, name in (("from", self.from_), ("to", self.to)):
            if not name.strip():
                raise ConfigError(f"{where} {key}: must not be empty")
        if "timestamp" in (self.from_, self.to):
            raise ConfigError(f"{where}: the timestamp cannot be renamed, nor replaced")


class Rename:
    """Long: readings of metric `from` get metric `to`. Wide: key `from` becomes `to` (a
    value already under `to` is replaced); labels are not renamed."""

    def __init__(self, config: RenameConfig, place: Place) -> None:
        self._from = config.from_
        self._to = config.to
        self._place = place

    def run(self, readings: list[Reading], work: Work) -> list[Reading]:
        if self._place.shape == "long":
            return [self._long(r) for r in readings]
        return [self._wide(r) for r in readings]

    def _long(self, reading: Reading) -> Reading:
        if reading.record.get("metric") != self._from:
            return reading
        return remake(reading, {**reading.record, "metric": self._to})

    def _wide(self, reading: Reading) -> Reading:
        record = reading.record
        if self._from not in record or self._from in self._place.labels:
            return reading
        renamed = {(self._to if k == self._from else k): v for k, v in record.items()}
        return remake(reading, renamed)
