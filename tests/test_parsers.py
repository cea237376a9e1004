"""Tests for edge_agent.parsers: examples for every rule and message, then Hypothesis properties."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import string
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import ParseError, SourceError
from edge_agent.parsers import (
    FramerStats,
    LineFormat,
    LineFramer,
    PayloadKind,
    Value,
    _flat_json_object,
    _parse_payload_fully,
    coerce,
    make_line_parser,
    parse_payload,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REGEX = r"T=(?P<temperature>\S+)(?: H=(?P<humidity>\S+))?"
FORMATS = {
    "json": LineFormat("json"),
    "kv": LineFormat("kv"),
    "csv": LineFormat("csv", columns=("t", "h", "p")),
    "regex": LineFormat("regex", pattern=REGEX),
    "number": LineFormat("number", metric="level"),
}


def parse(kind: str, line: str) -> dict[str, Value]:
    return make_line_parser(FORMATS[kind])(line)


def parse_error(call: Callable[[], object]) -> str:
    with pytest.raises(ParseError) as info:
        call()
    return str(info.value)


# --- coerce --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("22", 22),
        ("-7", -7),
        ("+3", 3),
        ("22.5", 22.5),
        ("-1e3", -1000.0),
        ("1E+2", 100.0),
        (".5", 0.5),
        ("1.", 1.0),
        (" 22 ", 22),
        ("0x1F", "0x1F"),
        ("1_000", "1_000"),
        ("", ""),
        ("  ", ""),
        ("true", "true"),
        ("false", "false"),
        ("1e", "1e"),
        ("-", "-"),
        ("١٢", "١٢"),
        ("ok", "ok"),
    ],
)
def test_coerce(text: str, expected: Value) -> None:
    value = coerce(text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "+infinity", "1e999"])
def test_coerce_refuses_non_finite_numbers(text: str) -> None:
    message = parse_error(lambda: coerce(text))
    assert "finite" in message


def test_coerce_refuses_integers_python_cannot_convert() -> None:
    assert "too many digits" in parse_error(lambda: coerce("9" * 5000))


def test_parse_error_is_a_source_error() -> None:
    assert issubclass(ParseError, SourceError)


# --- json lines ----------------------------------------------------------------------------


def test_json_keeps_types_and_flattens_nested_objects() -> None:
    line = '{"t": 22, "h": 40.5, "ok": true, "id": "a1", "meta": {"a": 1, "b": {"c": "x"}}}'
    assert parse("json", line) == {
        "t": 22,
        "h": 40.5,
        "ok": True,
        "id": "a1",
        "meta.a": 1,
        "meta.b.c": "x",
    }
    assert type(parse("json", '{"t": 22}')["t"]) is int


def test_json_skips_null_and_strips_line_endings() -> None:
    assert parse("json", '  {"t": 1, "h": null}\r') == {"t": 1}


def test_json_strings_stay_strings() -> None:
    assert parse("json", '{"t": "22"}') == {"t": "22"}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"t": [1, 2]}', "'t' is an array"),
        ('{"a": {"b": []}}', "'a.b' is an array"),
        ("42", "must be an object, not a number"),
        ('"x"', "not a string"),
        ("[1]", "not an array"),
        ("true", "not a boolean"),
        ("null", "not null"),
        ("{t: 1}", "not valid JSON"),
        ('{"t": 1', "not valid JSON"),
        ("{}", "no values"),
        ('{"t": null}', "no values"),
        ('{"t": NaN}', "'t' is nan"),
        ('{"a": {"t": Infinity}}', "'a.t' is inf"),
        ('{"t": 1e999}', "'t' is inf"),
        ("", "empty"),
        ("   \r", "empty"),
    ],
)
def test_json_errors(line: str, expected: str) -> None:
    message = parse_error(lambda: parse("json", line))
    assert message.startswith("json line: ")
    assert expected in message


def test_json_refuses_deep_nesting_without_recursion_error() -> None:
    deep = '{"a": ' * 40 + "1" + "}" * 40
    assert "nested deeper" in parse_error(lambda: parse("json", deep))
    very_deep = "[" * 100_000 + "]" * 100_000
    assert "JSON" in parse_error(lambda: parse("json", very_deep))


def test_json_refuses_integers_python_cannot_convert() -> None:
    assert "not valid JSON" in parse_error(lambda: parse("json", '{"t": ' + "9" * 5000 + "}"))


# --- kv lines ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "temperature=22.5 humidity=40",
        "temperature:22.5,humidity:40",
        "temperature=22.5, humidity=40",
        "temperature=22.5;humidity=40",
        "\ttemperature=22.5   humidity=40 \r",
    ],
)
def test_kv_separators(line: str) -> None:
    assert parse("kv", line) == {"temperature": 22.5, "humidity": 40}


def test_kv_values_and_keys() -> None:
    assert parse("kv", "s=ok on=true x=0x1F time=12:30 a.b-c_1=2 _x=+3") == {
        "s": "ok",
        "on": "true",
        "x": "0x1F",
        "time": "12:30",
        "a.b-c_1": 2,
        "_x": 3,
    }


def test_kv_last_duplicate_wins_and_empty_values_are_skipped() -> None:
    assert parse("kv", "t=1 t=2 h=") == {"t": 2}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("t=1 humidity", "pair 'humidity' has no '=' or ':'"),
        ("1t=2", "bad key '1t'"),
        ("=2", "bad key ''"),
        ("t$=2", "bad key 't$'"),
        ("t= h=", "no values"),
        ("t=nan", "the value of 't' is nan"),
        ("t=1e999", "the value of 't' is inf"),
        ("", "empty"),
    ],
)
def test_kv_errors(line: str, expected: str) -> None:
    message = parse_error(lambda: parse("kv", line))
    assert message.startswith("kv line: ")
    assert expected in message


def test_kv_bad_key_message_says_what_a_key_may_contain() -> None:
    assert "starts with a letter or '_'" in parse_error(lambda: parse("kv", "9=1"))


# --- csv lines -----------------------------------------------------------------------------


def test_csv_columns_strip_and_quotes() -> None:
    assert parse("csv", ' 21.5 , 40 ,"ok, fine"') == {"t": 21.5, "h": 40, "p": "ok, fine"}


def test_csv_empty_fields_are_skipped() -> None:
    assert parse("csv", "21,,") == {"t": 21}


def test_csv_other_delimiter() -> None:
    parser = make_line_parser(LineFormat("csv", columns=("a", "b"), delimiter=";"))
    assert parser("1;2.5") == {"a": 1, "b": 2.5}


def test_csv_whitespace_delimiter_keeps_empty_fields_at_the_ends() -> None:
    parser = make_line_parser(LineFormat("csv", columns=("a", "b", "c"), delimiter="\t"))
    assert parser("\t2\t\r") == {"b": 2}
    assert parser(" 1 \t \t 3 ") == {"a": 1, "c": 3}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("1,2", "expected 3 fields (t, h, p), got 2"),
        ("1,2,3,4", "expected 3 fields (t, h, p), got 4"),
        (",,", "no values"),
        ("1,nan,3", "the value of 'h' is nan"),
        ("1,2\n3,4", "not valid CSV"),
    ],
)
def test_csv_errors(line: str, expected: str) -> None:
    message = parse_error(lambda: parse("csv", line))
    assert message.startswith("csv line: ")
    assert expected in message


# --- regex lines ---------------------------------------------------------------------------


def test_regex_named_groups_and_search() -> None:
    assert parse("regex", "sensor 3: T=21.5 H=40") == {"temperature": 21.5, "humidity": 40}


def test_regex_groups_that_did_not_participate_are_skipped() -> None:
    assert parse("regex", "T=21.5") == {"temperature": 21.5}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("temperature 21", "does not match the configured pattern"),
        ("T=inf", "the value of 'temperature' is inf"),
    ],
)
def test_regex_errors(line: str, expected: str) -> None:
    message = parse_error(lambda: parse("regex", line))
    assert message.startswith("regex line: ")
    assert expected in message


def test_regex_line_with_only_empty_groups_has_no_values() -> None:
    parser = make_line_parser(LineFormat("regex", pattern=r"T=(?P<t>\d*)"))
    assert "no values" in parse_error(lambda: parser("T="))


# --- number lines --------------------------------------------------------------------------


def test_number_line() -> None:
    assert parse("number", " 42\r") == {"level": 42}
    assert parse("number", "-1.5e2") == {"level": -150.0}
    assert make_line_parser(LineFormat("number"))("7") == {"value": 7}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("42 cm", "not a number"),
        ("0x1F", "not a number"),
        ("true", "not a number"),
        ("nan", "the value of 'level' is nan"),
        ("", "empty"),
    ],
)
def test_number_errors(line: str, expected: str) -> None:
    message = parse_error(lambda: parse("number", line))
    assert message.startswith("number line: ")
    assert expected in message


# --- messages ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FORMATS))
def test_error_quotes_at_most_60_characters_of_the_line(kind: str) -> None:
    line = "x" * 10_000 + "\x00"
    message = parse_error(lambda: parse(kind, line))
    assert "'" + "x" * 60 + "'" in message
    assert "x" * 61 not in message
    assert len(message) < 250


def test_error_quotes_short_lines_whole() -> None:
    assert parse_error(lambda: parse("number", "abc")) == "number line: not a number: 'abc'"


# --- format validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (LineFormat("csv"), 'columns = ["temperature", "humidity"]'),
        (LineFormat("csv", columns=("a", "")), "non-empty names"),
        (LineFormat("csv", columns=("a", "a")), "distinct"),
        (LineFormat("csv", columns=("a",), delimiter=";;"), "one character"),
        (LineFormat("csv", columns=("a",), delimiter='"'), "one character"),
        (LineFormat("regex"), "needs a pattern with named groups"),
        (LineFormat("regex", pattern="T=(\\d+"), "does not compile"),
        (LineFormat("regex", pattern="T=(\\d+)"), "has no named group"),
        (LineFormat("number", metric=""), 'metric = "temperature"'),
        (LineFormat("kv", columns=("a",)), "'columns' does not apply to the 'kv' format"),
        (LineFormat("json", pattern="x"), "'pattern' does not apply"),
        (LineFormat("json", delimiter=";"), "'delimiter' does not apply"),
        (LineFormat("csv", columns=("a",), metric="m"), "'metric' does not apply"),
        # A format that does not exist, on purpose:
        (LineFormat("yaml"), "one of 'json', 'kv'"),  # type: ignore[arg-type]
    ],
)
def test_bad_formats_are_refused_when_the_parser_is_made(fmt: LineFormat, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        make_line_parser(fmt)
    assert not isinstance(info.value, ParseError)
    assert expected in str(info.value)


# --- payloads ------------------------------------------------------------------------------


def test_payload_json_object_and_bare_number() -> None:
    assert parse_payload(b'{"t": 1, "m": {"h": 2.5}}', "json") == {"t": 1, "m.h": 2.5}
    assert parse_payload(b"21.5", "json") == {"value": 21.5}
    assert parse_payload(b" 21 \n", "json", metric="temperature") == {"temperature": 21}
    assert parse_payload(b'\xef\xbb\xbf{"t": 1}', "json") == {"t": 1}


def test_payload_number_and_kv() -> None:
    assert parse_payload(b"21.5\r\n", "number") == {"value": 21.5}
    assert parse_payload(b"21", "number", metric="t") == {"t": 21}
    assert parse_payload(b"t=1,h=2", "kv") == {"t": 1, "h": 2}


@pytest.mark.parametrize(
    ("payload", "kind", "expected"),
    [
        (b"true", "json", "must be an object or a number, not a boolean"),
        (b'"21"', "json", "not a string"),
        (b"[1, 2]", "json", "not an array"),
        (b"NaN", "json", "the value of 'value' is nan"),
        (b'{"t": [1]}', "json", "'t' is an array"),
        (b"{", "json", "not valid JSON"),
        (b"", "json", "empty"),
        (b"\xff\xfe", "json", "not UTF-8"),
        (b"warm", "number", "not a number"),
        (b"inf", "number", "is inf"),
        (b"t", "kv", "has no '=' or ':'"),
    ],
)
def test_payload_errors(payload: bytes, kind: PayloadKind, expected: str) -> None:
    message = parse_error(lambda: parse_payload(payload, kind))
    assert message.startswith(f"{kind} payload: ")
    assert expected in message


def test_payload_error_names_the_metric() -> None:
    assert "'level'" in parse_error(lambda: parse_payload(b"nan", "number", metric="level"))


def test_payload_unknown_kind() -> None:
    with pytest.raises(ValueError, match="one of 'json', 'number', 'kv'"):
        parse_payload(b"1", "csv")  # type: ignore[arg-type]  # a kind payloads lack, on purpose


# --- properties of the parsers -------------------------------------------------------------


def assert_values(values: dict[str, Value]) -> None:
    assert values
    for key, value in values.items():
        assert isinstance(key, str)
        assert isinstance(value, int | float | str | bool)
        if isinstance(value, float):
            assert math.isfinite(value)


def parses_or_refuses(call: Callable[[], dict[str, Value]]) -> None:
    try:
        values = call()
    except ParseError:
        return
    assert_values(values)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_documents = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)
line_text = st.text(max_size=120) | st.text(alphabet='0123456789.,;:=+-eE \t"\r{}[]', max_size=40)


@PROPERTY
@given(kind=st.sampled_from(list(FORMATS)), line=line_text)
def test_any_line_gives_values_or_parse_error(kind: str, line: str) -> None:
    parses_or_refuses(lambda: parse(kind, line))


@PROPERTY
@given(document=json_documents)
def test_any_json_document_gives_values_or_parse_error(document: object) -> None:
    line = json.dumps(document)
    parses_or_refuses(lambda: parse("json", line))
    parses_or_refuses(lambda: parse_payload(line.encode(), "json"))


@PROPERTY
@given(payload=st.binary(max_size=80), kind=st.sampled_from(["json", "number", "kv"]))
def test_any_payload_gives_values_or_parse_error(payload: bytes, kind: PayloadKind) -> None:
    parses_or_refuses(lambda: parse_payload(payload, kind))


flat_objects = st.dictionaries(
    st.text(max_size=5),
    json_scalars | st.dictionaries(st.text(max_size=3), json_scalars),
    max_size=4,
)


@PROPERTY
@given(
    document=flat_objects, prefix=st.sampled_from(["", " ", "\ufeff"]), ensure_ascii=st.booleans()
)
def test_the_fast_json_path_gives_what_the_full_path_gives(
    document: dict[str, object], prefix: str, ensure_ascii: bool
) -> None:
    payload = (prefix + json.dumps(document, ensure_ascii=ensure_ascii)).encode()
    fast = _flat_json_object(payload)
    try:
        full: dict[str, Value] | None = _parse_payload_fully(payload, "json")
    except ParseError:
        full = None
    if fast is not None:  # it may leave a payload to the full path, never answer differently
        assert fast == full
        assert [type(v) for v in fast.values()] == [type(v) for v in full.values()]
    if prefix == "" and all(type(v) in (int, str, bool) for v in document.values()) and document:
        assert fast is not None, "a flat object of ints, strings and booleans takes the fast path"


@PROPERTY
@given(payload=st.binary(max_size=40).map(lambda b: b"{" + b))
def test_the_fast_json_path_never_accepts_what_the_full_path_refuses(payload: bytes) -> None:
    fast = _flat_json_object(payload)
    if fast is not None:
        assert _parse_payload_fully(payload, "json") == fast


keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,10}", fullmatch=True)
numbers = st.integers(-(10**12), 10**12) | st.floats(allow_nan=False, allow_infinity=False)


@PROPERTY
@given(
    pairs=st.lists(st.tuples(keys, numbers), min_size=1, max_size=8),
    pair_sep=st.sampled_from([" ", ",", ";", ", ", " ; ", "\t"]),
    kv_sep=st.sampled_from(["=", ":"]),
)
def test_kv_round_trip(pairs: list[tuple[str, int | float]], pair_sep: str, kv_sep: str) -> None:
    line = pair_sep.join(f"{key}{kv_sep}{number!r}" for key, number in pairs)
    values = parse("kv", line)
    assert values == dict(pairs)
    for key, number in dict(pairs).items():
        assert type(values[key]) is type(number)


csv_text = st.text(alphabet=string.ascii_letters + ' ,;"', max_size=10).filter(
    lambda text: text.strip().lower().lstrip("+-") not in {"nan", "inf", "infinity"}
)


@PROPERTY
@given(
    row=st.lists(numbers | csv_text, min_size=1, max_size=6),
    delimiter=st.sampled_from([",", ";", "\t", "|"]),
)
def test_csv_round_trip(row: list[int | float | str], delimiter: str) -> None:
    columns = tuple(f"c{index}" for index in range(len(row)))
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter).writerow(row)
    line = out.getvalue().rstrip("\r\n")
    parser = make_line_parser(LineFormat("csv", columns=columns, delimiter=delimiter))
    expected = {column: coerce(str(cell)) for column, cell in zip(columns, row, strict=True)}
    expected = {column: value for column, value in expected.items() if value != ""}
    if not expected:
        assert "no values" in parse_error(lambda: parser(line))
        return
    assert parser(line) == expected


# --- LineFramer ----------------------------------------------------------------------------


def test_framer_line_endings() -> None:
    framer = LineFramer()
    assert framer.feed(b"a=1\nb=2\r\nc=3\rd=4\n") == ["a=1", "b=2", "c=3", "d=4"]
    assert framer.stats == FramerStats(lines=4)


def test_framer_joins_lines_across_chunks_and_holds_partial_lines() -> None:
    framer = LineFramer()
    assert framer.feed(b"t=2") == []
    assert framer.feed(b"1.5\r") == ["t=21.5"]
    assert framer.feed(b"\nh=4") == []
    assert framer.pending_bytes == 3
    assert framer.feed(b"0\n") == ["h=40"]


def test_framer_drops_empty_lines_and_nul_padding() -> None:
    framer = LineFramer()
    assert framer.feed(b"\n\n\r\n  \n\x00\x00\x00t=1\x00\n\x00\n") == ["t=1"]
    assert framer.stats.lines == 1


def test_framer_skips_overlong_lines_counting_each_once() -> None:
    framer = LineFramer(max_line_bytes=8)
    assert framer.feed(b"12345678\n123456789\nok\n") == ["12345678", "ok"]
    assert framer.feed(b"x" * 5) == []
    assert framer.feed(b"x" * 5) == []
    assert framer.pending_bytes == 0
    assert framer.feed(b"x" * 1000) == []
    assert framer.feed(b"xx\r\nnext\n") == ["next"]
    assert framer.stats.overlong == 2


def test_framer_counts_undecodable_lines() -> None:
    framer = LineFramer()
    assert framer.feed(b"\xff\xfe=1\nt=\xc3\xa9\n") == ["t=é"]
    assert framer.stats == FramerStats(lines=1, undecodable=1)


def test_framer_other_encoding() -> None:
    assert LineFramer(encoding="latin-1").feed(b"t=\xe9\n") == ["t=é"]


def test_framer_reset_drops_a_partial_line_once() -> None:
    framer = LineFramer(max_line_bytes=4)
    framer.feed(b"t=2")
    assert framer.reset() == 1
    assert framer.reset() == 0
    assert framer.feed(b"1\n") == ["1"]
    framer.feed(b"too long")
    assert framer.reset() == 0  # already counted as overlong
    assert framer.feed(b"ok\n") == ["ok"]
    assert framer.stats == FramerStats(lines=2, overlong=1, partial_dropped=1)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_line_bytes": 0}, "at least 1"),
        ({"encoding": "no-such-codec"}, "unknown encoding"),
        ({"encoding": "utf-16"}, "line endings"),
    ],
)
def test_framer_refuses_bad_settings(kwargs: dict[str, object], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        LineFramer(**kwargs)  # type: ignore[arg-type]  # bad settings, on purpose


def test_framer_is_linear() -> None:
    line = b"temperature=21.5 humidity=40.25 p=1\r\n"
    stream = line * (64 * 1024 // len(line))
    framer = LineFramer()
    started = time.perf_counter()
    for _ in range(20):
        lines = framer.feed(stream)
    elapsed = time.perf_counter() - started
    assert len(lines) == len(stream) // len(line)
    # 1.3 MB in total; a quadratic framer takes seconds, a linear one milliseconds.
    assert elapsed < 1.0


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


stream_pieces = st.lists(
    st.sampled_from([b"t=1", b"h=22.5", b"\n", b"\r\n", b"\r", b"\x00", b"\xff", b" ", b"x" * 7])
    | st.binary(max_size=12),
    max_size=40,
).map(b"".join)


@PROPERTY
@given(data=stream_pieces, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_framer_chunking_does_not_change_lines(data: bytes, cuts: list[int]) -> None:
    whole = LineFramer(max_line_bytes=10)
    pieces = LineFramer(max_line_bytes=10)
    expected = whole.feed(data)
    got = [line for chunk in chunked(data, cuts) for line in pieces.feed(chunk)]
    assert got == expected
    assert pieces.stats == whole.stats
    assert pieces.pending_bytes == whole.pending_bytes


@PROPERTY
@given(
    data=stream_pieces,
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    limit=st.integers(1, 16),
)
def test_framer_memory_is_bounded_and_overlong_lines_never_appear(
    data: bytes, cuts: list[int], limit: int
) -> None:
    framer = LineFramer(max_line_bytes=limit)
    for chunk in chunked(data, cuts):
        for line in framer.feed(chunk):
            assert line
            assert len(line.encode()) <= limit
        assert framer.pending_bytes <= limit
