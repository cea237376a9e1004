"""Modbus RTU and TCP polling: one source type, whole (config, plan, link, source, sample).

`ModbusConfig.from_table` reads a `[[sources]]` table of `type = "modbus"`; `make_source`
builds the source the agent runs. pymodbus is imported only then, so reading or checking a
configuration does not pay for it. See README.md beside this file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_agent.clock import Clock
from edge_agent.sources.base import Intake
from edge_agent.sources.modbus.config import ModbusConfig, RegisterConfig, check_shared_links

if TYPE_CHECKING:
    from edge_agent.sources.modbus.source import ModbusSource


def make_source(
    config: ModbusConfig, device_id: str | None, intake: Intake, clock: Clock | None = None
) -> ModbusSource:
    """The factory the source registry calls."""
    from edge_agent.sources.modbus.source import ModbusSource

    return ModbusSource(config, device_id, intake, clock)


__all__ = ["ModbusConfig", "RegisterConfig", "check_shared_links", "make_source"]
