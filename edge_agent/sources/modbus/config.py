"""A Modbus source's configuration: its keys, defaults and checks, as frozen dataclasses.

`ModbusConfig.from_table` turns one `[[sources]]` table of `type = "modbus"` (with its
`[[sources.registers]]`) into a `ModbusConfig`, or raises `ConfigError` naming the file, the
table and the key, with the nearest valid key for a typo. The generic checks (unknown keys,
value types, ranges) are the config loader's own, imported rather than copied, so a Modbus
source answers a mistake in the same words as every other table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Self

from edge_agent.errors import ConfigError
from edge_agent.sources.base import SourceConfig
from edge_agent.tables import build, check_range, file_keys

Transport = Literal["rtu", "tcp"]
Kind = Literal["holding", "input", "coil", "discrete"]
DataType = Literal[
    "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool"
]
WordOrder = Literal["big", "little"]
Parity = Literal["N", "E", "O", "M", "S"]

BIT_KINDS = frozenset({"coil", "discrete"})
# Registers (16-bit words) each type takes.
WORDS: Mapping[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}
_RTU_KEYS = ("port", "baudrate", "bytesize", "parity", "stopbits", "rs485")
_TCP_KEYS = ("host", "tcp_port")
# Names a register may not take: the record's own keys.
_RESERVED_NAMES = frozenset({"timestamp", "metric", "value", "device_id"})


@dataclass(frozen=True)
class RegisterConfig:
    """One value read from the device: where it is and how its bits become a number."""

    name: str
    address: int  # zero-based PDU address
    type: DataType
    kind: Kind = "holding"
    word_order: WordOrder = "big"
    scale: float = 1.0
    offset: float = 0.0

    @property
    def width(self) -> int:
        """Addresses it takes: bits for coils and discrete inputs, 16-bit registers otherwise."""
        return 1 if self.kind in BIT_KINDS else WORDS[self.type]


@dataclass(frozen=True, kw_only=True)
class ModbusConfig(SourceConfig):
    TAKES_FORMAT = False  # each register's type says how its bits are decoded

    transport: Transport
    # rtu
    port: str | None = None
    baudrate: int = 9600
    bytesize: int = 8
    parity: Parity = "N"
    stopbits: float = 1.0
    rs485: bool = False
    # tcp
    host: str | None = None
    tcp_port: int = 502
    # both
    unit_id: int = 1
    poll_interval_s: float = 1.0
    timeout_s: float = 0.5
    registers: tuple[RegisterConfig, ...] = ()

    @classmethod
    def from_table(cls, table: Mapping[str, Any], file: str, section: str) -> Self:
        """Check one `[[sources]]` table of type "modbus"; raises ConfigError naming the key."""
        name = table.get("name")
        if isinstance(name, str) and "(" not in section:
            section = f"{section} ({name})"
        label = f"{file}: {section}"
        if "format" in table:
            raise ConfigError(
                f"{label} format: a Modbus source takes no format; each register's type says "
                "how its bits are decoded"
            )
        raw_registers = table.get("registers")
        plain = {k: v for k, v in table.items() if k != "registers"}
        config = super().from_table(plain, file, section)
        config = replace(config, registers=_build_registers(raw_registers, file, section))
        config._check(table, label)
        return config

    def check(self, where: str, table: Mapping[str, Any]) -> None:
        """Checked in `from_table` once the registers are read (see `_check`)."""

    @classmethod
    def check_together(cls, configs: Sequence[SourceConfig], file: str) -> None:
        check_shared_links([c for c in configs if isinstance(c, ModbusConfig)], file)

    @classmethod
    def nested_keys(cls) -> dict[str, list[str]]:
        return {"sources.registers": file_keys(RegisterConfig)}

    def describe(self) -> str:
        from edge_agent.sources.modbus.registers import describe

        return describe(self)

    def details(self) -> list[str]:
        from edge_agent.sources.modbus.registers import describe_requests

        return describe_requests(self)

    def polled(self) -> bool:
        return True

    def slip_warnings(self) -> list[str]:
        return [w for reg in self.registers if (w := _register_number_warning(self, reg))]

    def serial_port(self) -> tuple[str, str] | None:
        if self.transport != "rtu" or self.port is None:
            return None
        return (self.port, "modbus")  # one bus: sources with the same framing share it

    @property
    def link_settings(self) -> tuple[Any, ...]:
        """What identifies the wire: sources with equal settings share one connection."""
        if self.transport == "tcp":
            return ("tcp", self.host, self.tcp_port)
        return ("rtu", self.port, self.baudrate, self.bytesize, self.parity, self.stopbits,
                self.rs485)  # fmt: skip

    @property
    def framing(self) -> str:
        """`9600 8E1` for RTU (with `RS-485` when set), `host:port` for TCP."""
        if self.transport == "tcp":
            return f"{self.host}:{self.tcp_port}"
        stop = f"{self.stopbits:g}"
        rs485 = ", RS-485 (RTS switches direction)" if self.rs485 else ""
        return f"{self.port} at {self.baudrate} {self.bytesize}{self.parity}{stop}{rs485}"

    def _check(self, table: Mapping[str, Any], label: str) -> None:
        if self.transport == "rtu":
            self._check_rtu(table, label)
        else:
            self._check_tcp(table, label)
        check_range(self.unit_id, 0, 247, f"{label} unit_id")
        check_range(self.poll_interval_s, 0.001, 86_400.0, f"{label} poll_interval_s")
        check_range(self.timeout_s, 0.01, 60.0, f"{label} timeout_s")
        self._check_names(label)

    def _check_rtu(self, table: Mapping[str, Any], label: str) -> None:
        for key in _TCP_KEYS:
            if key in table:
                raise ConfigError(f'{label} {key}: only transport = "tcp" takes this key')
        if not self.port:
            raise ConfigError(f'{label} port: missing; e.g. port = "/dev/ttyUSB0"')
        check_range(self.baudrate, 50, 4_000_000, f"{label} baudrate")
        check_range(self.bytesize, 5, 8, f"{label} bytesize")
        if self.stopbits not in (1.0, 1.5, 2.0):
            raise ConfigError(f"{label} stopbits: expected 1, 1.5 or 2, got {self.stopbits:g}")
        if self.unit_id == 0:
            raise ConfigError(
                f"{label} unit_id: 0 is the broadcast address on a serial bus, which no "
                "device answers; set the device's address (1-247)"
            )

    def _check_tcp(self, table: Mapping[str, Any], label: str) -> None:
        for key in _RTU_KEYS:
            if key in table:
                raise ConfigError(f'{label} {key}: only transport = "rtu" takes this key')
        if not self.host or not self.host.strip():
            raise ConfigError(f'{label} host: missing; e.g. host = "192.168.1.20"')
        _check_bare_host(self.host, label)
        check_range(self.tcp_port, 1, 65_535, f"{label} tcp_port")

    def _check_names(self, label: str) -> None:
        if not self.registers:
            raise ConfigError(
                f"{label}: no [[sources.registers]]; add one table per value to read "
                '(name, address, type), e.g. name = "voltage", address = 0, type = "float32"'
            )
        seen: set[str] = set()
        for reg in self.registers:
            if reg.name in seen:
                raise ConfigError(
                    f"{label} registers: the name {reg.name!r} is used twice; names must differ"
                )
            seen.add(reg.name)
            if reg.name in self.tags:
                raise ConfigError(
                    f"{label} registers: {reg.name!r} is also a tag; rename one of them"
                )


def _check_bare_host(host: str, label: str) -> None:
    """A host name or IP address only: the port has its own key, and there is no scheme."""
    scheme, sep, rest = host.partition("://")
    if sep:
        bare = rest.split("/")[0]
        raise ConfigError(
            f"{label} host: {host!r} has a scheme ({scheme}://); give the bare host name or IP "
            f'address, e.g. host = "{bare}" (and the port, if not 502, as tcp_port)'
        )
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:  # not an IPv6 address
        raise ConfigError(
            f'{label} host: {host!r} holds a port; write host = "{name}" and tcp_port = {port}'
        )
    if any(c in host for c in "/ \t"):
        raise ConfigError(
            f"{label} host: {host!r} is not a host name or IP address; give only the "
            'device\'s name or address, e.g. host = "192.168.1.20"'
        )


# Register numbers of the old Modicon convention: 3xxxx input registers, 4xxxx holding
# registers, each counted from 1. `address` is the zero-based offset the protocol sends.
_REGISTER_NUMBERS = {3: "input", 4: "holding"}


def _register_number_warning(config: ModbusConfig, reg: RegisterConfig) -> str | None:
    prefix = reg.address // 10_000
    if reg.kind in BIT_KINDS or prefix not in _REGISTER_NUMBERS or reg.address % 10_000 == 0:
        return None
    kind = _REGISTER_NUMBERS[prefix]
    offset = reg.address - prefix * 10_000 - 1
    return (
        f"[[sources]] ({config.name}) register {reg.name!r}: address = {reg.address} looks like "
        f"a register number ({prefix}xxxx = {kind} register {offset + 1}, counted from 1), not "
        f"an offset. `address` is the zero-based offset sent on the wire: {kind} register "
        f'{reg.address} is address = {offset}, kind = "{kind}". If the device\'s manual '
        f"really lists offset {reg.address}, ignore this"
    )


def _build_registers(raw: Any, file: str, section: str) -> tuple[RegisterConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(
            f"{file}: {section} registers: expected [[sources.registers]] tables, got {raw!r}"
        )
    registers = []
    for index, table in enumerate(raw, start=1):
        where = f"{section} [[sources.registers]] #{index}"
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: {where} must be a table")
        name = table.get("name")
        if isinstance(name, str):
            where = f"{where} ({name})"
        register: RegisterConfig = build(RegisterConfig, table, file, where)
        _check_register(register, table, f"{file}: {where}")
        registers.append(register)
    return tuple(registers)


def _check_register(reg: RegisterConfig, table: Mapping[str, Any], label: str) -> None:
    if not reg.name.strip():
        raise ConfigError(f"{label} name: must not be empty")
    if reg.name in _RESERVED_NAMES:
        raise ConfigError(
            f"{label} name: {reg.name!r} is a key of every record; name the value differently"
        )
    if reg.kind in BIT_KINDS and reg.type != "bool":
        raise ConfigError(
            f'{label} type: a {reg.kind} is one bit; use type = "bool" (or kind = "holding" '
            f'or "input" for a {reg.type})'
        )
    check_range(reg.address, 0, 65_536 - reg.width, f"{label} address")
    for key in ("scale", "offset"):
        value = getattr(reg, key)
        if reg.type == "bool" and key in table:
            raise ConfigError(f"{label} {key}: a bool value is not scaled; leave {key} out")
        if not math.isfinite(value):
            raise ConfigError(f"{label} {key}: expected a finite number, got {value!r}")


def check_shared_links(configs: Sequence[ModbusConfig], file: str) -> None:
    """Sources on one serial port must agree on its framing: there is one wire.

    Several sources may share a port (one per unit id on an RS-485 bus); a second set of
    framing settings for the same port would open it twice, which cannot work.
    """
    by_port: dict[str, ModbusConfig] = {}
    for config in configs:
        if config.transport != "rtu" or config.port is None:
            continue
        first = by_port.setdefault(config.port, config)
        if first.link_settings != config.link_settings:
            raise ConfigError(
                f"{file}: [[sources]] ({config.name}): {config.port} is also used by "
                f"{first.name!r} with other settings ({first.framing}, here {config.framing}); "
                "sources on one bus share baudrate, bytesize, parity, stopbits and rs485"
            )
