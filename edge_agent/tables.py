"""TOML tables into checked frozen dataclasses: the helpers every configuration class uses.

`build` turns one table into one dataclass: unknown keys are errors with the nearest valid
key suggested, each value is checked against the field's type, and missing required keys are
named. `check_range` and the messages here always name the file, the table and the key, so the
agent's config loader and each source type's own config class speak with one voice.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from edge_agent.errors import ConfigError

T = TypeVar("T")


def reject_unknown(
    table: Mapping[str, Any], valid: Sequence[str], where: str, section: str
) -> None:
    """Raise for the first key of `table` not in `valid`, suggesting the nearest valid one."""
    for key in table:
        if key not in valid:
            near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{where}: {section}: unknown key {key!r}{hint}")


def file_keys(cls: type[Any]) -> list[str]:
    """The keys a config dataclass takes from a file: its fields, less those hidden from repr
    (values resolved at load time, such as a password read from its file)."""
    return [key_of(f) for f in dataclasses.fields(cls) if f.repr]


def key_of(f: dataclasses.Field[Any]) -> str:
    """The key a field is written as in a file: its name, or `metadata["key"]` for a key
    that cannot be a Python name (`from`)."""
    return str(f.metadata.get("key", f.name))


def build(cls: type[T], table: Mapping[str, Any], file: str, section: str) -> T:
    """One dataclass from one table; raises ConfigError naming file, table and key."""
    fields = {key_of(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    reject_unknown(table, file_keys(cls), file, section)
    where = f"{file}: {section}"
    hints = typing.get_type_hints(cls)
    values = {
        fields[key].name: convert(value, hints[fields[key].name], f"{where} {key}")
        for key, value in table.items()
    }
    missing = [
        key
        for key, f in fields.items()
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    return cls(**values)


def convert(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the type `hint`; returns it in the dataclass's form."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(value, inner[0], where)
        return _convert_any(value, inner, where)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string in quotes, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'{where}: expected a list of strings like ["a", "b"], got {value!r}')
        return tuple(value)
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f'{where}: expected a table like {{ site = "north" }}, got {value!r}')
        return {str(k): tag_value(v, f"{where}.{k}") for k, v in value.items()}
    raise AssertionError(f"unhandled config type {hint!r}")  # pragma: no cover - a coding error


def _convert_any(value: Any, hints: list[Any], where: str) -> Any:
    """The first of several types `value` fits (`gzip = true | "auto"`); the error names all."""
    expected = []
    for hint in hints:
        try:
            return convert(value, hint, where)
        except ConfigError as exc:
            text = str(exc).removeprefix(f"{where}: expected ")
            expected.append(text.rsplit(", got ", 1)[0])
    raise ConfigError(f"{where}: expected {' or '.join(expected)}, got {value!r}")


def tag_value(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: tag values must be strings or numbers, got {value!r}")
    return str(value)


def check_range(value: float, low: float, high: float, where: str) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{where}: expected a value from {low:g} to {high:g}, got {value:g}")
