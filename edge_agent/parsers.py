"""Turning raw sensor input into named values: this module owns every rule for reading text.

Three things live here, and nothing else in the agent interprets sensor text:

- `LineFramer` cuts the byte stream of a serial port into complete text lines, with bounded
  memory whatever the device sends.
- `make_line_parser` turns one line into a dict of named values, in one of the `LineFormat`
  kinds (json, kv, csv, regex, number); `parse_payload` does the same for an MQTT payload.
- `coerce` is the one rule for turning a text token into a JSON value: numbers become JSON
  numbers, everything else stays a string.

A line or payload that cannot be read raises `ParseError`, whose message says what was wrong and
quotes at most about 60 characters of the input. A bad `LineFormat` raises `ValueError` once, when
the parser is made, with a message saying what to put in the configuration.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from edge_agent.errors import ParseError

Value = int | float | str | bool
Values = dict[str, Value]
LineKind = Literal["json", "kv", "csv", "regex", "number"]
PayloadKind = Literal["json", "number", "kv"]

__all__ = [
    "FramerStats",
    "LineFormat",
    "LineFramer",
    "LineKind",
    "PayloadKind",
    "Value",
    "coerce",
    "make_line_parser",
    "parse_payload",
]

_EXCERPT_CHARS = 60
_TOKEN_CHARS = 24
# Sensors send flat records; a deeper object is almost surely a mistake, and the cap keeps
# flattening from ever running into Python's recursion limit.
_MAX_JSON_DEPTH = 32
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c"

# Only plain decimal notation counts as a number: float() would also accept "1_000", non-ASCII
# digits and surrounding whitespace, which a sensor never means as a number.
_NUMBER = re.compile(
    r"(?P<int>[+-]?[0-9]+)"
    r"|(?P<float>[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<nonfinite>[+-]?(?:nan|inf|infinity))",
    re.IGNORECASE,
)
_KV_SPLIT = re.compile(r"[\s,;]+")
_KV_PAIR = re.compile(r"([^=:]*)[=:](.*)", re.DOTALL)
_KV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class LineFormat:
    """How the lines of one source are written; validated by `make_line_parser`."""

    kind: LineKind
    columns: tuple[str, ...] = ()  # csv: the column names, in order; required for csv
    delimiter: str = ","  # csv
    pattern: str | None = None  # regex: must have at least one named group
    metric: str = "value"  # number: the name of the single value


def coerce(text: str) -> Value:
    """Return `text` (stripped) as an int or float when it is a decimal number, else as a string.

    "22" -> 22, "22.5" / "-1e3" -> float, "+3" -> 3; "0x1F", "1_000" and "true" stay strings.
    Raises `ParseError` for "nan", "inf" and numbers too large for a float: JSON cannot carry them.
    """
    return _coerce(text.strip(), None)


def make_line_parser(fmt: LineFormat) -> Callable[[str], dict[str, Value]]:
    """Validate `fmt` once and return a function that reads one line in that format.

    The returned function raises `ParseError` or returns a non-empty dict of named values.
    Raises `ValueError` when `fmt` is unusable; the message says what to put in the config.
    """
    parse = _text_parser(fmt)
    what = f"{fmt.kind} line"
    strip_chars = None
    if fmt.kind == "csv" and fmt.delimiter.isspace():
        # A tab or space delimiter at either end separates an empty field: keep it.
        strip_chars = _ASCII_WHITESPACE.replace(fmt.delimiter, "")

    def parse_line(line: str) -> dict[str, Value]:
        return _run(parse, line.strip(strip_chars), what)

    return parse_line


def parse_payload(
    payload: bytes | bytearray, kind: PayloadKind, metric: str | None = None
) -> dict[str, Value]:
    """Read one MQTT payload into named values; raises `ParseError`.

    json: an object, read like a json line, or a bare JSON number; number: one number as text;
    kv: pairs, read like a kv line. A lone number is named `metric`, or "value" when it is None.
    """
    if kind == "json":
        values = _flat_json_object(payload)
        if values is not None:
            return values
    return _parse_payload_fully(payload, kind, metric)


def _parse_payload_fully(
    payload: bytes | bytearray, kind: PayloadKind, metric: str | None = None
) -> dict[str, Value]:
    name = "value" if metric is None else metric
    what = f"{kind} payload"
    try:
        # utf-8-sig: some firmwares prefix a byte order mark, which json.loads would refuse.
        text = payload.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise ParseError(f"{what}: not UTF-8 ({exc.reason}): {_excerpt(bytes(payload))}") from None
    if kind == "json":
        return _run(lambda t: _parse_json(t, name), text, what)
    if kind == "number":
        return _run(lambda t: _parse_number(t, name), text, what)
    if kind == "kv":
        return _run(_parse_kv, text, what)
    raise ValueError(f"unknown payload format {kind!r}; use one of 'json', 'number', 'kv'")


# The C scanner behind json.loads: (document, end index), StopIteration when nothing parses.
_SCAN_JSON: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _flat_json_object(payload: bytes | bytearray) -> Values | None:
    """The common payload, read quickly: a JSON object of numbers, strings and booleans.

    None for anything else (nested, null, NaN, a BOM, not UTF-8, not JSON...): the full path
    reads it, or says what is wrong. Gives what the full path would give.
    """
    if payload[:1] != b"{":
        return None
    try:
        text = payload.decode()
        document, end = _SCAN_JSON(text, 0)  # json.loads without its Python-level layers
    except (ValueError, RecursionError, StopIteration):
        return None
    if end != len(text) or not isinstance(document, dict) or not document:
        return None
    for value in document.values():
        kind = type(value)
        if kind is float:
            if value - value != 0.0:  # NaN or infinity
                return None
        elif kind is not int and kind is not str and kind is not bool:
            return None
    return document


def _run(parse: Callable[[str], Values], text: str, what: str) -> Values:
    """Call `parse` on stripped `text`, giving every failure the same context."""
    try:
        if not text:
            raise ParseError("empty")
        values = parse(text)
        if not values:
            raise ParseError("no values (every field was empty or null)")
    except ParseError as exc:
        raise ParseError(f"{what}: {exc}: {_excerpt(text)}") from None
    return values


def _text_parser(fmt: LineFormat) -> Callable[[str], Values]:
    _check_unused_options(fmt)
    if fmt.kind == "json":
        return lambda text: _parse_json(text, None)
    if fmt.kind == "kv":
        return _parse_kv
    if fmt.kind == "csv":
        return _csv_parser(fmt.columns, fmt.delimiter)
    if fmt.kind == "regex":
        return _regex_parser(fmt.pattern)
    if fmt.kind == "number":
        return _number_parser(fmt.metric)
    raise ValueError(
        f"unknown line format {fmt.kind!r}; set format to one of 'json', 'kv', 'csv', "
        "'regex', 'number'"
    )


def _check_unused_options(fmt: LineFormat) -> None:
    # An option set for the wrong kind is a configuration mistake that would otherwise be
    # silently ignored, e.g. `pattern` left over after switching a source from regex to csv.
    unused = {
        "columns": fmt.kind != "csv" and fmt.columns != (),
        "delimiter": fmt.kind != "csv" and fmt.delimiter != ",",
        "pattern": fmt.kind != "regex" and fmt.pattern is not None,
        "metric": fmt.kind != "number" and fmt.metric != "value",
    }
    for option, is_unused in unused.items():
        if is_unused:
            raise ValueError(
                f"{option!r} does not apply to the {fmt.kind!r} format; remove it, "
                "or change the format"
            )


# --- the formats ---------------------------------------------------------------------------


def _parse_json(text: str, bare_number_name: str | None) -> Values:
    """An object, flattened; a bare number too when `bare_number_name` names it."""
    try:
        document = json.loads(text)
    except RecursionError:
        raise ParseError("JSON nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, and also the int digit limit of Python's int().
        raise ParseError(f"not valid JSON ({_first_line(str(exc))})") from None
    if isinstance(document, dict):
        values: Values = {}
        _flatten_into(values, "", document, 1)
        return values
    is_number = isinstance(document, int | float) and not isinstance(document, bool)
    if is_number and bare_number_name is not None:
        return {bare_number_name: _finite(bare_number_name, document)}
    wanted = "an object" if bare_number_name is None else "an object or a number"
    raise ParseError(f"JSON must be {wanted}, not {_json_type(document)}")


def _flatten_into(values: Values, prefix: str, obj: dict[str, Any], depth: int) -> None:
    for key, item in obj.items():
        name = prefix + key
        if item is None:
            continue
        if isinstance(item, dict):
            if depth >= _MAX_JSON_DEPTH:
                raise ParseError(f"objects nested deeper than {_MAX_JSON_DEPTH} levels")
            _flatten_into(values, name + ".", item, depth + 1)
        elif isinstance(item, list):
            raise ParseError(
                f'{_quote(name)} is an array; send one value per key, e.g. {{"t1": 20, "t2": 21}}'
            )
        elif isinstance(item, float):
            values[name] = _finite(name, item)
        else:
            values[name] = item


def _parse_kv(text: str) -> Values:
    values: Values = {}
    for pair in _KV_SPLIT.split(text):
        if not pair:
            continue
        match = _KV_PAIR.fullmatch(pair)
        if match is None:
            raise ParseError(f"pair {_quote(pair)} has no '=' or ':' between key and value")
        key, token = match.group(1), match.group(2).strip()
        if not _KV_KEY.fullmatch(key):
            raise ParseError(
                f"bad key {_quote(key)}: a key starts with a letter or '_' and has only "
                "letters, digits, '_', '.' and '-'"
            )
        if token:
            values[key] = _coerce(token, key)
    return values


def _csv_parser(columns: tuple[str, ...], delimiter: str) -> Callable[[str], Values]:
    if not columns:
        raise ValueError(
            'the csv format needs the column names, e.g. columns = ["temperature", "humidity"]'
        )
    if any(not isinstance(name, str) or not name.strip() for name in columns):
        raise ValueError(f"csv columns must be non-empty names, got {list(columns)!r}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"csv columns must be distinct, got {list(columns)!r}")
    if len(delimiter) != 1 or delimiter in '"\r\n':
        raise ValueError(
            f'csv delimiter must be one character other than a quote or newline, e.g. ","; '
            f"got {delimiter!r}"
        )
    expected = len(columns)
    listed = ", ".join(columns)

    def parse_csv(text: str) -> Values:
        try:
            rows = list(csv.reader([text], delimiter=delimiter))
        except csv.Error as exc:
            raise ParseError(f"not valid CSV ({exc})") from None
        fields = rows[0] if len(rows) == 1 else []
        if len(fields) != expected:
            raise ParseError(f"expected {expected} fields ({listed}), got {len(fields)}")
        values: Values = {}
        for name, field in zip(columns, fields, strict=True):
            token = field.strip()
            if token:
                values[name] = _coerce(token, name)
        return values

    return parse_csv


def _regex_parser(pattern: str | None) -> Callable[[str], Values]:
    example = r'pattern = "T=(?P<temperature>\S+)"'
    if not pattern:
        raise ValueError(f"the regex format needs a pattern with named groups, e.g. {example}")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"regex pattern {pattern!r} does not compile: {exc}") from None
    if not compiled.groupindex:
        raise ValueError(
            f"regex pattern {pattern!r} has no named group; name each value, e.g. {example}"
        )

    def parse_regex(text: str) -> Values:
        match = compiled.search(text)
        if match is None:
            raise ParseError("does not match the configured pattern")
        values: Values = {}
        for name, group in match.groupdict().items():
            token = group.strip() if group is not None else ""
            if token:
                values[name] = _coerce(token, name)
        return values

    return parse_regex


def _number_parser(metric: str) -> Callable[[str], Values]:
    if not metric or not metric.strip():
        raise ValueError('the number format needs a metric name, e.g. metric = "temperature"')
    return lambda text: _parse_number(text, metric)


def _parse_number(text: str, name: str) -> Values:
    value = _coerce(text, name)
    if isinstance(value, str):
        raise ParseError("not a number")
    return {name: value}


# --- values --------------------------------------------------------------------------------


def _coerce(token: str, key: str | None) -> Value:
    """`coerce` for an already stripped token; `key` names the value in error messages."""
    match = _NUMBER.fullmatch(token)
    if match is None:
        return token
    if match.lastgroup == "int":
        try:
            return int(token)
        except ValueError:
            # Python refuses to convert integers of more than 4300 digits.
            raise ParseError(f"{_name(key)} has too many digits") from None
    return _finite(key, float(token))


def _finite(key: str | None, number: int | float) -> int | float:
    if isinstance(number, float) and not math.isfinite(number):
        raise ParseError(
            f"{_name(key)} is {number}, not a finite number; JSON cannot carry NaN or infinity"
        )
    return number


def _name(key: str | None) -> str:
    return "the value" if key is None else f"the value of {_quote(key)}"


def _json_type(document: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(document), "a number")


# --- messages ------------------------------------------------------------------------------


def _excerpt(text: str | bytes) -> str:
    """The input as quoted in an error message: at most `_EXCERPT_CHARS` of it."""
    if len(text) <= _EXCERPT_CHARS:
        return repr(text)
    return f"{text[:_EXCERPT_CHARS]!r}... ({len(text)} long)"


def _quote(token: str) -> str:
    if len(token) <= _TOKEN_CHARS:
        return repr(token)
    return f"{token[:_TOKEN_CHARS]!r}..."


def _first_line(message: str) -> str:
    return message.splitlines()[0] if message else message


# --- framing -------------------------------------------------------------------------------


@dataclass
class FramerStats:
    """What a `LineFramer` has seen since it was made."""

    lines: int = 0
    overlong: int = 0
    undecodable: int = 0
    partial_dropped: int = 0


class LineFramer:
    """Cuts a byte stream into text lines ending in "\\n", "\\r\\n" or a lone "\\r".

    Memory stays bounded: at most `max_line_bytes` are kept between calls to `feed`. A longer
    line is skipped up to its end and counted once in `stats.overlong`; a line that does not
    decode is counted in `stats.undecodable`. Empty lines are dropped.
    """

    def __init__(self, max_line_bytes: int = 4096, encoding: str = "utf-8") -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r}; use e.g. 'utf-8'") from None
        # Lines are cut on the bytes of "\n" and "\r" before decoding, which is only right
        # when the encoding writes them as single ASCII bytes (not so for UTF-16).
        if "\r\n".encode(encoding) != b"\r\n":
            raise ValueError(
                f"encoding {encoding!r} does not write line endings as ASCII; use e.g. 'utf-8'"
            )
        self.stats = FramerStats()
        self._max = max_line_bytes
        self._encoding = encoding
        self._partial = bytearray()
        self._skipping = False  # inside an overlong line, dropping bytes up to its end

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished line held until its end arrives; never above the limit."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[str]:
        """Add bytes from the device; return the lines they complete."""
        # Every "\r" can become "\n": the empty line this makes of "\r\n" is dropped anyway.
        *complete, rest = data.replace(b"\r", b"\n").split(b"\n")
        lines: list[str] = []
        for piece in complete:
            if self._skipping:
                self._skipping = False
                continue
            if self._partial:
                piece = bytes(self._partial) + piece
                self._partial.clear()
            line = self._decode(piece)
            if line:
                lines.append(line)
        self._keep(rest)
        self.stats.lines += len(lines)
        return lines

    def reset(self) -> int:
        """Drop an unfinished line, e.g. when the port is reopened; return 1 if there was one.

        An overlong line being skipped is not counted again: `stats.overlong` has it already.
        """
        self._skipping = False
        if not self._partial:
            return 0
        self._partial.clear()
        self.stats.partial_dropped += 1
        return 1

    def _keep(self, rest: bytes) -> None:
        if self._skipping:
            return
        if len(self._partial) + len(rest) > self._max:
            self._partial.clear()
            self._skipping = True
            self.stats.overlong += 1
        else:
            self._partial += rest

    def _decode(self, piece: bytes) -> str | None:
        if len(piece) > self._max:
            self.stats.overlong += 1
            return None
        # Devices pad with NUL bytes at power-up and after a baud change; they are not data.
        piece = piece.strip(b" \t\x00")
        if not piece:
            return None
        try:
            return piece.decode(self._encoding)
        except UnicodeDecodeError:
            self.stats.undecodable += 1
            return None
