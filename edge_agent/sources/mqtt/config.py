"""The `[[sources]]` keys of an MQTT source: broker, topics, session and credentials.

Also the helpers that read them: `topic_field_levels` (a `topic_fields` template's levels),
`broker_address` (host, port and TLS from a checked URL) and `resolve_password`.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from edge_agent.config import Secret
from edge_agent.credentials import (
    SECRET_FILE_LIMIT,
    NotASmallFile,
    decode_secret_file,
    is_loopback,
    password_problem,
    read_small_file,
    readable_by_others,
    strip_line_end,
)
from edge_agent.errors import ConfigError
from edge_agent.sources.base import SourceConfig
from edge_agent.tables import check_range


@dataclass(frozen=True, kw_only=True)
class MqttConfig(SourceConfig):
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
    mqtt_version: Literal["auto", "3.1.1", "5"] = "auto"
    keepalive_s: int = 60
    session_expiry_s: int = 604_800
    # None: WINDOW_V5 with MQTT 5, WINDOW_V311 with 3.1.1 (see `window`).
    inflight_window: int | None = None
    shared_group: str | None = None
    timestamp_field: str | None = None
    max_payload_bytes: int = 262_144
    max_values_per_message: int = 1000
    metric: str = "value"
    reopen_backoff_max_s: float = 30.0
    # Resolved from password_env or password_file by load_config; not a key of the file.
    password: Secret | None = field(default=None, repr=False)

    def check(self, where: str, table: Mapping[str, Any]) -> None:
        _check_mqtt(self, where)

    def label_keys(self) -> frozenset[str]:
        if self.topic_fields is None:
            return super().label_keys()
        names = {n for n in topic_field_levels(self.topic_fields) if n is not None}
        return super().label_keys() | names

    def with_secrets(self, environ: Mapping[str, str], where: str) -> Self:
        if self.password_env is None and self.password_file is None:
            return self
        return dataclasses.replace(self, password=resolve_password(self, environ, where))

    def for_dry_run(self, device_id: str | None) -> Self:
        # A client id of its own, or the broker would push the running agent off (same id)
        # and hand the dry run that agent's session; with MQTT 5 the session ends with it.
        base = self.client_id or f"edge-agent-{device_id or socket.gethostname()}-{self.name}"
        return dataclasses.replace(self, client_id=f"{base}-once", session_expiry_s=0)

    def exposure_warnings(self) -> list[str]:
        label = f"[[sources]] ({self.name})"
        out = []
        has_password = self.password_env is not None or self.password_file is not None
        if has_password and self.broker is not None:
            broker = urlsplit(self.broker)
            if broker.scheme == "mqtt" and not is_loopback(broker.hostname):
                out.append(
                    f"{label} broker: mqtt:// to {broker.hostname} sends the password in "
                    "plain text over the network; use mqtts://"
                )
        if self.password_file is not None:
            out += readable_by_others(f"{label} password_file", self.password_file)
        return out

    def window(self, version: str) -> int:
        """The window used with MQTT `version` ("3.1.1" or "5"): `inflight_window` if set,
        else WINDOW_V5 with 5 (announced as Receive Maximum) and WINDOW_V311 with 3.1.1,
        where the broker decides (Mosquitto's max_inflight_messages, 20 by default)."""
        if self.inflight_window is not None:
            return self.inflight_window
        return WINDOW_V5 if version == "5" else WINDOW_V311

    def describe(self) -> str:
        if self.mqtt_version != "auto":
            version = f"MQTT {self.mqtt_version}"
        elif self.shared_group:
            version = "MQTT 5"  # shared subscriptions are MQTT 5: no falling back
        else:
            version = "MQTT 5, or 3.1.1 if the broker refuses 5"
        topics = ", ".join(self.topics)
        return f"mqtt {self.broker} topics {topics} (QoS {self.qos}, {version})"


# With MQTT 5 the broker honours our Receive Maximum: 1000 messages share one commit and its
# fsync. With 3.1.1 the broker's own limit applies, and a window above it would make every
# window wait for the commit interval: 20 is Mosquitto's default max_inflight_messages.
WINDOW_V5 = 1000
WINDOW_V311 = 20


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


def _check_mqtt(src: MqttConfig, where: str) -> None:
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
    check_range(src.qos, 0, 2, f"{where} qos")
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
    check_range(src.reopen_backoff_max_s, 1.0, 3600.0, f"{where} reopen_backoff_max_s")


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


def _check_mqtt_session(src: MqttConfig, where: str) -> None:
    check_range(src.keepalive_s, 5, 65_535, f"{where} keepalive_s")
    if src.inflight_window is not None:
        check_range(src.inflight_window, 1, 65_535, f"{where} inflight_window")
    check_range(src.session_expiry_s, 0, 4_294_967_295, f"{where} session_expiry_s")
    # "auto" speaks 5 whenever the broker does: session_expiry_s applies then, and a
    # shared_group keeps it on 5 (no fall back to 3.1.1, which has no shared subscriptions).
    only_v311 = src.mqtt_version == "3.1.1"
    if only_v311 and src.session_expiry_s != MqttConfig.session_expiry_s:
        raise ConfigError(
            f'{where} session_expiry_s: needs mqtt_version = "5" or "auto"; with 3.1.1 the '
            "broker decides how long it keeps the session (Mosquitto: "
            "persistent_client_expiration)"
        )
    if src.shared_group is not None:
        if only_v311:
            raise ConfigError(
                f'{where} shared_group: needs MQTT 5: set mqtt_version = "5" or "auto" (the '
                "default)"
            )
        if not src.shared_group or any(c in src.shared_group for c in "/+#"):
            raise ConfigError(
                f"{where} shared_group: a non-empty name without '/', '+' or '#', "
                f"got {src.shared_group!r}"
            )
    if src.client_id is not None and not src.client_id.strip():
        raise ConfigError(f"{where} client_id: must not be empty (leave it out for the default)")


def _check_mqtt_limits(src: MqttConfig, where: str) -> None:
    # A larger payload is dead-lettered, not read: the caps bound the memory one message takes
    # (268,435,455 bytes is the largest MQTT packet).
    check_range(src.max_payload_bytes, 64, 268_435_455, f"{where} max_payload_bytes")
    check_range(src.max_values_per_message, 1, 1_000_000, f"{where} max_values_per_message")


def _check_mqtt_credentials(src: MqttConfig, where: str) -> None:
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


def resolve_password(src: MqttConfig, environ: Mapping[str, str], where: str) -> Secret:
    """The broker password of an MQTT source, from its password_env or password_file.

    One line without control characters (one final line break is dropped).
    """
    label = f"{where}: [[sources]] ({src.name})"
    if src.password_env:
        value = strip_line_end(environ.get(src.password_env, ""))
        if not value:
            raise ConfigError(
                f"{label} password_env: the environment variable {src.password_env} is not set "
                "or empty; export it before starting the agent, or use password_file"
            )
        problem = password_problem(value)
        if problem:
            raise ConfigError(
                f"{label} password_env: the environment variable {src.password_env} {problem}"
            )
        return Secret(value)
    assert src.password_file is not None  # _with_password calls us only with one of the two
    try:
        data = read_small_file(src.password_file, SECRET_FILE_LIMIT)
    except NotASmallFile as exc:
        raise ConfigError(
            f"{label} password_file: {src.password_file} {exc}; point password_file at a file "
            "that holds the password on one line"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{label} password_file: cannot read {src.password_file} ({exc.strerror}); create "
            "it with the password on one line, readable by the agent"
        ) from None
    try:
        value = strip_line_end(decode_secret_file(data))
    except ValueError as exc:
        raise ConfigError(f"{label} password_file: {src.password_file} {exc}") from None
    problem = password_problem(value)
    if problem:
        raise ConfigError(f"{label} password_file: {src.password_file} {problem}")
    return Secret(value)
