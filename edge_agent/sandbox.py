"""A local stand-in for the Madevo insert API, with fault injection.

Over 600 lines on purpose: one tool with one job, used whole by the demo, the tests, the soak
and users; its parts (listed below) are small and only meet here, and it is imported only by
the commands that run it, never by `run`.

This module owns the sandbox: an HTTP server (`httpserver.QuietServer`, one thread per
request) that answers `POST /restapi/datasource/insert` the way the real API does, keeps what it
accepted in SQLite, and injects faults on demand (status codes, random 503s, latency, a size
limit, dropped connections after commit, per-field rejections) and answers a hostile network
gives (a captive portal's login page, an answer trickled a byte at a time, a huge body). The
demo and the tests upload to it, and users rehearse their setup against it.

    Sandbox          start/stop lifecycle, tokens, faults, records(), stats()
    Faults           what to inject; validated on construction (ConfigError)
    _Store           the SQLite table of accepted records, behind one lock
    _Handler         HTTP plumbing only: read the request, ask the Sandbox, write the answer
    add_arguments/run    the `edge-agent sandbox` command

Admin endpoints (no auth: this is a local test tool) let a sandbox in another process be driven:
`GET /_admin/stats`, `GET /_admin/records?datasource_id=X&limit=N`, `GET|POST /_admin/faults`,
`POST /_admin/tokens`.
"""

from __future__ import annotations

import argparse
import difflib
import email.utils
import itertools
import json
import logging
import math
import queue
import random
import re
import signal
import sqlite3
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qs

from edge_agent.errors import ConfigError
from edge_agent.httpserver import QuietHandler, QuietServer, bind_failure
from edge_agent.logs import printable

INSERT_PATH = "/restapi/datasource/insert"
SUCCESS_MESSAGE = "Data successfully inserted"
DEFAULT_TOKEN = "sandbox-token"
DEFAULT_DATASOURCE = "67890"
TIMESTAMP_EXAMPLE = "2025-01-01T12:00:00.123Z"
# What a hotel Wi-Fi or a SIM whose plan ran out answers to every request, with a 200.
PORTAL_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>GuestNet: sign in</title></head>\n"
    '<body><form method="post" action="/login"><p>Your data plan has run out. Sign in to '
    'continue.</p><input name="voucher"></form></body></html>\n'
)
_MIB = 1024 * 1024
_PAD_CHUNK = b"x" * 65536

log = logging.getLogger(__name__)

# re.ASCII: `\d` would otherwise accept non-ASCII digits that the real API would not.
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:Z|\+00:00)", re.ASCII
)


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Faults:
    """What the sandbox injects; all off by default. Invalid values raise ConfigError."""

    fail_rate: float = 0.0
    status: int | None = None
    latency_ms: int = 0
    retry_after: str | None = None
    max_bytes: int | None = None
    drop_after_commit: bool = False
    drop_after_commit_rate: float = 1.0
    reject_fields: dict[str, str] = field(default_factory=dict)
    # A server-side bug set off by one odd value: 500 to every insert holding a record with a
    # field of this value (compared as text), whatever else the request holds.
    fail_value: str | None = None
    seed: int | None = None
    # Answers of a hostile network: a captive portal answers 200 text/html to every insert
    # (nothing stored); trickle sends headers, then the body a byte every `trickle_s`;
    # huge_body_mb pads every insert answer (200 stored, 400 refused...) to that many MB.
    portal: bool = False
    trickle_s: float = 0.0
    huge_body_mb: int = 0
    # The Date header of every answer, as a server whose clock is off would send it: this
    # many seconds ahead (negative: behind), plus `date_skew_step_s` more for each answer
    # since the faults were set, so that successive answers disagree.
    date_skew_s: float = 0.0
    date_skew_step_s: float = 0.0
    # A server that takes no compressed bodies: 415 to every insert sent with gzip.
    no_gzip: bool = False
    # A server or proxy that takes no compressed bodies but says so with 400, not 415.
    gzip_400: bool = False

    def __post_init__(self) -> None:
        _require_rate("fail_rate", self.fail_rate)
        _require_rate("drop_after_commit_rate", self.drop_after_commit_rate)
        _require_int("status", self.status, low=400, high=599, optional=True)
        _require_int("latency_ms", self.latency_ms, low=0)
        _require_int("max_bytes", self.max_bytes, low=1, optional=True)
        _require_int("seed", self.seed, optional=True)
        _require_header_value("retry_after", self.retry_after)
        if not isinstance(self.drop_after_commit, bool):
            raise ConfigError(f"drop_after_commit: {self.drop_after_commit!r} is not true/false")
        _require_str_mapping("reject_fields", self.reject_fields)
        if self.fail_value is not None and (
            not isinstance(self.fail_value, str) or not self.fail_value
        ):
            raise ConfigError(f"fail_value: {self.fail_value!r} is not a non-empty string")
        if not isinstance(self.portal, bool):
            raise ConfigError(f"portal: {self.portal!r} is not true/false")
        if not isinstance(self.no_gzip, bool):
            raise ConfigError(f"no_gzip: {self.no_gzip!r} is not true/false")
        if not isinstance(self.gzip_400, bool):
            raise ConfigError(f"gzip_400: {self.gzip_400!r} is not true/false")
        _require_seconds("trickle_s", self.trickle_s, high=60.0)
        _require_int("huge_body_mb", self.huge_body_mb, low=0, high=1024)
        _require_skew("date_skew_s", self.date_skew_s)
        _require_skew("date_skew_step_s", self.date_skew_step_s)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "faults") -> Faults:
        """Build from a JSON object; unknown keys and bad values name `origin` and the key."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            listed = ", ".join(_with_hint(key, names) for key in unknown)
            raise ConfigError(f"{origin}: unknown key(s) {listed}; valid keys: {', '.join(names)}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The fields that differ from the defaults, for log lines."""
        default = Faults().to_dict()
        changed = [f"{k}={v}" for k, v in self.to_dict().items() if v != default[k]]
        return ", ".join(changed) or "none"


def _with_hint(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def _require_rate(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{name}: {value!r} is not a number from 0 to 1")


def _require_seconds(name: str, value: object, *, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise ConfigError(f"{name}: {value!r} is not a number of seconds from 0 to {high:g}")


def _require_skew(name: str, value: object) -> None:
    bound = 100 * 365 * 86400
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= bound:
        raise ConfigError(f"{name}: {value!r} is not a number of seconds within ±100 years")


def _require_int(
    name: str,
    value: object,
    *,
    low: int | None = None,
    high: int | None = None,
    optional: bool = False,
) -> None:
    if value is None and optional:
        return
    # bool is an int subclass; `true` as a status or byte limit is a mistake worth naming.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} is not an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}: {value} must be {bounds}")


def _require_header_value(name: str, value: object) -> None:
    if value is None:
        return
    # A newline would let the value inject extra response headers.
    if not isinstance(value, str) or not value.strip() or "\r" in value or "\n" in value:
        raise ConfigError(f"{name}: {value!r} is not a one-line header value (e.g. '5')")


def _require_str_mapping(name: str, value: object) -> None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{name}: {value!r} is not an object of NAME: VALUE strings")


# --------------------------------------------------------------------------- validation


class _Rejected(Exception):
    """A request the sandbox refuses; becomes a `{"message": ...}` answer."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class _NonFinite:
    """A JSON number that is not finite (NaN, Infinity, 1e999), kept so we can name it."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _parse_float(literal: str) -> float | _NonFinite:
    value = float(literal)
    return value if math.isfinite(value) else _NonFinite(literal)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float | _NonFinite):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _gunzip(body: bytes, limit: int | None) -> bytes:
    """Decode gzip, stopping just past `limit` so a small bomb cannot fill memory."""
    out = bytearray()
    rest = body
    try:
        while rest:  # a gzip body may hold several members
            decoder = zlib.decompressobj(wbits=31)
            out += decoder.decompress(rest, 0 if limit is None else limit + 1 - len(out))
            if limit is not None and len(out) > limit:
                break
            if not decoder.eof:
                raise _Rejected(400, "body: gzip stream is truncated")
            rest = decoder.unused_data
    except zlib.error as exc:
        raise _Rejected(
            400, f"body: Content-Encoding is gzip but the body is not ({exc})"
        ) from None
    return bytes(out)


def _decode_body(body: bytes, content_encoding: str | None, limit: int | None) -> Any:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "gzip":
        body = _gunzip(body, limit)
    elif encoding != "identity":
        raise _Rejected(415, f"Content-Encoding {encoding!r} is not supported (use gzip or none)")
    if limit is not None and len(body) > limit:
        raise _Rejected(
            413, f"body is over {limit} bytes after decoding; the limit is {limit} (max_bytes)"
        )
    try:
        return json.loads(body.decode("utf-8"), parse_float=_parse_float, parse_constant=_NonFinite)
    except UnicodeDecodeError as exc:
        raise _Rejected(400, f"body is not valid UTF-8 JSON ({exc.reason})") from None
    except ValueError as exc:
        raise _Rejected(400, f"body is not valid JSON: {exc}") from None


def _envelope(payload: Any) -> tuple[str, list[Any]]:
    """Check the top level of the body; return (datasource_id, data)."""
    if not isinstance(payload, dict):
        raise _Rejected(400, f"body: expected a JSON object, got {_json_type(payload)}")
    if "datasource_id" not in payload:
        raise _Rejected(400, 'datasource_id: required (a string, e.g. "67890")')
    datasource_id = payload["datasource_id"]
    if not isinstance(datasource_id, str):
        hint = (
            f" (write {json.dumps(_show(datasource_id))})"
            if _json_type(datasource_id) == "number"
            else ""
        )
        raise _Rejected(
            400, f"datasource_id: expected a string, got {_json_type(datasource_id)}{hint}"
        )
    if "data" not in payload:
        raise _Rejected(400, "data: required (an array of records)")
    data = payload["data"]
    if not isinstance(data, list):
        raise _Rejected(400, f"data: expected an array of records, got {_json_type(data)}")
    if not data:
        raise _Rejected(400, "data: must not be empty (send at least one record)")
    return datasource_id, data


def _check_records(data: list[Any]) -> list[dict[str, Any]]:
    """Apply the per-record rules in index order; the first problem found is the answer."""
    first: dict[str, str] | None = None
    for index, record in enumerate(data):
        path = f"data[{index}]"
        if not isinstance(record, dict):
            raise _Rejected(400, f"{path}: expected an object, got {_json_type(record)}")
        schema = {key: _json_type(value) for key, value in record.items()}
        if first is None:
            first = schema
        elif schema != first:
            difference = _schema_difference(first, schema)
            raise _Rejected(400, f"{path}: schema differs from data[0] ({difference})")
        if "timestamp" in record:
            _check_timestamp(record["timestamp"], f"{path}.timestamp")
        _check_finite(record, path)
    return data


def _schema_difference(expected: dict[str, str], got: dict[str, str]) -> str:
    parts = []
    if missing := sorted(expected.keys() - got.keys()):
        parts.append("missing " + ", ".join(missing))
    if extra := sorted(got.keys() - expected.keys()):
        parts.append("extra " + ", ".join(extra))
    for key in sorted(expected.keys() & got.keys()):
        if expected[key] != got[key]:
            parts.append(f"{key} is {got[key]}, not {expected[key]}")
    return "; ".join(parts)


def _check_timestamp(value: object, path: str) -> None:
    if not (isinstance(value, str) and _is_utc_iso8601(value)):
        raise _Rejected(
            400, f"{path}: {_show(value)} is not ISO 8601 UTC (expected e.g. {TIMESTAMP_EXAMPLE})"
        )


def _is_utc_iso8601(text: str) -> bool:
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(part) for part in match.groups())
    try:
        datetime(year, month, day, hour, minute, second)
    except ValueError:
        return False  # the right shape but not a date: month 13, 25 o'clock
    return True


def _show(value: object) -> str:
    """A value as JSON for an error message."""
    return json.dumps(value, default=lambda item: item.literal)


def _check_finite(value: object, path: str) -> None:
    if isinstance(value, _NonFinite):
        raise _Rejected(
            400, f"{path}: {value.literal} is not a finite number (JSON has no NaN or Infinity)"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{path}[{index}]")


def _check_rules(records: list[dict[str, Any]], rules: Mapping[str, str]) -> None:
    for index, record in enumerate(records):
        for name, value in rules.items():
            if name in record and str(record[name]) == value:
                raise _Rejected(400, f"data[{index}]: rejected by sandbox rule {name}={value}")


def _check_fail_value(records: list[dict[str, Any]], value: str | None) -> None:
    if value is None:
        return
    for record in records:
        if any(str(v) == value for v in record.values()):
            raise _Rejected(500, f"Internal server error (sandbox fault fail_value={value})")


def _check_token(header: str | None, tokens: frozenset[str]) -> None:
    challenge = (("WWW-Authenticate", "Bearer"),)
    if header is None:
        raise _Rejected(401, "missing Authorization header (expected: Bearer <token>)", challenge)
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _Rejected(401, "malformed Authorization header (expected: Bearer <token>)", challenge)
    if token.strip() not in tokens:
        # Never echo the token: these messages end up in logs.
        raise _Rejected(401, "unknown token: not accepted by this sandbox", challenge)


# --------------------------------------------------------------------------- storage


class _Store:
    """Accepted records in arrival order; one connection shared by the handler threads."""

    def __init__(self, db_path: str | Path | None) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            ":memory:" if db_path is None else str(db_path), check_same_thread=False
        )
        with self._lock, self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS records ("
                " id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " datasource_id TEXT NOT NULL,"
                " body TEXT NOT NULL)"
            )

    def add(self, datasource_id: str, records: list[dict[str, Any]]) -> None:
        rows = [(datasource_id, json.dumps(record)) for record in records]
        with self._lock, self._conn:
            self._conn.executemany("INSERT INTO records (datasource_id, body) VALUES (?, ?)", rows)

    def records(self, datasource_id: str | None, limit: int | None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT body FROM records WHERE ?1 IS NULL OR datasource_id = ?1"
                " ORDER BY id LIMIT ?2",
                (datasource_id, -1 if limit is None else limit),  # SQLite: LIMIT -1 is no limit
            ).fetchall()
        return [json.loads(body) for (body,) in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT datasource_id, COUNT(*) FROM records GROUP BY datasource_id ORDER BY 1"
            ).fetchall()
        return dict(rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# --------------------------------------------------------------------------- the sandbox


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    note: str = ""  # the end of the log line
    html: str | None = None  # a page instead of the JSON body
    trickle_s: float = 0.0  # seconds between the body's bytes
    pad_bytes: int = 0  # added to the body

    def payload(self) -> tuple[bytes, bytes, str]:
        """(head, tail, content type): the body is head, `pad_bytes` of padding, tail."""
        if self.html is not None:
            if not self.pad_bytes:
                return self.html.encode(), b"", "text/html; charset=utf-8"
            return (self.html + "<!-- ").encode(), b" -->", "text/html; charset=utf-8"
        text = json.dumps(self.body)
        if not self.pad_bytes or not isinstance(self.body, dict):
            return text.encode(), b"", "application/json"
        return (text[:-1] + ', "padding": "').encode(), b'"}', "application/json"


class Sandbox:
    """A local insert API. Lifecycle: new -> start() -> stop(); a stopped one is not reused."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Iterable[str] = (DEFAULT_TOKEN,),
        datasources: Iterable[str] = (DEFAULT_DATASOURCE,),
        db_path: str | Path | None = None,
        faults: Faults | None = None,
    ) -> None:
        self._address = (host, port)
        self._datasources = frozenset(datasources)
        self._db_path = db_path
        self._lock = threading.Lock()  # guards tokens, faults, rng and the counters
        self._tokens = _token_set(tokens)
        self._faults = Faults()
        self._rng = random.Random()
        self.set_faults(faults or Faults())
        self._by_status: Counter[str] = Counter()
        self._bytes = 0
        self._wire_bytes = 0
        self._state = "new"
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._store: _Store | None = None

    # lifecycle

    def start(self) -> Sandbox:
        if self._state != "new":
            raise RuntimeError(
                f"this Sandbox is {self._state}; make a new one with the same db_path and port"
            )
        store = _Store(self._db_path)
        try:
            server = _Server(self._address, self)
        except OSError:
            store.close()
            raise
        self._store, self._server = store, server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits up to one poll interval
            name=f"sandbox:{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._state = "running"
        return self

    def stop(self) -> None:
        if self._state == "running":
            assert self._server is not None and self._thread is not None
            assert self._store is not None
            self._stopping.set()
            self._server.shutdown()
            self._server.server_close()  # also waits for requests in flight
            self._thread.join()
            self._store.close()
        self._state = "stopped"

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the sandbox has no port until start()")
        return int(self._server.server_address[1])

    @property
    def stopping(self) -> bool:
        """True once stop() began: answers being trickled end."""
        return self._stopping.is_set()

    @property
    def url(self) -> str:
        host = self._address[0]
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"  # the wildcard address is not something a client can dial
        return f"http://{host}:{self.port}{INSERT_PATH}"

    # configuration

    def set_faults(self, faults: Faults) -> None:
        # Copy the dict so the caller mutating theirs cannot change a running sandbox.
        faults = replace(faults, reject_fields=dict(faults.reject_fields))
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)
            self._dates = 0  # answers dated since: date_skew_step_s counts from here

    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def set_tokens(self, tokens: Iterable[str]) -> None:
        new = _token_set(tokens)
        with self._lock:
            self._tokens = new

    # inspection

    def records(
        self, datasource_id: str | None = None, *, limit: int | None = None
    ) -> list[dict[str, Any]]:
        return self._running_store().records(datasource_id, limit)

    def stats(self) -> dict[str, Any]:
        by_datasource = self._running_store().counts()
        with self._lock:
            return {
                "requests": sum(self._by_status.values()),
                "by_status": dict(sorted(self._by_status.items())),
                "records": sum(by_datasource.values()),
                "records_by_datasource": by_datasource,
                "bytes": self._bytes,
                # Request lines, headers and bodies as received: what a client put on the wire.
                "wire_bytes": self._wire_bytes,
            }

    def _running_store(self) -> _Store:
        if self._state != "running" or self._store is None:
            raise RuntimeError(
                f"the sandbox is {self._state}; read records while it runs "
                "(with db_path, a new Sandbox on the same file sees them)"
            )
        return self._store

    # request handling (called from the handler threads)

    def date_header(self) -> str:
        """The Date of an answer now, skewed as the faults say (RFC 9110 format)."""
        with self._lock:
            skew = self._faults.date_skew_s + self._dates * self._faults.date_skew_step_s
            self._dates += 1
        return email.utils.formatdate(time.time() + skew, usegmt=True)

    def _count(self, outcome: str, body_bytes: int, wire_bytes: int) -> None:
        with self._lock:
            self._by_status[outcome] += 1
            self._bytes += body_bytes
            self._wire_bytes += wire_bytes

    def _plan(self) -> tuple[Faults, frozenset[str], bool, bool]:
        """Snapshot faults and tokens, and draw this request's random faults in one place."""
        with self._lock:
            faults = self._faults
            fail = faults.fail_rate > 0 and self._rng.random() < faults.fail_rate
            drop = faults.drop_after_commit and self._rng.random() < faults.drop_after_commit_rate
            return faults, self._tokens, fail, drop

    def _answer_insert(
        self, authorization: str | None, content_encoding: str | None, body: bytes
    ) -> tuple[str, _Answer]:
        """Return (datasource_id or "-", answer); stores the records when they are accepted."""
        faults, tokens, fail, drop = self._plan()
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        datasource_id, answer = self._insert(
            faults, tokens, fail, drop, authorization, content_encoding, body
        )
        return datasource_id, _shaped(answer, faults)

    def _insert(
        self,
        faults: Faults,
        tokens: frozenset[str],
        fail: bool,
        drop: bool,
        authorization: str | None,
        content_encoding: str | None,
        body: bytes,
    ) -> tuple[str, _Answer]:
        if faults.portal:  # something between answered: the API never saw the request
            return "-", _Answer(200, None, html=PORTAL_PAGE, note="captive portal page")
        if faults.status is not None or fail:
            return "-", _injected(faults, fail)
        datasource_id = "-"
        try:
            _check_token(authorization, tokens)
            gzipped = (content_encoding or "").strip().lower() == "gzip"
            if faults.no_gzip and gzipped:
                raise _Rejected(
                    415, "Content-Encoding gzip is not accepted here (no_gzip); send plain JSON"
                )
            if faults.gzip_400 and gzipped:
                raise _Rejected(400, "body: not valid JSON (gzip_400: compressed bodies)")
            datasource_id, data = _envelope(_decode_body(body, content_encoding, faults.max_bytes))
            if datasource_id not in self._datasources:
                served = ", ".join(sorted(self._datasources))
                raise _Rejected(
                    403,
                    f"datasource_id {json.dumps(datasource_id)} is not served by this sandbox"
                    f" (it serves {served})",
                )
            records = _check_records(data)
            _check_fail_value(records, faults.fail_value)
            _check_rules(records, faults.reject_fields)
            self._running_store().add(datasource_id, records)
        except _Rejected as exc:
            return datasource_id, _message(exc.status, exc.message, exc.headers)
        except sqlite3.Error as exc:
            return datasource_id, _message(500, f"sandbox store failed: {exc}")
        return datasource_id, _Answer(
            200, {"message": SUCCESS_MESSAGE}, drop=drop, note=f"{len(records)} records"
        )

    def _answer_admin(self, method: str, path: str, query: str, body: bytes) -> _Answer:
        routes = {
            ("GET", "/_admin/stats"): lambda: _Answer(200, self.stats()),
            ("GET", "/_admin/records"): lambda: self._admin_records(query),
            ("GET", "/_admin/faults"): lambda: _Answer(200, self.faults().to_dict()),
            ("POST", "/_admin/faults"): lambda: self._admin_faults(body),
            ("POST", "/_admin/tokens"): lambda: self._admin_tokens(body),
        }
        route = routes.get((method, path))
        if route is not None:
            try:
                return route()
            except _Rejected as exc:
                return _message(exc.status, exc.message)
        allowed = sorted(m for m, p in routes if p == path)
        if allowed:
            return _message(
                405, f"{method} is not allowed on {path}", (("Allow", ", ".join(allowed)),)
            )
        return _message(404, f"no admin endpoint {path}")

    def _admin_records(self, query: str) -> _Answer:
        params = parse_qs(query)
        datasource_id = params.get("datasource_id", [None])[-1]
        limit_text = params.get("limit", [None])[-1]
        limit = None
        if limit_text is not None:
            if not limit_text.isdigit():
                raise _Rejected(400, f"limit: {limit_text!r} is not a non-negative integer")
            limit = int(limit_text)
        return _Answer(200, self.records(datasource_id, limit=limit))

    def _admin_faults(self, body: bytes) -> _Answer:
        data = _admin_json(body)
        try:
            faults = Faults.from_mapping(data)
        except ConfigError as exc:
            raise _Rejected(400, str(exc)) from None
        self.set_faults(faults)
        return _Answer(200, faults.to_dict(), note=faults.describe())

    def _admin_tokens(self, body: bytes) -> _Answer:
        data = _admin_json(body)
        if set(data) != {"tokens"}:
            raise _Rejected(400, 'expected exactly {"tokens": ["..."]}')
        try:
            tokens = _token_set(data["tokens"])
        except ConfigError as exc:
            raise _Rejected(400, str(exc)) from None
        self.set_tokens(tokens)
        return _Answer(200, {"message": f"tokens replaced ({len(tokens)} accepted)"})


def _token_set(tokens: Iterable[str]) -> frozenset[str]:
    if isinstance(tokens, str) or not isinstance(tokens, Iterable):
        raise ConfigError("tokens: expected a list of strings")
    found = frozenset(tokens)
    if not found or not all(isinstance(t, str) and t.strip() == t and t for t in found):
        raise ConfigError("tokens: expected one or more non-empty strings without spaces")
    return found


def _injected(faults: Faults, fail: bool) -> _Answer:
    if faults.status is not None:
        status, why = faults.status, "status"
    else:
        status, why = 503, f"fail_rate={faults.fail_rate}"
    headers = (("Retry-After", faults.retry_after),) if faults.retry_after else ()
    return _message(status, f"injected fault: {status} by sandbox ({why})", headers)


def _shaped(answer: _Answer, faults: Faults) -> _Answer:
    """The answer as the hostile-network faults send it: trickled, padded."""
    if not (faults.trickle_s or faults.huge_body_mb):
        return answer
    notes = [answer.note]
    if faults.trickle_s:
        notes.append(f"trickled a byte every {faults.trickle_s:g} s")
    if faults.huge_body_mb:
        notes.append(f"padded to {faults.huge_body_mb} MB")
    return replace(
        answer,
        trickle_s=faults.trickle_s,
        pad_bytes=faults.huge_body_mb * _MIB,
        note="; ".join(n for n in notes if n),
    )


def _message(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> _Answer:
    return _Answer(status, {"message": message}, headers, note=message)


def _admin_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise _Rejected(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _Rejected(400, f"body: expected a JSON object, got {_json_type(data)}")
    return data


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(QuietServer):
    allow_reuse_address = True  # a new sandbox can take the same port right after stop()

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        super().__init__(address, _Handler, log, "sandbox")


class _Handler(QuietHandler):
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        body = self._read_body()
        sandbox = self.server.sandbox
        if path.startswith("/_admin/"):
            answer = sandbox._answer_admin(self.command, path, query, body or b"")
            note = printable(answer.note)
            log.info("sandbox: admin %s %s %s %s", self.command, path, answer.status, note)
            self._send(answer)
            return
        datasource_id, answer = self._answer_api(path, body)
        outcome = "dropped" if answer.drop else "portal" if answer.html else str(answer.status)
        sandbox._count(outcome, len(body or b""), self._wire_bytes(body))
        if answer.drop:
            log.info(
                "sandbox: dropped %s %s stored, connection closed without an answer",
                datasource_id,
                printable(answer.note),
            )
        else:
            # Printable: the note may quote a record's value (a rule), CR LF and all.
            log.info(
                "sandbox: %s %s %s", answer.status, printable(datasource_id), printable(answer.note)
            )
        self._send(answer)

    def _answer_api(self, path: str, body: bytes | None) -> tuple[str, _Answer]:
        if path != INSERT_PATH:
            return "-", _message(404, f"no such endpoint {path} (the insert API is {INSERT_PATH})")
        if self.command != "POST":
            return "-", _message(
                405, f"{self.command} is not allowed; use POST", (("Allow", "POST"),)
            )
        if body is None:
            return "-", _message(
                411, "Content-Length is required (chunked bodies are not supported)"
            )
        return self.server.sandbox._answer_insert(
            self.headers.get("Authorization"), self.headers.get("Content-Encoding"), body
        )

    def _wire_bytes(self, body: bytes | None) -> int:
        """The request as it came: request line, headers, the blank line, the body."""
        headers = sum(len(k) + len(v) + 4 for k, v in self.headers.items())
        line = len(self.requestline.encode("latin-1", "replace")) + 2
        return line + headers + 2 + len(body or b"")

    def _read_body(self) -> bytes | None:
        """The body per Content-Length, or None without one. Read even when unused, because
        closing a socket with unread input makes the kernel reset it and lose our answer."""
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            return None
        return self.rfile.read(int(length))

    def _send(self, answer: _Answer) -> None:
        if answer.drop:
            self.close_connection = True
            return
        head, tail, content_type = answer.payload()
        self.send_response(answer.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(head) + answer.pad_bytes + len(tail)))
        for name, value in answer.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if answer.trickle_s:
            self._trickle(head, tail, answer)
            return
        self.wfile.write(head)
        for start in range(0, answer.pad_bytes, len(_PAD_CHUNK)):  # never all in memory
            self.wfile.write(_PAD_CHUNK[: answer.pad_bytes - start])
        self.wfile.write(tail)

    def _trickle(self, head: bytes, tail: bytes, answer: _Answer) -> None:
        """One byte, then a pause; a client that hangs up ends it (a write error)."""
        self.wfile.flush()
        padding = itertools.repeat(b"x", answer.pad_bytes)
        for byte in itertools.chain(_one_by_one(head), padding, _one_by_one(tail)):
            if self.server.sandbox.stopping:
                return
            time.sleep(answer.trickle_s)
            self.wfile.write(byte)
            self.wfile.flush()

    def date_time_string(self, timestamp: float | None = None) -> str:
        # send_response's Date header: the server's clock, skewed on demand.
        return self.server.sandbox.date_header()


def _one_by_one(data: bytes) -> Iterator[bytes]:
    return (data[i : i + 1] for i in range(len(data)))


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `edge-agent sandbox` flags to `parser`."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    add("--port", type=_port, default=8080, help="port to listen on; 0 picks one (default: 8080)")
    add(
        "--token",
        dest="tokens",
        action="append",
        metavar="TOKEN",
        help=f"accepted bearer token; repeatable (default: {DEFAULT_TOKEN})",
    )
    add(
        "--datasource",
        dest="datasources",
        action="append",
        metavar="ID",
        help=f"data source id served; repeatable (default: {DEFAULT_DATASOURCE})",
    )
    add(
        "--db", type=Path, metavar="FILE", help="keep records in this SQLite file (default: memory)"
    )
    add("--fail-rate", type=_rate, default=0.0, help="share of inserts answered 503 at random")
    add("--status", type=_status, metavar="CODE", help="answer every insert with this status")
    add("--latency-ms", type=_non_negative_int, default=0, help="delay before each answer")
    add("--retry-after", metavar="VALUE", help="Retry-After header sent with injected faults")
    add("--max-bytes", type=_positive_int, help="answer 413 to bodies larger than this (decoded)")
    add(
        "--drop-after-commit",
        action="store_true",
        help="store each batch, then close the connection without answering",
    )
    add(
        "--drop-after-commit-rate",
        type=_rate,
        default=1.0,
        help="share of inserts --drop-after-commit applies to (default: 1)",
    )
    add(
        "--reject-field",
        dest="reject_fields",
        action="append",
        type=_name_value,
        metavar="NAME=VALUE",
        help="answer 400 to batches with a record where NAME is VALUE",
    )
    add(
        "--fail-on-value",
        dest="fail_value",
        metavar="VALUE",
        help="answer 500 to inserts holding a record with a field of this value (a server bug)",
    )
    add("--seed", type=int, help="seed for the random faults")
    add(
        "--portal",
        action="store_true",
        help="answer every insert like a captive portal: 200 text/html, nothing stored",
    )
    add(
        "--trickle-s",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="send each answer's headers, then its body one byte every S seconds",
    )
    add(
        "--huge-body-mb",
        type=_int_in(0, 1024),
        default=0,
        metavar="MB",
        help="pad every insert answer's body (200, 400...) to this many MB",
    )
    add(
        "--date-skew-s",
        type=_skew,
        default=0.0,
        metavar="S",
        help="send a Date header S seconds ahead of this machine's clock (negative: behind)",
    )
    add(
        "--date-skew-step-s",
        type=_skew,
        default=0.0,
        metavar="S",
        help="skew each answer's Date S seconds more than the previous one's",
    )
    add(
        "--no-gzip",
        action="store_true",
        help="answer 415 to every insert sent with Content-Encoding: gzip",
    )
    add(
        "--gzip-400",
        action="store_true",
        help="answer 400 to every insert sent with Content-Encoding: gzip (as some proxies do)",
    )
    add(
        "--faults-file",
        type=Path,
        metavar="FILE",
        help="JSON object of fault fields over the flags; re-read on SIGHUP",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; return the exit status (2 for bad fault settings)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # our lines go to stderr once, whatever the root logger does
    try:
        return _serve(args)
    finally:
        log.removeHandler(handler)
        log.setLevel(previous[0])
        log.propagate = previous[1]


def _serve(args: argparse.Namespace) -> int:
    try:
        base = _faults_from_args(args)
        faults = _load_faults_file(args.faults_file, base) if args.faults_file else base
        tokens = args.tokens or [DEFAULT_TOKEN]
        _token_set(tokens)
    except ConfigError as exc:
        print(f"edge-agent sandbox: error: {exc}", file=sys.stderr)
        return 2
    sandbox = Sandbox(
        host=args.host,
        port=args.port,
        tokens=tokens,
        datasources=args.datasources or [DEFAULT_DATASOURCE],
        db_path=args.db,
        faults=faults,
    )
    with _signals_to_queue() as received:
        try:
            sandbox.start()
        except OSError as exc:
            print(
                f"edge-agent sandbox: error: cannot listen on {args.host}:{args.port}: "
                f"{bind_failure(exc)}",
                file=sys.stderr,
            )
            return 1
        try:
            _announce(sandbox, args, len(set(tokens)), faults)
            while received.get() == signal.SIGHUP:
                _reload(sandbox, args.faults_file, base)
        finally:
            sandbox.stop()
    log.info("sandbox: stopped")
    return 0


def _announce(sandbox: Sandbox, args: argparse.Namespace, tokens: int, faults: Faults) -> None:
    datasources = ", ".join(args.datasources or [DEFAULT_DATASOURCE])
    origin = "from --token" if args.tokens else "default"
    log.info(
        "sandbox: listening on %s (datasources: %s; %d token(s) set, %s; faults: %s)",
        sandbox.url,
        datasources,
        tokens,
        origin,
        faults.describe(),
    )


@contextmanager
def _signals_to_queue() -> Iterator[queue.SimpleQueue[int]]:
    """Turn SIGINT, SIGTERM and SIGHUP into queue items for the main loop, then restore."""
    received: queue.SimpleQueue[int] = queue.SimpleQueue()

    def put(signum: int, _frame: FrameType | None) -> None:
        received.put(signum)

    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, put) for signum in watched}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _reload(sandbox: Sandbox, path: Path | None, base: Faults) -> None:
    if path is None:
        log.info("sandbox: SIGHUP ignored (no --faults-file)")
        return
    try:
        faults = _load_faults_file(path, base)
    except ConfigError as exc:
        log.error("sandbox: faults file not applied, previous faults stay: %s", exc)
        return
    sandbox.set_faults(faults)
    log.info("sandbox: faults reloaded from %s: %s", path, faults.describe())


def _load_faults_file(path: Path, base: Faults) -> Faults:
    """The file's fields over `base` (the flags); a field left out of the file reverts to it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of fault fields")
    return Faults.from_mapping({**base.to_dict(), **data}, origin=str(path))


def _faults_from_args(args: argparse.Namespace) -> Faults:
    return Faults(
        fail_rate=args.fail_rate,
        status=args.status,
        latency_ms=args.latency_ms,
        retry_after=args.retry_after,
        max_bytes=args.max_bytes,
        drop_after_commit=args.drop_after_commit,
        drop_after_commit_rate=args.drop_after_commit_rate,
        reject_fields=dict(args.reject_fields or []),
        fail_value=args.fail_value or None,
        seed=args.seed,
        portal=args.portal,
        trickle_s=args.trickle_s,
        huge_body_mb=args.huge_body_mb,
        date_skew_s=args.date_skew_s,
        date_skew_step_s=args.date_skew_step_s,
        no_gzip=args.no_gzip,
        gzip_400=args.gzip_400,
    )


def _skew(text: str) -> float:
    try:
        value = float(text)
        _require_skew("seconds", value)
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds within ±100 years"
        ) from None
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # fails the range check below, with the same message
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 60")
    return value


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for a bounded integer; the Faults check, so flags and files agree."""

    def convert(text: str) -> int:
        try:
            value = int(text)
            _require_int("value", value, low=low, high=high)
        except (ValueError, ConfigError):
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer {bounds}") from None
        return value

    return convert


_status = _int_in(400, 599)
_non_negative_int = _int_in(0)
_positive_int = _int_in(1)
_port = _int_in(0, 65535)


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, e.g. reading_id=bad")
    return name, value
