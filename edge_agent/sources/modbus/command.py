"""`edge-agent modbus read`: one poll of a configured Modbus source, its values printed.

A technician's first test on site: does the unit answer, are wiring and framing right, do the
registers decode to plausible values? It polls once with the source's own code (its link, its
request plan, its decoders), sends nothing, touches no buffer and needs no upload token.

Exit 0 with the values on stdout; 1 when the poll failed, with what to check (a serial port
that the running agent holds is busy: the message names the agent's PID and how to stop it);
2 for a configuration error or a source that is not a Modbus source.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TextIO

from edge_agent import lock
from edge_agent.config import Config, load_config
from edge_agent.dry_run import PrintIntake
from edge_agent.errors import ConfigError, SourceError
from edge_agent.records import Value
from edge_agent.sources.modbus.config import ModbusConfig, RegisterConfig
from edge_agent.sources.modbus.link import LinkPool, RequestFailed
from edge_agent.sources.modbus.registers import describe_register
from edge_agent.sources.modbus.source import ModbusSource


def read(config_path: Path, name: str, out: TextIO = sys.stdout) -> int:
    """Poll source `name` of the configuration once and print its values."""
    config = load_config(config_path, secrets=False)
    modbus = find_source(config, name)
    # A pool of its own: the port is opened here and closed when the poll is done.
    source = ModbusSource(modbus, config.agent.device_id, PrintIntake(out), links=LinkPool())
    started = time.monotonic()
    try:
        values = source.read_once()
    except RequestFailed as exc:
        raise SourceError(f"modbus {name}: {exc}") from None
    except SourceError as exc:  # the port or the connection, not the unit
        raise SourceError(f"modbus {name}: {exc}{busy_hint(config, modbus)}") from None
    took = time.monotonic() - started
    out.write(render(modbus, values, took))
    out.flush()
    return 0


def find_source(config: Config, name: str) -> ModbusConfig:
    """The Modbus source called `name`; ConfigError naming the ones there are."""
    names = [s.name for s in config.sources if isinstance(s, ModbusConfig)]
    choice = f"its Modbus sources: {', '.join(names)}" if names else "it has no Modbus source"
    for source in config.sources:
        if source.name != name:
            continue
        if isinstance(source, ModbusConfig):
            return source
        raise ConfigError(
            f"{config.path}: source {name!r} is a {source.type} source, not a Modbus source "
            f"({choice}); `edge-agent run --once` reads any source"
        )
    raise ConfigError(f"{config.path}: no source named {name!r} ({choice})")


def busy_hint(config: Config, modbus: ModbusConfig) -> str:
    """Who holds the serial port, when the running agent does; else what to check."""
    if modbus.transport == "tcp":
        return (
            "; check the address, the network, and that the device takes Modbus TCP on "
            "that port (some take one connection at a time: the running agent may hold it)"
        )
    holder = lock.running_holder(config.buffer_path)
    if holder is not None:
        return (
            f". An agent runs on this configuration (PID {holder.pid}, {holder.how()}) and "
            f"holds {modbus.port}, which is busy here: stop it ({holder.stop_hint()}) to read "
            "the device with `modbus read`, or watch its status page"
        )
    return (
        f"; check the USB adapter and cable, the port path, that the agent's user is in the "
        f"dialout group, and that no other program holds it (`fuser -v {modbus.port}`)"
    )


def render(modbus: ModbusConfig, values: dict[str, Value], took: float) -> str:
    """The poll's values, one register a line, with where each came from and how."""
    head = (
        f"modbus {modbus.name}: unit {modbus.unit_id} on {modbus.transport} {modbus.framing} "
        f"answered in {took:.2f} s\n"
    )
    width = max(len(reg.name) for reg in modbus.registers)
    shown = [_value_text(values.get(reg.name)) for reg in modbus.registers]
    value_width = max(len(text) for text in shown)
    lines = [
        f"  {reg.name:<{width}}  {text:>{value_width}}  {_where(reg)}{_note(values.get(reg.name))}"
        for reg, text in zip(modbus.registers, shown, strict=True)
    ]
    return head + "\n".join(lines) + "\n"


def _value_text(value: Value | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _where(reg: RegisterConfig) -> str:
    last = reg.address + reg.width - 1
    span = f"{reg.address}" if last == reg.address else f"{reg.address}-{last}"
    return f"{reg.kind} {span}, {describe_register(reg)}"


def _note(value: Value | None) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "  <- not a number: left out when the agent runs; check type and word_order"
    return ""
