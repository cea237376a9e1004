"""Processor types by `type`, and the `[[sources.processors]]` tables read into configs."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import ConfigError
from edge_agent.processors.aggregate import Aggregate, AggregateConfig
from edge_agent.processors.base import Place, ProcessorConfig, Work
from edge_agent.processors.deadband import Deadband, DeadbandConfig
from edge_agent.processors.drop import Drop, DropConfig
from edge_agent.processors.rename import Rename, RenameConfig
from edge_agent.processors.scale import Scale, ScaleConfig
from edge_agent.records import Reading
from edge_agent.tables import build, file_keys

# Reads the committed state of a deadband (its scope) from the buffer.
StateReader = Callable[[str], dict[str, str]]


class Processor:
    """What the chain calls: `run` takes a put's readings and returns what is left."""

    def run(self, readings: list[Reading], work: Work) -> list[Reading]:
        raise NotImplementedError  # pragma: no cover - each type defines it


@dataclass(frozen=True)
class ProcessorType:
    config: type[ProcessorConfig]
    make: Callable[[Any, Place, StateReader], Any]


TYPES: Mapping[str, ProcessorType] = {
    "rename": ProcessorType(RenameConfig, lambda c, p, s: Rename(c, p)),
    "scale": ProcessorType(ScaleConfig, lambda c, p, s: Scale(c, p)),
    "drop": ProcessorType(DropConfig, lambda c, p, s: Drop(c, p)),
    "deadband": ProcessorType(
        DeadbandConfig, lambda c, p, s: Deadband(c, p, s(f"deadband/{p.source}/{c.metric}"))
    ),
    "aggregate": ProcessorType(AggregateConfig, lambda c, p, s: Aggregate(c, p)),
}


def processor_keys() -> list[str]:
    """Every key a `[[sources.processors]]` table may take, for the README test."""
    keys: list[str] = []
    for declared in TYPES.values():
        keys += [k for k in file_keys(declared.config) if k not in keys]
    return keys


def build_processors(raw: Any, file: str, section: str) -> tuple[ProcessorConfig, ...]:
    """A source's `processors` (a list of tables) into configs, in order; raises ConfigError
    naming the file, the source, the processor and the key."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(
            f"{file}: {section} processors: expected [[sources.processors]] tables, "
            'each with a type, e.g. type = "scale"'
        )
    return tuple(
        _build_one(table, file, f"{section} processors #{n}") for n, table in enumerate(raw, 1)
    )


def _build_one(table: Mapping[str, Any], file: str, section: str) -> ProcessorConfig:
    kind = table.get("type")
    declared = TYPES.get(kind) if isinstance(kind, str) else None
    if declared is None:
        near = difflib.get_close_matches(str(kind), list(TYPES), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(
            f"{file}: {section} type: unknown processor {kind!r}; {hint}"
            f"choose from {', '.join(TYPES)}"
        )
    section = f"{section} ({kind})"
    config = build(declared.config, table, file, section)
    config.check(f"{file}: {section}")
    return config


def make_processors(
    configs: tuple[ProcessorConfig, ...], place: Place, state: StateReader
) -> list[Processor]:
    return [TYPES[c.type].make(c, place, state) for c in configs]
