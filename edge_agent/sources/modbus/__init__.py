"""Modbus RTU and TCP polling: one source type, whole (config, plan, link, source, sample).

`ModbusConfig.from_table` reads a `[[sources]]` table of `type = "modbus"`; `make_source`
builds the source the agent runs. See README.md beside this file.
"""

from __future__ import annotations

from edge_agent.clock import Clock
from edge_agent.sources.base import Intake
from edge_agent.sources.modbus.config import ModbusConfig, RegisterConfig, check_shared_links
from edge_agent.sources.modbus.source import ModbusSource


def make_source(
    config: ModbusConfig, device_id: str | None, intake: Intake, clock: Clock | None = None
) -> ModbusSource:
    """The factory the source registry calls."""
    return ModbusSource(config, device_id, intake, clock)


__all__ = ["ModbusConfig", "ModbusSource", "RegisterConfig", "check_shared_links", "make_source"]
