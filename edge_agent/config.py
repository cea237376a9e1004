"""Configuration: one TOML file turned into frozen dataclasses.

Every key the agent accepts is a field of a dataclass: the sections below, and for each
`[[sources]]` table the config class of its type (a plugin folder under `sources/`, found by
`sources.registry`; this module names no source type). `load_config` checks each value's type
and range and raises `ConfigError` naming the file, the key and what is expected. Unknown keys
are errors too, with the nearest valid key suggested, so a typo never silently falls back to a
default. The upload token is held in a `Secret` whose repr never shows it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_agent import template
from edge_agent.credentials import (
    CONFIG_FILE_LIMIT,
    SECRET_FILE_LIMIT,
    NotASmallFile,
    decode_secret_file,
    has_url_credentials,
    read_small_file,
    strip_line_end,
    token_problem,
)
from edge_agent.errors import ConfigError
from edge_agent.processors.registry import processor_keys
from edge_agent.sources.base import SourceConfig
from edge_agent.store import PRIORITIES
from edge_agent.tables import build, check_range, file_keys, reject_unknown

if TYPE_CHECKING:
    from edge_agent.sources.registry import SourceType

WhenFull = Literal["drop_oldest", "drop_newest", "block"]
GzipAuto = Literal["auto"]


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

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        # Pickled with its value: the broker password crosses to the MQTT link process.
        return (Secret, (self._value,))

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
    time_from_uplink: bool = True


@dataclass(frozen=True)
class EndpointConfig:
    url: str = ""
    token_env: str | None = None
    token_file: str | None = None
    max_batch_records: int = 500
    max_batch_bytes: int = 1_000_000
    flush_interval_s: float = 2.0
    # Which batch goes next after an outage (drain.py): live readings first, the backlog
    # taking `backlog_share` of the requests meanwhile; or strictly oldest first.
    drain: Literal["live_first", "oldest_first"] = "live_first"
    live_window_s: float = 60.0
    backlog_share: float = 0.5
    timeout_s: float = 10.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    reconnect_probe_s: float = 10.0
    # A record the server keeps failing on alone with a 5xx (see isolation.py) is set aside
    # after this many failures, each with another request succeeding since the one before,
    # over at least this many seconds since its first failure alone.
    poison_attempts: int = 5
    poison_min_age_s: float = 600.0
    record_id_field: str | None = None
    # "auto": gzip until the server answers 415, then plain JSON for good (remembered in the
    # buffer for this URL); true: gzip, plain JSON after a 415 until a restart; false: never.
    gzip: bool | GzipAuto = "auto"
    # Bytes on the wire per UTC day (budget.py): a size like "500MB", or a whole number of
    # bytes; None sends without a limit.
    max_bytes_per_day: int | str | None = None
    verify_tls: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None

    @property
    def bytes_per_day(self) -> int | None:
        """`max_bytes_per_day` in bytes (checked at load); None: no limit."""
        if self.max_bytes_per_day is None:
            return None
        return parse_size(self.max_bytes_per_day)


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


DEFAULT_STATUS_LISTEN = "127.0.0.1:9108"
STATUS_OFF = ("off", "")


@dataclass(frozen=True)
class StatusConfig:
    listen: str = DEFAULT_STATUS_LISTEN  # "off" (or "") turns the status endpoint off
    unhealthy_after_s: float = 300.0

    @property
    def address(self) -> str | None:
        """Where the status endpoint listens; None when it is off."""
        return None if self.listen.strip().lower() in STATUS_OFF else self.listen


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


_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentConfig,
    "endpoint": EndpointConfig,
    "buffer": BufferConfig,
    "status": StatusConfig,
}


def all_keys() -> dict[str, list[str]]:
    """Every accepted key by section, for `check` output and the README test."""
    keys = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}
    source_keys = file_keys(SourceConfig)
    for declared in source_types().values():
        source_keys += [k for k in file_keys(declared.config) if k not in source_keys]
        keys.update(declared.config.nested_keys())
    keys["sources"] = source_keys
    keys["sources.processors"] = processor_keys()
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
    raw = _read_toml(path, env)
    where = str(path)
    reject_unknown(raw, [*_SECTIONS, "sources"], where, "top level")
    sections = {
        name: build(cls, _table(raw, name, where), where, f"[{name}]")
        for name, cls in _SECTIONS.items()
    }
    sources = _build_sources(raw.get("sources", []), where)
    if secrets:
        sources = tuple(s.with_secrets(env, where) for s in sources)
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
    """The upload token from the environment variable or file the endpoint names.

    It must be one line of printable ASCII (one final line break is dropped): anything else
    would break the Authorization header, and httpx's error would quote the header whole.
    """
    if endpoint.token_env:
        name = endpoint.token_env
        value = strip_line_end(environ.get(name, ""))
        if not value:
            raise ConfigError(
                f"{where}: [endpoint] token_env: the environment variable {name} "
                "is not set or empty; export it before starting the agent, or use token_file"
            )
        problem = token_problem(value)
        if problem:
            raise ConfigError(
                f"{where}: [endpoint] token_env: the environment variable {name} {problem}"
            )
        return Secret(value)
    assert endpoint.token_file is not None  # _check_endpoint requires one of the two
    label = f"{where}: [endpoint] token_file: {endpoint.token_file}"
    try:
        data = read_small_file(endpoint.token_file, SECRET_FILE_LIMIT)
    except NotASmallFile as exc:
        raise ConfigError(
            f"{label} {exc}; point token_file at a file that holds the token on one line"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{where}: [endpoint] token_file: cannot read {endpoint.token_file} "
            f"({exc.strerror}); create it with the token on one line, readable by the agent"
        ) from None
    try:
        value = strip_line_end(decode_secret_file(data))
    except ValueError as exc:
        raise ConfigError(f"{label} {exc}") from None
    problem = token_problem(value)
    if problem:
        raise ConfigError(f"{label} {problem}")
    return Secret(value)


def _read_toml(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        data = read_small_file(path, CONFIG_FILE_LIMIT)
    except NotASmallFile as exc:
        raise ConfigError(
            f"{path}: {exc}; give the path of the agent's TOML configuration file"
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; copy one of the examples in configs/ and edit it"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror})") from None
    utf16 = _utf16(data)
    if utf16:
        raise ConfigError(
            f"{path}: is {utf16} text (as Windows Notepad may save it), and TOML files must be "
            "UTF-8: save it as UTF-8 (in Notepad: Save As, Encoding: UTF-8), or convert it "
            f"with `iconv -f UTF-16 -t UTF-8 {path} > NEW`"
        )
    # A UTF-8 byte order mark (Notepad's "UTF-8 with BOM") is not part of the text.
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(_not_utf8(path, data, skip + exc.start)) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return template.expand(raw, text, path, environ)


_UTF8_BOM = b"\xef\xbb\xbf"


def _utf16(data: bytes) -> str | None:
    """ "UTF-16" (or "UTF-32") when `data` is in that encoding: a byte order mark, or, without
    one, a NUL byte in every other place of its start (ASCII text in UTF-16)."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = data[:64]
    odd, even = set(head[1::2]), set(head[0::2])
    little_endian = odd == {0} and 0 not in even
    big_endian = even == {0} and 0 not in odd
    if len(head) >= 4 and (little_endian or big_endian):
        return "UTF-16"
    return None


def _not_utf8(path: Path, data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return (
        f"{path}: not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} (line {line}, "
        f"column {column}) is not UTF-8; TOML files must be UTF-8: save the file as UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8`)"
    )


def _table(raw: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table (a [{name}] section)")
    return value


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
    if has_url_credentials(ep.url):
        # The URL is shown by `check`, in the log and on the status page: never quote it here.
        raise ConfigError(
            f"{w} url: holds a user name or password (user:password@host); remove them from "
            "the URL: the agent sends the token from token_file (or token_env) as an "
            "Authorization header"
        )
    if not re.match(r"^https?://[^/\s]+", ep.url):
        raise ConfigError(f"{w} url: expected an http:// or https:// URL, got {ep.url!r}")
    if bool(ep.token_env) == bool(ep.token_file):
        raise ConfigError(
            f"{w}: set exactly one of token_env (an environment variable name) "
            "or token_file (a file holding the token)"
        )
    check_range(ep.max_batch_records, 1, 100_000, f"{w} max_batch_records")
    check_range(ep.max_batch_bytes, 1024, 100_000_000, f"{w} max_batch_bytes")
    check_range(ep.flush_interval_s, 0.0, 3600.0, f"{w} flush_interval_s")
    check_range(ep.live_window_s, 1.0, 86_400.0, f"{w} live_window_s")
    # Above 0: the backlog must move while live readings keep coming.
    check_range(ep.backlog_share, 0.01, 1.0, f"{w} backlog_share")
    check_range(ep.timeout_s, 0.1, 600.0, f"{w} timeout_s")
    check_range(ep.backoff_base_s, 0.01, 3600.0, f"{w} backoff_base_s")
    check_range(ep.backoff_max_s, ep.backoff_base_s, 86_400.0, f"{w} backoff_max_s")
    check_range(ep.reconnect_probe_s, 0.1, 3600.0, f"{w} reconnect_probe_s")
    # At least 2: one failure alone cannot tell a record the server chokes on from an outage
    # that began with it; the second counts only after another request's success.
    check_range(ep.poison_attempts, 2, 10_000, f"{w} poison_attempts")
    check_range(ep.poison_min_age_s, 0.0, 30 * 86_400.0, f"{w} poison_min_age_s")
    _check_bytes_per_day(ep, w)
    for key in ("ca_file", "client_cert", "client_key"):
        value = getattr(ep, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{w} {key}: no such file {value!r}")
    if ep.client_key and not ep.client_cert:
        raise ConfigError(f"{w} client_key: needs client_cert too")


def _check_bytes_per_day(ep: EndpointConfig, w: str) -> None:
    if ep.max_bytes_per_day is None:
        return
    try:
        per_day = parse_size(ep.max_bytes_per_day)
    except ValueError as exc:
        raise ConfigError(f"{w} max_bytes_per_day: {exc}") from None
    # A full batch must fit in a day several times over, or the day's last one never goes.
    least = 4 * ep.max_batch_bytes
    if per_day < least:
        raise ConfigError(
            f"{w} max_bytes_per_day: {per_day} bytes is less than 4 × max_batch_bytes "
            f"({least} bytes); raise it, lower max_batch_bytes, or leave it out for no limit"
        )


def _check_status(st: StatusConfig, where: str) -> None:
    if st.address is not None and not re.fullmatch(
        r"(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d{1,5}", st.address
    ):
        raise ConfigError(
            f'{where}: [status] listen: expected "host:port" like "127.0.0.1:9108", '
            f'or "off", got {st.listen!r}'
        )
    check_range(st.unhealthy_after_s, 1.0, 86_400.0, f"{where}: [status] unhealthy_after_s")


def _check_buffer(buf: BufferConfig, where: str) -> None:
    w = f"{where}: [buffer]"
    check_range(buf.max_bytes, 1_048_576, 1 << 40, f"{w} max_bytes")
    check_range(buf.commit_interval_ms, 1, 60_000, f"{w} commit_interval_ms")
    check_range(buf.min_free_bytes, 0, 1 << 40, f"{w} min_free_bytes")
    if buf.max_age is not None:
        try:
            age = parse_duration(buf.max_age)
        except ValueError as exc:
            raise ConfigError(f"{w} max_age: {exc}") from None
        check_range(age, 60, 10 * 365 * 86400, f"{w} max_age (seconds)")


def source_types() -> dict[str, SourceType]:
    """The registry of source types (imported here, when first needed: the types import
    this module for `Secret`)."""
    from edge_agent.sources.registry import source_types as registered

    return registered()


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
    for declared in source_types().values():
        declared.config.check_together([s for s in sources if s.type == declared.name], where)
    _check_priorities(sources, where)
    return tuple(sources)


def _check_priorities(sources: list[SourceConfig], where: str) -> None:
    """The priority is kept by data source: sources sharing one must agree on it."""
    first: dict[str, SourceConfig] = {}
    for s in sources:
        other = first.setdefault(s.datasource_id, s)
        if other.priority != s.priority:
            raise ConfigError(
                f"{where}: [[sources]] ({s.name}) priority: sources {other.name!r} "
                f"({other.priority}) and {s.name!r} ({s.priority}) send to the same data "
                f"source {s.datasource_id!r}; give them the same priority"
            )


def priorities(config: Config) -> dict[str, int]:
    """Priority class by data source (store.HIGH, NORMAL, LOW), for the buffer."""
    return {s.datasource_id: PRIORITIES[s.priority] for s in config.sources}


def _build_source(table: Mapping[str, Any], file: str, section: str) -> SourceConfig:
    name = table.get("name")
    if isinstance(name, str):
        section = f"{section} ({name})"
    types = source_types()
    kind = table.get("type")
    declared = types.get(kind) if isinstance(kind, str) else None
    if declared is None:
        choices = " | ".join(repr(t) for t in types)
        raise ConfigError(f"{file}: {section} type: expected one of {choices}, got {kind!r}")
    allowed = set(file_keys(declared.config))
    for key in table:
        takers = [t for t, d in types.items() if key not in allowed and key in file_keys(d.config)]
        if takers:
            raise ConfigError(
                f"{file}: {section} {key}: only {' and '.join(takers)} sources take this key"
            )
    return declared.config.from_table(table, file, section)


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.ASCII)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


def parse_size(value: int | str) -> int:
    """Bytes in a size: a whole number, or text like "500MB", "1.5 GB", "200KiB".

    kB, MB, GB, TB are powers of 1000 (as data plans count), KiB, MiB, GiB, TiB of 1024.
    ValueError says what is expected.
    """
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"expected a positive size, got {value}")
        return value
    match = _SIZE_RE.fullmatch(value.strip().lower())
    if match is None:
        raise ValueError(
            f"{value!r} is not a size; write a number and a unit: 500MB, 2GB, 200KiB "
            "(or a whole number of bytes)"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"])
    if size < 1:
        raise ValueError(f"expected a positive size, got {value!r}")
    return size


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
