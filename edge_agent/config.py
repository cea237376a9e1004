"""Configuration: one TOML file turned into frozen dataclasses.

Every key the agent accepts is a field of a dataclass below; `load_config` checks each value's
type and range and raises `ConfigError` naming the file, the key and what is expected. Unknown
keys are errors too, with the nearest valid key suggested, so a typo never silently falls back
to a default. The upload token is held in a `Secret` whose repr never shows it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from edge_agent.errors import ConfigError
from edge_agent.parsers import LineFormat, LineKind, make_line_parser

WhenFull = Literal["drop_oldest", "drop_newest", "block"]
Shape = Literal["long", "wide"]


class Secret:
    """A token or password: compares and reveals on demand, never shows in repr or str."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class AgentConfig:
    data_dir: str = "/var/lib/edge-agent"
    device_id: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    trust_clock: bool = False
    require_ntp_sync: bool = False
    time_quality_field: str = "time_quality"


@dataclass(frozen=True)
class EndpointConfig:
    url: str = ""
    token_env: str | None = None
    token_file: str | None = None
    max_batch_records: int = 500
    max_batch_bytes: int = 1_000_000
    flush_interval_s: float = 2.0
    timeout_s: float = 10.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    record_id_field: str | None = None
    gzip: bool = False
    verify_tls: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None


@dataclass(frozen=True)
class BufferConfig:
    max_bytes: int = 268_435_456
    when_full: WhenFull = "drop_oldest"
    commit_interval_ms: int = 200
    sync: Literal["full", "normal"] = "full"
    max_age: str | None = None
    min_free_bytes: int = 67_108_864

    @property
    def max_age_s(self) -> float | None:
        return None if self.max_age is None else parse_duration(self.max_age)


@dataclass(frozen=True)
class SourceConfig:
    name: str
    type: Literal["serial", "mqtt"]
    datasource_id: str
    format: LineKind = "json"
    shape: Shape = "long"
    tags: Mapping[str, str] = field(default_factory=dict)
    # serial
    port: str | None = None
    baudrate: int = 9600
    columns: tuple[str, ...] = ()
    delimiter: str = ","
    pattern: str | None = None
    metric: str = "value"
    max_line_bytes: int = 4096
    encoding: str = "utf-8"
    silence_timeout_s: float | None = None
    reopen_backoff_max_s: float = 30.0
    # mqtt
    broker: str | None = None
    topics: tuple[str, ...] = ()
    topic_fields: str | None = None
    qos: int = 1
    client_id: str | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    mqtt_version: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = 60
    session_expiry_s: int = 604_800
    inflight_window: int = 20
    shared_group: str | None = None
    timestamp_field: str | None = None
    max_payload_bytes: int = 262_144
    max_values_per_message: int = 1000
    # Resolved from password_env or password_file by load_config; not a key of the file.
    password: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True)
class StatusConfig:
    listen: str | None = None
    unhealthy_after_s: float = 300.0


@dataclass(frozen=True)
class Config:
    path: Path
    agent: AgentConfig
    endpoint: EndpointConfig
    buffer: BufferConfig
    sources: tuple[SourceConfig, ...]
    status: StatusConfig = field(default_factory=StatusConfig)
    token: Secret = field(repr=False, compare=False, default_factory=lambda: Secret(""))

    @property
    def buffer_path(self) -> Path:
        return Path(self.agent.data_dir) / "buffer.db"


# Keys accepted per source type, besides the common ones; used to reject a serial key on an
# MQTT source (and the reverse) with a message that says which type takes it.
_COMMON_SOURCE_KEYS = frozenset({"name", "type", "datasource_id", "format", "shape", "tags"})
_SOURCE_KEYS_BY_TYPE = {
    "serial": frozenset(
        {
            "port",
            "baudrate",
            "columns",
            "delimiter",
            "pattern",
            "metric",
            "max_line_bytes",
            "encoding",
            "silence_timeout_s",
            "reopen_backoff_max_s",
        }
    ),
    "mqtt": frozenset(
        {
            "broker",
            "topics",
            "topic_fields",
            "qos",
            "client_id",
            "username",
            "password_env",
            "password_file",
            "ca_file",
            "client_cert",
            "client_key",
            "mqtt_version",
            "keepalive_s",
            "session_expiry_s",
            "inflight_window",
            "shared_group",
            "timestamp_field",
            "max_payload_bytes",
            "max_values_per_message",
            "metric",
            "reopen_backoff_max_s",
        }
    ),
}
_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentConfig,
    "endpoint": EndpointConfig,
    "buffer": BufferConfig,
    "status": StatusConfig,
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def all_keys() -> dict[str, list[str]]:
    """Every accepted key by section, for `check` output and the README test."""
    keys = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}
    keys["sources"] = [f.name for f in dataclasses.fields(SourceConfig) if f.repr]
    return keys


def load_config(
    path: str | Path, environ: Mapping[str, str] | None = None, *, secrets: bool = True
) -> Config:
    """Read, check and resolve the configuration file; raises ConfigError on any problem.

    `secrets=False` skips reading the token and passwords: for commands that only inspect
    the buffer, which must work for a user who may not read the token.
    """
    path = Path(path)
    env = os.environ if environ is None else environ
    raw = _read_toml(path)
    where = str(path)
    _reject_unknown(raw, [*_SECTIONS, "sources"], where, "top level")
    sections = {
        name: _build(cls, _table(raw, name, where), where, f"[{name}]")
        for name, cls in _SECTIONS.items()
    }
    sources = _build_sources(raw.get("sources", []), where)
    if secrets:
        sources = tuple(_with_password(s, env, where) for s in sources)
    endpoint: EndpointConfig = sections["endpoint"]
    _check_endpoint(endpoint, where)
    _check_buffer(sections["buffer"], where)
    _check_agent(sections["agent"], where)
    _check_status(sections["status"], where)
    return Config(
        path=path,
        agent=sections["agent"],
        endpoint=endpoint,
        buffer=sections["buffer"],
        status=sections["status"],
        sources=sources,
        token=resolve_token(endpoint, env, where) if secrets else Secret(""),
    )


def resolve_token(endpoint: EndpointConfig, environ: Mapping[str, str], where: str) -> Secret:
    """The upload token from the environment variable or file the endpoint names."""
    if endpoint.token_env:
        value = environ.get(endpoint.token_env, "").strip()
        if not value:
            raise ConfigError(
                f"{where}: [endpoint] token_env: the environment variable {endpoint.token_env} "
                "is not set or empty; export it before starting the agent, or use token_file"
            )
        return Secret(value)
    assert endpoint.token_file is not None  # _check_endpoint requires one of the two
    try:
        value = Path(endpoint.token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{where}: [endpoint] token_file: cannot read {endpoint.token_file} "
            f"({exc.strerror}); create it with the token on one line, readable by the agent"
        ) from None
    if not value:
        raise ConfigError(
            f"{where}: [endpoint] token_file: {endpoint.token_file} is empty; "
            "put the token on one line"
        )
    return Secret(value)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; copy one of the examples in configs/ and edit it"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _table(raw: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table (a [{name}] section)")
    return value


def _reject_unknown(table: Mapping[str, Any], valid: list[str], where: str, section: str) -> None:
    for key in table:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{where}: {section}: unknown key {key!r}{hint}")


def _build(cls: type[Any], table: Mapping[str, Any], file: str, section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(table, list(fields), file, section)
    where = f"{file}: {section}"
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        values[key] = _convert(value, hints[key], f"{where} {key}")
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    return cls(**values)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the type `hint`; returns it in the dataclass's form."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
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
        return {str(k): _tag_value(v, f"{where}.{k}") for k, v in value.items()}
    raise AssertionError(f"unhandled config type {hint!r}")  # pragma: no cover - a coding error


def _tag_value(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: tag values must be strings or numbers, got {value!r}")
    return str(value)


def _check_range(value: float, low: float, high: float, where: str) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{where}: expected a value from {low:g} to {high:g}, got {value:g}")


def _check_agent(agent: AgentConfig, where: str) -> None:
    if not agent.data_dir:
        raise ConfigError(f"{where}: [agent] data_dir: must not be empty")
    if agent.device_id is not None and not agent.device_id.strip():
        raise ConfigError(f"{where}: [agent] device_id: must not be empty (leave it out instead)")


def _check_endpoint(ep: EndpointConfig, where: str) -> None:
    w = f"{where}: [endpoint]"
    if not ep.url:
        raise ConfigError(
            f"{w} url: missing; set it to the insert URL, "
            'e.g. "https://api.example.com/restapi/datasource/insert"'
        )
    if not re.match(r"^https?://[^/\s]+", ep.url):
        raise ConfigError(f"{w} url: expected an http:// or https:// URL, got {ep.url!r}")
    if bool(ep.token_env) == bool(ep.token_file):
        raise ConfigError(
            f"{w}: set exactly one of token_env (an environment variable name) "
            "or token_file (a file holding the token)"
        )
    _check_range(ep.max_batch_records, 1, 100_000, f"{w} max_batch_records")
    _check_range(ep.max_batch_bytes, 1024, 100_000_000, f"{w} max_batch_bytes")
    _check_range(ep.flush_interval_s, 0.0, 3600.0, f"{w} flush_interval_s")
    _check_range(ep.timeout_s, 0.1, 600.0, f"{w} timeout_s")
    _check_range(ep.backoff_base_s, 0.01, 3600.0, f"{w} backoff_base_s")
    _check_range(ep.backoff_max_s, ep.backoff_base_s, 86_400.0, f"{w} backoff_max_s")
    for key in ("ca_file", "client_cert", "client_key"):
        value = getattr(ep, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{w} {key}: no such file {value!r}")
    if ep.client_key and not ep.client_cert:
        raise ConfigError(f"{w} client_key: needs client_cert too")


def _check_status(st: StatusConfig, where: str) -> None:
    if st.listen is not None and not re.fullmatch(
        r"(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d{1,5}", st.listen
    ):
        raise ConfigError(
            f'{where}: [status] listen: expected "host:port" like "127.0.0.1:9108", '
            f"got {st.listen!r}"
        )
    _check_range(st.unhealthy_after_s, 1.0, 86_400.0, f"{where}: [status] unhealthy_after_s")


def _check_buffer(buf: BufferConfig, where: str) -> None:
    w = f"{where}: [buffer]"
    _check_range(buf.max_bytes, 1_048_576, 1 << 40, f"{w} max_bytes")
    _check_range(buf.commit_interval_ms, 1, 60_000, f"{w} commit_interval_ms")
    _check_range(buf.min_free_bytes, 0, 1 << 40, f"{w} min_free_bytes")
    if buf.max_age is not None:
        try:
            age = parse_duration(buf.max_age)
        except ValueError as exc:
            raise ConfigError(f"{w} max_age: {exc}") from None
        _check_range(age, 60, 10 * 365 * 86400, f"{w} max_age (seconds)")


def _build_sources(raw: Any, where: str) -> tuple[SourceConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{where}: no [[sources]]; add at least one [[sources]] table "
            "(see configs/serial-sensor.toml)"
        )
    sources = []
    for index, table in enumerate(raw, start=1):
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [[sources]] #{index} must be a table")
        sources.append(_build_source(table, where, f"[[sources]] #{index}"))
    names = [s.name for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                f"{where}: [[sources]]: the name {name!r} is used twice; names must differ"
            )
    return tuple(sources)


def _build_source(table: Mapping[str, Any], file: str, section: str) -> SourceConfig:
    name = table.get("name")
    if isinstance(name, str):
        section = f"{section} ({name})"
    label = f"{file}: {section}"
    kind = table.get("type")
    if kind not in _SOURCE_KEYS_BY_TYPE:
        raise ConfigError(f"{label} type: expected one of 'serial' | 'mqtt', got {kind!r}")
    allowed = _COMMON_SOURCE_KEYS | _SOURCE_KEYS_BY_TYPE[kind]
    for key in table:
        for other, keys in _SOURCE_KEYS_BY_TYPE.items():
            if key not in allowed and key in keys:
                raise ConfigError(f"{label} {key}: only {other} sources take this key")
    _reject_unknown(table, sorted(allowed), file, section)
    source: SourceConfig = _build(SourceConfig, table, file, section)
    if not _NAME_RE.match(source.name):
        raise ConfigError(
            f"{label} name: use letters, digits, '.', '_' or '-' (at most 64), got {source.name!r}"
        )
    if not source.datasource_id.strip():
        raise ConfigError(f"{label} datasource_id: must not be empty")
    if source.type == "serial":
        _check_serial(source, label)
    else:
        _check_mqtt(source, label)
    return source


def _check_serial(src: SourceConfig, where: str) -> None:
    if not src.port:
        raise ConfigError(f'{where} port: missing; e.g. port = "/dev/serial/by-id/usb-..."')
    _check_range(src.baudrate, 50, 4_000_000, f"{where} baudrate")
    _check_range(src.max_line_bytes, 16, 1_048_576, f"{where} max_line_bytes")
    if src.silence_timeout_s is not None:
        _check_range(src.silence_timeout_s, 1.0, 86_400.0, f"{where} silence_timeout_s")
    _check_range(src.reopen_backoff_max_s, 0.1, 3600.0, f"{where} reopen_backoff_max_s")
    if src.format == "csv" and not src.columns:
        raise ConfigError(f'{where} columns: format "csv" needs columns = ["name", ...]')
    try:
        make_line_parser(line_format(src))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        "".encode(src.encoding)
    except LookupError:
        raise ConfigError(f"{where} encoding: unknown encoding {src.encoding!r}") from None


def line_format(src: SourceConfig) -> LineFormat:
    """The parser settings of a serial source."""
    return LineFormat(
        kind=src.format,
        columns=src.columns,
        delimiter=src.delimiter,
        pattern=src.pattern,
        metric=src.metric,
    )


# --- mqtt ----------------------------------------------------------------------------------

_MQTT_FORMATS = ("json", "number", "kv")
_FIELD_NAME_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# Names a topic level may not take: the record already has them, and a topic level
# silently replacing the timestamp, a value or the gateway's id would corrupt the data.
_RESERVED_TOPIC_FIELDS = frozenset({"timestamp", "value", "device_id"})


def topic_field_levels(template: str) -> tuple[str | None, ...]:
    """The levels of a `topic_fields` template: a field name for `{name}`, None otherwise.

    Raises ValueError saying what is wrong; `{metric}` is allowed and names a lone value.
    """
    levels: list[str | None] = []
    parts = template.split("/")
    for index, level in enumerate(parts):
        match = _FIELD_NAME_RE.match(level)
        if match is not None:
            levels.append(match.group(1))
        elif level == "#" and index != len(parts) - 1:
            raise ValueError("'#' may only be the last level")
        elif "{" in level or "}" in level:
            raise ValueError(
                f"level {level!r} is not a field; a field is a whole level like {{device}} "
                "(letters, digits and '_')"
            )
        elif "+" in level and level != "+":
            raise ValueError(f"level {level!r}: '+' must be a whole level")
        else:
            levels.append(None)
    names = [n for n in levels if n is not None]
    if not names:
        raise ValueError('no {name} level; e.g. topic_fields = "sensors/{device}/{metric}"')
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"the field {{{name}}} appears twice")
        if name in _RESERVED_TOPIC_FIELDS:
            raise ValueError(
                f"{{{name}}} would replace the record's own {name!r}; name the level "
                "differently, e.g. {device}"
            )
    return tuple(levels)


def _check_mqtt(src: SourceConfig, where: str) -> None:
    if src.format not in _MQTT_FORMATS:
        raise ConfigError(
            f"{where} format: MQTT payloads are read as 'json', 'number' or 'kv', "
            f"not {src.format!r}"
        )
    _check_broker_url(src.broker, where)
    if not src.topics:
        raise ConfigError(f'{where} topics: missing; e.g. topics = ["sensors/+/+"]')
    for topic in src.topics:
        _check_topic_filter(topic, f"{where} topics")
    if src.topic_fields is not None:
        try:
            levels = topic_field_levels(src.topic_fields)
        except ValueError as exc:
            raise ConfigError(f"{where} topic_fields: {exc}") from None
        for name in levels:
            if name is not None and name in src.tags:
                raise ConfigError(
                    f"{where} topic_fields: {{{name}}} is also a tag; rename one of them"
                )
    _check_range(src.qos, 0, 2, f"{where} qos")
    _check_mqtt_session(src, where)
    _check_mqtt_limits(src, where)
    _check_mqtt_credentials(src, where)
    if src.metric != "value" and not src.metric.strip():
        raise ConfigError(f"{where} metric: must not be empty")
    if src.timestamp_field is not None:
        if not src.timestamp_field.strip():
            raise ConfigError(f"{where} timestamp_field: must not be empty (leave it out instead)")
        if src.format == "number":
            raise ConfigError(
                f'{where} timestamp_field: a "number" payload has no fields; use format '
                '"json" or "kv"'
            )
    _check_range(src.reopen_backoff_max_s, 1.0, 3600.0, f"{where} reopen_backoff_max_s")


def _check_broker_url(url: str | None, where: str) -> None:
    example = 'e.g. broker = "mqtt://127.0.0.1:1883" (or mqtts:// for TLS)'
    if not url:
        raise ConfigError(f"{where} broker: missing; {example}")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{where} broker: bad port in {url!r}; {example}") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"{where} broker: expected mqtt://host[:port] or mqtts://..., {example}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{where} broker: put the user name in username and the password in password_env "
            "or password_file, not in the URL"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or port == 0:
        raise ConfigError(f"{where} broker: expected only a host and a port in {url!r}; {example}")


def broker_address(url: str) -> tuple[str, int, bool]:
    """Host, port and whether to use TLS, from a checked broker URL."""
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    assert parts.hostname is not None  # _check_broker_url requires one
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def _check_topic_filter(topic: str, where: str) -> None:
    levels = topic.split("/")
    bad = (
        not topic
        or any(("+" in lv and lv != "+") or ("#" in lv and lv != "#") for lv in levels)
        or "#" in levels[:-1]
    )
    if bad:
        raise ConfigError(
            f"{where}: {topic!r} is not a topic filter; '+' and '#' are whole levels and "
            '\'#\' only the last, e.g. "sensors/+/temperature" or "sensors/#"'
        )
    if topic.startswith("$share/"):
        raise ConfigError(f'{where}: {topic!r}: set shared_group = "name" instead of $share/')


def _check_mqtt_session(src: SourceConfig, where: str) -> None:
    _check_range(src.keepalive_s, 5, 65_535, f"{where} keepalive_s")
    _check_range(src.inflight_window, 1, 65_535, f"{where} inflight_window")
    _check_range(src.session_expiry_s, 0, 4_294_967_295, f"{where} session_expiry_s")
    is_v5 = src.mqtt_version == "5"
    if not is_v5 and src.session_expiry_s != SourceConfig.session_expiry_s:
        raise ConfigError(
            f'{where} session_expiry_s: needs mqtt_version = "5"; with 3.1.1 the broker decides '
            "how long it keeps the session (Mosquitto: persistent_client_expiration)"
        )
    if src.shared_group is not None:
        if not is_v5:
            raise ConfigError(f'{where} shared_group: needs mqtt_version = "5"')
        if not src.shared_group or any(c in src.shared_group for c in "/+#"):
            raise ConfigError(
                f"{where} shared_group: a non-empty name without '/', '+' or '#', "
                f"got {src.shared_group!r}"
            )
    if src.client_id is not None and not src.client_id.strip():
        raise ConfigError(f"{where} client_id: must not be empty (leave it out for the default)")


def _check_mqtt_limits(src: SourceConfig, where: str) -> None:
    # A larger payload is dead-lettered, not read: the caps bound the memory one message takes
    # (268,435,455 bytes is the largest MQTT packet).
    _check_range(src.max_payload_bytes, 64, 268_435_455, f"{where} max_payload_bytes")
    _check_range(src.max_values_per_message, 1, 1_000_000, f"{where} max_values_per_message")


def _check_mqtt_credentials(src: SourceConfig, where: str) -> None:
    has_password = src.password_env is not None or src.password_file is not None
    if src.password_env is not None and src.password_file is not None:
        raise ConfigError(f"{where}: set only one of password_env or password_file")
    if has_password and not src.username:
        raise ConfigError(f"{where} username: a password needs a username")
    tls = src.broker is not None and src.broker.startswith("mqtts://")
    for key in ("ca_file", "client_cert", "client_key"):
        value = getattr(src, key)
        if value is None:
            continue
        if not tls:
            raise ConfigError(f"{where} {key}: TLS settings need an mqtts:// broker URL")
        if not Path(value).is_file():
            raise ConfigError(f"{where} {key}: no such file {value!r}")
    if src.client_key and not src.client_cert:
        raise ConfigError(f"{where} client_key: needs client_cert too")


def _with_password(src: SourceConfig, environ: Mapping[str, str], where: str) -> SourceConfig:
    if src.password_env is None and src.password_file is None:
        return src
    return dataclasses.replace(src, password=resolve_password(src, environ, where))


def resolve_password(src: SourceConfig, environ: Mapping[str, str], where: str) -> Secret:
    """The broker password of an MQTT source, from its password_env or password_file."""
    label = f"{where}: [[sources]] ({src.name})"
    if src.password_env:
        value = environ.get(src.password_env, "")
        if not value:
            raise ConfigError(
                f"{label} password_env: the environment variable {src.password_env} is not set "
                "or empty; export it before starting the agent, or use password_file"
            )
        return Secret(value)
    assert src.password_file is not None  # _with_password calls us only with one of the two
    try:
        value = Path(src.password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"{label} password_file: cannot read {src.password_file} ({exc.strerror}); create "
            "it with the password on one line, readable by the agent"
        ) from None
    if not value:
        raise ConfigError(f"{label} password_file: {src.password_file} is empty")
    return Secret(value)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])", re.ASCII)
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration like 30s, 15m, 12h or 7d; ValueError says what is expected."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit: 30s, 15m, 12h or 7d"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
