"""Serial sources: lines pushed by a device, or asked for with a request (polled serial)."""

from __future__ import annotations

from edge_agent.clock import Clock
from edge_agent.sources.base import Intake, Source, SourceConfig
from edge_agent.sources.registry import SourceType
from edge_agent.sources.serial.config import SerialConfig


def _make(config: SourceConfig, device_id: str | None, intake: Intake, clock: Clock) -> Source:
    from edge_agent.sources.serial.source import SerialSource

    assert isinstance(config, SerialConfig)
    return SerialSource(config, device_id, intake, clock)


SOURCE_TYPE = SourceType("serial", SerialConfig, _make)
