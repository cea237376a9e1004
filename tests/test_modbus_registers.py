"""The Modbus register plan, decoding and poll grid: pure functions, with Hypothesis."""

from __future__ import annotations

import itertools
import math
import struct
from typing import Literal, get_args

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge_agent.sources.modbus.config import (
    BIT_KINDS,
    WORDS,
    DataType,
    Kind,
    RegisterConfig,
    WordOrder,
)
from edge_agent.sources.modbus.registers import (
    MAX_BITS,
    MAX_REGISTERS,
    Decoder,
    Request,
    encode,
    plan,
    short_float32,
)
from edge_agent.sources.polling import PollGrid

_TYPES: list[DataType] = list(get_args(DataType))  # the keys of WORDS, in its order
_KINDS: list[Kind] = ["holding", "input", "coil", "discrete"]
_ORDERS: list[WordOrder] = ["big", "little"]


@st.composite
def registers(draw: st.DrawFn) -> list[RegisterConfig]:
    count = draw(st.integers(1, 300))
    dense = draw(st.booleans())  # dense maps make long contiguous runs that hit the limits
    top = 3000 if dense else 65_532
    out = []
    for i in range(count):
        kind = draw(st.sampled_from(_KINDS))
        data_type: DataType = "bool" if kind in BIT_KINDS else draw(st.sampled_from(_TYPES))
        address = draw(st.integers(0, top))
        out.append(RegisterConfig(f"r{i}", address, data_type, kind))
    return out


@given(registers())
def test_plan_covers_every_register_once_within_the_protocol_limits(
    regs: list[RegisterConfig],
) -> None:
    requests = plan(regs)
    seen = [r for req in requests for r in req.registers]
    assert sorted(r.name for r in seen) == sorted(r.name for r in regs)
    for req in requests:
        cap = MAX_BITS if req.kind in BIT_KINDS else MAX_REGISTERS
        assert 1 <= req.count <= cap
        for r in req.registers:
            assert r.kind == req.kind
            assert req.address <= r.address
            assert r.address + r.width <= req.address + req.count


@given(registers())
def test_plan_reads_no_address_that_no_register_holds(regs: list[RegisterConfig]) -> None:
    for req in plan(regs):
        held = {a for r in req.registers for a in range(r.address, r.address + r.width)}
        assert held == set(range(req.address, req.address + req.count))


@given(registers())
def test_plan_splits_only_where_a_gap_or_the_limit_forces_it(
    regs: list[RegisterConfig],
) -> None:
    requests = plan(regs)
    for before, after in itertools.pairwise(requests):
        if before.kind != after.kind:
            continue
        cap = MAX_BITS if before.kind in BIT_KINDS else MAX_REGISTERS
        first = after.registers[0]
        end = max(before.address + before.count, first.address + first.width)
        touches = first.address <= before.address + before.count
        assert not touches or end - before.address > cap


def test_contiguous_registers_of_one_kind_share_a_request() -> None:
    regs = [
        RegisterConfig("voltage", 0, "float32", "input"),
        RegisterConfig("current", 2, "float32", "input"),
        RegisterConfig("energy", 342, "float32", "input"),
        RegisterConfig("setpoint", 2, "uint16", "holding"),
    ]
    spans = [(r.kind, r.address, r.count) for r in plan(regs)]
    assert spans == [("holding", 2, 1), ("input", 0, 4), ("input", 342, 2)]


def test_125_registers_make_one_request_and_126_make_two() -> None:
    regs = [RegisterConfig(f"r{i}", i, "uint16") for i in range(126)]
    assert [r.count for r in plan(regs[:125])] == [125]
    assert [r.count for r in plan(regs)] == [125, 1]


def _value(data_type: str) -> st.SearchStrategy[float | bool]:
    if data_type == "bool":
        return st.booleans()
    if data_type.startswith("float"):
        width: Literal[32, 64] = 32 if data_type == "float32" else 64
        return st.floats(allow_nan=False, allow_infinity=False, width=width)
    bits = 16 * WORDS[data_type]
    if data_type.startswith("u"):
        return st.integers(0, 2**bits - 1)
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[DataType, WordOrder, float | bool]:
    data_type = draw(st.sampled_from(_TYPES))
    return data_type, draw(st.sampled_from(_ORDERS)), draw(_value(data_type))


def _decode(reg: RegisterConfig, words: list[int]) -> dict[str, object]:
    values, refused = Decoder(Request(reg.kind, reg.address, reg.width, (reg,))).decode(words)
    assert not refused
    return dict(values)


@given(typed_values())
def test_every_type_and_word_order_round_trips(
    case: tuple[DataType, WordOrder, float | bool],
) -> None:
    data_type, order, value = case
    reg = RegisterConfig("x", 0, data_type, word_order=order)
    words = encode(data_type, order, value)
    assert len(words) == WORDS[data_type] and all(0 <= w <= 0xFFFF for w in words)
    decoded = _decode(reg, words)["x"]
    if data_type == "float32":  # sent as the shortest decimal of the same float32
        assert struct.pack(">f", decoded) == struct.pack(">f", value)
    else:
        assert decoded == value and type(decoded) is type(value)


@pytest.mark.parametrize(
    ("data_type", "order", "words", "expected"),
    [
        ("int16", "big", [0xFFFE], -2),
        ("uint32", "big", [0x0001, 0x0002], 0x0001_0002),
        ("uint32", "little", [0x0001, 0x0002], 0x0002_0001),
        ("int32", "little", [0xFFFF, 0xFFFF], -1),
        ("float32", "big", [0x3F80, 0x0000], 1.0),
        ("float32", "little", [0x0000, 0x4348], 200.0),
        ("uint64", "big", [0x0102, 0x0304, 0x0506, 0x0708], 0x0102_0304_0506_0708),
        ("uint64", "little", [0x0102, 0x0304, 0x0506, 0x0708], 0x0708_0506_0304_0102),
        ("float64", "big", [0x4000, 0, 0, 0], 2.0),
        ("bool", "big", [7], True),
    ],
)
def test_words_are_big_endian_and_word_order_only_orders_words(
    data_type: DataType, order: WordOrder, words: list[int], expected: object
) -> None:
    reg = RegisterConfig("x", 0, data_type, word_order=order)
    assert _decode(reg, words)["x"] == expected


@given(st.integers(0, 0xFFFF), st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))
def test_scale_and_offset(raw: int, scale: float, offset: float) -> None:
    reg = RegisterConfig("x", 0, "uint16", scale=scale, offset=offset)
    if scale == 1.0 and offset == 0.0:
        assert _decode(reg, [raw])["x"] == raw
    else:
        assert _decode(reg, [raw])["x"] == raw * scale + offset


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("data_type", ["float32", "float64"])
def test_nan_and_infinity_are_refused_not_decoded(data_type: DataType, value: float) -> None:
    regs = (
        RegisterConfig("bad", 0, data_type),
        RegisterConfig("good", WORDS[data_type], "uint16"),
    )
    words = [*encode(data_type, "big", value), 42]
    values, refused = Decoder(Request("holding", 0, len(words), regs)).decode(words)
    assert values == {"good": 42}
    assert [r.name for r in refused] == ["bad"]


def test_bits_decode_by_position() -> None:
    regs = (RegisterConfig("a", 10, "bool", "coil"), RegisterConfig("b", 12, "bool", "coil"))
    values, _ = Decoder(Request("coil", 10, 3, regs)).decode([True, True, False, True])
    assert values == {"a": True, "b": False}


def test_a_short_answer_is_an_error_not_a_wrong_value() -> None:
    reg = RegisterConfig("x", 0, "uint32")
    with pytest.raises(ValueError, match="expected 2"):
        Decoder(Request("holding", 0, 2, (reg,))).decode([1])


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
@example(99999997952.0)  # a whole number whose 6 digits print longer: 100000000000.0
def test_short_float32_is_the_same_float32(value: float) -> None:
    short = short_float32(value)
    assert struct.pack(">f", short) == struct.pack(">f", value)
    assert len(repr(short)) <= len(repr(value))


def test_short_float32_drops_digits_the_device_never_measured() -> None:
    widened = struct.unpack(">f", struct.pack(">f", 230.4))[0]
    assert widened != 230.4 and short_float32(widened) == 230.4


def test_poll_grid_does_not_drift_and_never_bursts() -> None:
    grid = PollGrid(1.0, start=100.0)
    assert grid.delay(100.0) == 0.0
    assert grid.advance(100.3) == 0 and grid.next_at == 101.0  # on time: next grid point
    assert grid.advance(103.5) == 2 and grid.next_at == 104.0  # overran 102 and 103
    assert grid.delay(103.5) == 0.5  # waits for the grid, no catch-up polls
    assert grid.advance(105.0) == 1 and grid.next_at == 106.0  # ended exactly on 105
