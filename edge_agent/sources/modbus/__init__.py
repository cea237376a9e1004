"""Modbus RTU and TCP polling: one source type, whole (config, plan, link, source, sample).

`ModbusConfig.from_table` reads a `[[sources]]` table of `type = "modbus"`; `make_source`
builds the source the agent runs. pymodbus is imported only then, so reading or checking a
configuration does not pay for it. See README.md beside this file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_agent.clock import Clock
from edge_agent.sources.base import Intake, Source, SourceConfig
from edge_agent.sources.modbus.config import ModbusConfig, RegisterConfig, check_shared_links
from edge_agent.sources.registry import SourceType

if TYPE_CHECKING:
    from edge_agent.sources.modbus.source import ModbusSource


def make_source(
    config: ModbusConfig, device_id: str | None, intake: Intake, clock: Clock | None = None
) -> ModbusSource:
    """The factory the source registry calls."""
    from edge_agent.sources.modbus.source import ModbusSource

    return ModbusSource(config, device_id, intake, clock)


def _make(config: SourceConfig, device_id: str | None, intake: Intake, clock: Clock) -> Source:
    assert isinstance(config, ModbusConfig)
    return make_source(config, device_id, intake, clock)


SOURCE_TYPE = SourceType("modbus", ModbusConfig, _make)

__all__ = ["SOURCE_TYPE", "ModbusConfig", "RegisterConfig", "check_shared_links", "make_source"]
