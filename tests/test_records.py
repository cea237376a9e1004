"""RecordBuilder: the records, and the text and signature it works out in advance.

The buffer stores a reading's precomputed `text` and `signature` as they are, so each must be
exactly what it would compute from the record itself.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.buffer import _ENCODER, signature
from edge_agent.clock import SecondStamps, utc_stamp
from edge_agent.records import Reading, RecordBuilder, with_field

STAMP = "2026-11-26T12:00:00.123Z"

names = st.text(min_size=1, max_size=12)
values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
tag_maps = st.dictionaries(names, st.text(max_size=12), max_size=4)


def check(reading: Reading) -> None:
    """A precomputed text and signature equal what the buffer would compute."""
    if reading.text is not None:
        assert reading.text == _ENCODER.encode(reading.record)
    if reading.signature is not None:
        assert reading.signature == signature(reading.record)


@given(
    st.dictionaries(names, values, min_size=1, max_size=5),
    tag_maps,
    st.one_of(st.none(), st.text(max_size=8)),
    st.dictionaries(names, st.text(max_size=12), max_size=3),
    st.sampled_from(["long", "wide"]),
)
def test_precomputed_text_and_signature_match_the_record(
    vals: dict[str, Any],
    tags: dict[str, str],
    device_id: str | None,
    fields: dict[str, str],
    shape: Any,
) -> None:
    builder = RecordBuilder("1", shape, tags, device_id)
    readings = builder.build(vals, STAMP, fields)
    for reading in readings:
        check(reading)
        # Tags, then fields, win over the values.
        assert {**tags, **fields}.items() <= reading.record.items()
    if shape == "long":
        assert [r.record["metric"] for r in readings] == list(vals)
        assert [r.record["value"] for r in readings] == list(vals.values())


def test_plain_long_records_carry_text_and_signature() -> None:
    builder = RecordBuilder("1", "long", {"site": 'Zürich "A"'}, "gw-1")
    first, second = builder.build({"t": 21.5, "ok": True}, STAMP, {"line": "l1"})
    assert first.record == {
        "timestamp": STAMP,
        "metric": "t",
        "value": 21.5,
        "site": 'Zürich "A"',
        "device_id": "gw-1",
        "line": "l1",
    }
    assert first.text is not None and second.text is not None
    assert first.signature != second.signature  # number and boolean values
    check(first)
    check(second)


@pytest.mark.parametrize("tag", ["timestamp", "metric", "value"])
def test_a_tag_named_like_a_long_key_replaces_it_and_is_encoded_whole(tag: str) -> None:
    builder = RecordBuilder("1", "long", {tag: "x"}, None)
    [reading] = builder.build({"t": 1}, STAMP)
    assert reading.record[tag] == "x" and list(reading.record)[:3] == [
        "timestamp",
        "metric",
        "value",
    ]
    check(reading)


def test_a_field_named_like_a_tag_wins_and_is_encoded_whole() -> None:
    builder = RecordBuilder("1", "long", {"line": "tag"}, None)
    [reading] = builder.build({"t": 1}, STAMP, {"line": "topic"})
    assert reading.record["line"] == "topic"
    check(reading)


def test_a_reading_made_from_its_text_decodes_the_record_only_when_asked() -> None:
    text = '{"timestamp":"2025-01-01T00:00:00.000Z","metric":"t","value":1.5}'
    reading = Reading("1", None, None, "metric:s,timestamp:s,value:n", text)
    assert reading._record is None
    assert reading.record == {"timestamp": "2025-01-01T00:00:00.000Z", "metric": "t", "value": 1.5}
    assert reading == Reading("1", reading.record)  # text and signature computed alike
    assert reading.with_mono(2.0).mono == 2.0 and reading.with_mono(2.0).text == text
    with pytest.raises(TypeError):
        Reading("1", None, None, None, text)
    with pytest.raises(ValueError):
        Reading("1", {"t": math.nan})


def test_a_value_json_cannot_carry_is_refused_as_before() -> None:
    builder = RecordBuilder("1", "long", {}, None)
    with pytest.raises(ValueError):
        builder.build({"t": math.nan}, STAMP)


@given(
    st.dictionaries(names, values, min_size=1, max_size=3),
    tag_maps,
    names,
    st.text(max_size=24),
    st.one_of(st.none(), st.floats(allow_nan=False)),
)
def test_with_field_keeps_text_and_signature_right(
    vals: dict[str, Any], tags: dict[str, str], field: str, value: str, mono: float | None
) -> None:
    for reading in RecordBuilder("1", "long", tags, None).build(vals, STAMP):
        added = with_field(reading, field, value, mono)
        assert added.record == {**reading.record, field: value}
        assert added.mono == mono
        check(added)


@given(st.lists(st.floats(min_value=0, max_value=4_102_444_799.999), min_size=1, max_size=30))
def test_second_stamps_equal_utc_stamp(times: list[float]) -> None:
    stamps = SecondStamps()
    for t in sorted(times) + times:  # in order, as received, and out of order
        assert stamps(t) == utc_stamp(t)
