"""`drop`: leave out metrics by name (`metrics`), or all but some (`keep`); `*` and `?` match
any characters, as in file names."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

from edge_agent.errors import ConfigError
from edge_agent.processors.base import Place, ProcessorConfig, Work, remake, value_keys
from edge_agent.records import Reading


@dataclass(frozen=True, kw_only=True)
class DropConfig(ProcessorConfig):
    type: Literal["drop"] = "drop"
    metrics: tuple[str, ...] | None = None
    keep: tuple[str, ...] | None = None

    def check(self, where: str) -> None:
        if (self.metrics is None) == (self.keep is None):
            raise ConfigError(
                f'{where}: set either metrics (what to drop, e.g. ["debug_*"]) or keep (what '
                "to keep, dropping the rest), not both and not neither"
            )
        if not (self.metrics or self.keep):
            raise ConfigError(f"{where} {'metrics' if self.keep is None else 'keep'}: is empty")


def matcher(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One expression for a list of `fnmatch` patterns (case-sensitive)."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns))


class Drop:
    """Long: readings whose metric matches are dropped (or kept). Wide: matching value keys
    are removed (labels and the timestamp stay); a record left without a value is dropped.

    What is dropped is counted in `processors.filtered.<source>`.
    """

    def __init__(self, config: DropConfig, place: Place) -> None:
        self._keep = config.keep is not None
        self._match = matcher(config.keep if config.keep is not None else config.metrics or ())
        self._place = place

    def _drops(self, name: str) -> bool:
        return (self._match.match(name) is None) == self._keep

    def run(self, readings: list[Reading], work: Work) -> list[Reading]:
        out = []
        dropped = 0
        for r in readings:
            if self._place.shape == "long":
                if self._drops(str(r.record.get("metric"))):
                    dropped += 1
                else:
                    out.append(r)
                continue
            record = r.record
            gone = [k for k in value_keys(record, self._place.labels) if self._drops(k)]
            if not gone:
                out.append(r)
                continue
            dropped += len(gone)
            left = {k: v for k, v in record.items() if k not in gone}
            if value_keys(left, self._place.labels):
                out.append(remake(r, left))
        if dropped:
            work.counts[f"processors.filtered.{self._place.source}"] += dropped
        return out
