"""MQTT sources: a broker's messages, acknowledged once durable; paho runs in the MQTT link."""

from __future__ import annotations

from edge_agent.clock import Clock
from edge_agent.sources.base import Intake, Source, SourceConfig
from edge_agent.sources.mqtt.config import MqttConfig
from edge_agent.sources.registry import SourceType


def _make(config: SourceConfig, device_id: str | None, intake: Intake, clock: Clock) -> Source:
    from edge_agent.sources.mqtt.source import MqttSource

    assert isinstance(config, MqttConfig)
    return MqttSource(config, device_id, intake)


SOURCE_TYPE = SourceType("mqtt", MqttConfig, _make)
