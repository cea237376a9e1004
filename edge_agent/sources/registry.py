"""Source types by name: every folder under `sources/` that declares a `SOURCE_TYPE`.

A source type is a package `edge_agent/sources/<type>/` whose `__init__` names a `SourceType`:
its config class (its own keys, defaults and checks) and a factory. The factory imports the
source itself only when called, so reading a configuration does not load paho or pymodbus.
Adding a type is adding a folder; the config loader and the agent name none.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.clock import Clock
from edge_agent.sources.base import Intake, Source, SourceConfig

# The types shipped with the agent, in the order messages list them; others follow by name.
_BUILT_IN = ("serial", "mqtt", "modbus")


@dataclass(frozen=True)
class SourceType:
    name: str
    config: type[SourceConfig]
    # (config, device_id, intake, clock) -> a source not yet started
    make: Callable[[SourceConfig, str | None, Intake, Clock], Source]


@functools.cache
def source_types() -> dict[str, SourceType]:
    """Every source type, by the `type` value a `[[sources]]` table gives."""
    import edge_agent.sources as package

    found: dict[str, SourceType] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        declared = getattr(module, "SOURCE_TYPE", None)
        if isinstance(declared, SourceType):
            found[declared.name] = declared
    first = [name for name in _BUILT_IN if name in found]
    order = first + sorted(set(found) - set(first))
    return {name: found[name] for name in order}


def source_type(name: str) -> SourceType | None:
    return source_types().get(name)
