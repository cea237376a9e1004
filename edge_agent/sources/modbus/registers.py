"""Which requests a poll sends, and how the words that come back become values.

Pure functions, no I/O. `plan` groups the configured registers into as few read requests as
the protocol allows: one kind per request, at most 125 registers or 2000 bits. Registers are
grouped only when they touch or overlap; a gap starts a new request. Reading across a gap
would save requests (Telegraf's `max_insert` optimisation does), but many devices answer a
read that covers an unmapped address with "illegal data address" for the whole request, so
one gap in a meter's map would cost every value around it. Telegraf's default does the same.

`Decoder` turns one request's answer into named values: 16-bit registers are big-endian (the
protocol says so); `word_order` says which register of a 32/64-bit value comes first;
value = raw * scale + offset (a raw integer stays an integer when scale is 1 and offset 0).
NaN and infinities are refused: they are reported, not sent (the API takes no NaN).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.records import Value
from edge_agent.sources.modbus.config import (
    BIT_KINDS,
    WORDS,
    DataType,
    Kind,
    ModbusConfig,
    RegisterConfig,
)

MAX_REGISTERS = 125  # per read of holding or input registers (function codes 3 and 4)
MAX_BITS = 2000  # per read of coils or discrete inputs (function codes 1 and 2)
KIND_ORDER: tuple[Kind, ...] = ("holding", "input", "coil", "discrete")

_FORMATS: dict[str, str] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}


@dataclass(frozen=True)
class Request:
    """One read: `count` registers (or bits) of `kind` from `address`, and what they hold."""

    kind: Kind
    address: int
    count: int
    registers: tuple[RegisterConfig, ...]

    @property
    def span(self) -> str:
        """`holding 10-13` for messages."""
        last = self.address + self.count - 1
        where = f"{self.address}" if last == self.address else f"{self.address}-{last}"
        return f"{self.kind} {where}"


def limit(kind: Kind) -> int:
    """The most addresses one read of `kind` may cover."""
    return MAX_BITS if kind in BIT_KINDS else MAX_REGISTERS


def plan(registers: Iterable[RegisterConfig]) -> tuple[Request, ...]:
    """The fewest requests that read every register whole, grouping touching addresses."""
    requests: list[Request] = []
    regs = list(registers)
    for kind in KIND_ORDER:
        ordered = sorted((r for r in regs if r.kind == kind), key=lambda r: r.address)
        requests.extend(_plan_kind(kind, ordered))
    return tuple(requests)


def _plan_kind(kind: Kind, ordered: Sequence[RegisterConfig]) -> list[Request]:
    cap = limit(kind)
    requests: list[Request] = []
    members: list[RegisterConfig] = []
    start = end = 0  # the current request's [start, end)
    for reg in ordered:
        reg_end = reg.address + reg.width
        if members and reg.address <= end and max(end, reg_end) - start <= cap:
            members.append(reg)
            end = max(end, reg_end)
            continue
        if members:
            requests.append(Request(kind, start, end - start, tuple(members)))
        members, start, end = [reg], reg.address, reg_end
    if members:
        requests.append(Request(kind, start, end - start, tuple(members)))
    return requests


def encode(data_type: DataType, word_order: str, value: float | bool) -> list[int]:
    """The register words that hold `value` (what `Decoder` reads back, unscaled).

    For the test slave and tests; raises struct.error for a value the type cannot hold.
    """
    if data_type == "bool":
        return [1 if value else 0]
    number = value if data_type.startswith("float") else int(value)
    raw = struct.pack(_FORMATS[data_type], number)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return words[::-1] if word_order == "little" else words


_STRUCTS = {name: struct.Struct(fmt) for name, fmt in _FORMATS.items()}
_F32 = _STRUCTS["float32"]


def short_float32(value: float) -> float:
    """The shortest decimal that is the same float32: 230.4, not 230.39999389648438.

    A float32 holds 6 to 9 significant digits; sending the float64 it widens to would show
    digits the device never measured. Never longer as text than the value itself: a large
    whole number (99999997952.0) would gain a digit as 100000000000.0.
    """
    exact = _F32.pack(value)
    for digits in (6, 7, 8):
        short = float(f"{value:.{digits}g}")
        try:
            if _F32.pack(short) == exact and len(repr(short)) <= len(repr(value)):
                return short
        except OverflowError:  # rounded past the largest float32
            continue
    return value


@dataclass(frozen=True)
class Refused:
    """A value that was read but cannot be sent (NaN or infinite)."""

    name: str
    raw: float


class Decoder:
    """One request's answer -> named values, with the per-register work done up front.

    Registers that lie end to end in big word order (the common case) are read with one
    struct for the whole answer; overlapping ones or little word order, one at a time.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self._bits = request.kind in BIT_KINDS
        self._words = struct.Struct(f">{request.count}H")
        regs = request.registers
        self._names = tuple(r.name for r in regs)
        self._whole = _whole_struct(request)
        # (name, first word within the answer, struct, little word order)
        self._fields = [
            (
                r.name,
                r.address - request.address,
                _STRUCTS["uint16" if r.type == "bool" else r.type],
                r.word_order == "little" and WORDS[r.type] > 1,
            )
            for r in regs
        ]
        # Values that need more than unpacking: (name, is bool, is float32, scaled, scale,
        # offset); floats are here too, to be checked.
        self._finish = tuple(
            (
                r.name,
                r.type == "bool",
                r.type == "float32",
                r.type != "bool" and (r.scale != 1.0 or r.offset != 0.0),
                r.scale,
                r.offset,
            )
            for r in regs
            if r.type in ("bool", "float32", "float64") or r.scale != 1.0 or r.offset != 0.0
        )

    def decode(
        self, data: Sequence[int] | Sequence[bool]
    ) -> tuple[dict[str, Value], list[Refused]]:
        """Values by register name, and the values refused; `data` as the device sent it."""
        count = self.request.count
        if len(data) < count:
            raise ValueError(
                f"{self.request.span}: the answer holds {len(data)} values, expected {count}"
            )
        if self._bits:
            return {name: bool(data[at]) for name, at, *_ in self._fields}, []
        raw = self._words.pack(*data[:count])
        values: dict[str, Value]
        if self._whole is not None:
            values = dict(zip(self._names, self._whole.unpack(raw), strict=True))
        else:
            values = {name: _unpack(raw, at, fmt, little) for name, at, fmt, little in self._fields}
        refused: list[Refused] = []
        for name, is_bool, is_f32, scaled, scale, offset in self._finish:
            value: Any = values[name]  # a number: an int or a float from struct
            if is_bool:
                values[name] = value != 0
                continue
            if is_f32 and math.isfinite(value):
                value = short_float32(value)
            if scaled:
                value = value * scale + offset
            if type(value) is float and not math.isfinite(value):
                refused.append(Refused(name, value))
                del values[name]
                continue
            values[name] = value
        return values, refused


def _whole_struct(request: Request) -> struct.Struct | None:
    """One struct for every register of the request, if they lie end to end, big first."""
    codes = []
    at = request.address
    for reg in request.registers:
        if reg.address != at or (reg.word_order == "little" and WORDS[reg.type] > 1):
            return None
        codes.append(_FORMATS["uint16" if reg.type == "bool" else reg.type][1:])
        at += reg.width
    return struct.Struct(">" + "".join(codes))


def _unpack(raw: bytes, at: int, fmt: struct.Struct, little: bool) -> int | float:
    if not little:
        value: int | float = fmt.unpack_from(raw, 2 * at)[0]
        return value
    words = [raw[i : i + 2] for i in range(2 * at, 2 * at + fmt.size, 2)]
    value = fmt.unpack(b"".join(reversed(words)))[0]
    return value


def decoders(registers: Iterable[RegisterConfig]) -> tuple[Decoder, ...]:
    """A decoder per request of the plan."""
    return tuple(Decoder(request) for request in plan(registers))


def describe(config: ModbusConfig) -> str:
    """What `edge-agent check` says about a Modbus source: the wire, the unit, the plan."""
    count, requests = len(config.registers), len(plan(config.registers))
    return (
        f"modbus {config.transport} {config.framing}, unit {config.unit_id}, every "
        f"{config.poll_interval_s:g} s (timeout {config.timeout_s:g} s a request), "
        f"{count} register{'s' if count != 1 else ''} in {requests} "
        f"request{'s' if requests != 1 else ''} a poll"
    )


def describe_requests(config: ModbusConfig) -> list[str]:
    """One line per request of a poll: `input 342-343: energy_wh (float32 x 1000)`."""
    return [
        f"{req.span}: {', '.join(f'{r.name} ({describe_register(r)})' for r in req.registers)}"
        for req in plan(config.registers)
    ]


def describe_register(reg: RegisterConfig) -> str:
    """`uint32 low word first, x 10 + 2`: how a register's bits become its value."""
    how: str = reg.type
    if reg.word_order == "little" and WORDS[reg.type] > 1:
        how += " low word first"
    scaling = []
    if reg.scale != 1.0:
        scaling.append(f"x {reg.scale:g}")
    if reg.offset != 0.0:
        scaling.append(f"{'+' if reg.offset > 0 else '-'} {abs(reg.offset):g}")
    if scaling:
        how += ", " + " ".join(scaling)
    return how
