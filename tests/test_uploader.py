"""The uploader against `httpx.MockTransport` and a real buffer: the response table, unit by unit.

Each test puts readings in a real SQLite buffer, runs the uploader thread against a fake insert
API (a function of the request), and looks at what the API received and what the buffer kept.
`tests/test_upload_faults.py` does the same over real HTTP against the sandbox.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import itertools
import json
import logging
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.buffer import Buffer, BufferSession
from edge_agent.config import BufferConfig, EndpointConfig, Secret
from edge_agent.errors import ConfigError
from edge_agent.exchange import Reply
from edge_agent.records import Reading
from edge_agent.uploader import (
    MAX_ANSWER_BYTES,
    PAUSE_S,
    Uploader,
    Verdict,
    classify,
    judge,
    parse_retry_after,
    split_bound,
    tls_context,
)
from tests.helpers import wait_until

URL = "http://ingest.test/restapi/datasource/insert"
DS = "67890"


# --------------------------------------------------------------------------- a fake API


@dataclass
class Sent:
    """One request as the fake API saw it."""

    at: float  # monotonic
    token: str
    gzip: bool
    datasource_id: str
    data: list[dict[str, Any]]

    @property
    def seqs(self) -> list[int]:
        return [int(r["seq"]) for r in self.data]


# A rule answers one request: a status, or (status, message, headers); it may raise an
# httpx error to stand for the network.
Rule = Callable[[Sent], "int | tuple[int, str, dict[str, str]]"]


class FakeApi:
    """The insert API as a MockTransport handler: records requests, applies `rule`."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.sent: list[Sent] = []
        self.accepted: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        encoded = request.headers.get("Content-Encoding") == "gzip"
        body = gzip.decompress(request.content) if encoded else request.content
        doc = json.loads(body)
        token = request.headers["Authorization"].removeprefix("Bearer ")
        sent = Sent(time.monotonic(), token, encoded, doc["datasource_id"], doc["data"])
        with self._lock:
            self.sent.append(sent)
        answer = self.rule(sent)
        status, message, headers = answer if isinstance(answer, tuple) else (answer, "", {})
        if 200 <= status < 300:
            with self._lock:
                self.accepted.extend(sent.data)
            message = message or "Data successfully inserted"
        return httpx.Response(
            status, json={"message": message or f"status {status}"}, headers=headers
        )

    def delivered_seqs(self) -> list[int]:
        with self._lock:
            return [int(r["seq"]) for r in self.accepted]


def ok(_: Sent) -> int:
    return 200


def record(seq: int, **extra: Any) -> dict[str, Any]:
    return {
        "timestamp": "2025-01-01T12:00:00.000Z",
        "metric": "t",
        "value": 20.5,
        "seq": seq,
        **extra,
    }


def endpoint(**overrides: Any) -> EndpointConfig:
    base = EndpointConfig(
        url=URL,
        token_file="unused",
        flush_interval_s=0.0,
        timeout_s=2.0,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        reconnect_probe_s=0.1,
    )
    return replace(base, **overrides)


class LogLines(logging.Handler):
    """Collects the uploader's log lines (whatever other tests did to propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))

    def matching(self, text: str, level: int = logging.DEBUG) -> list[str]:
        return [m for lvl, m in self.lines if text in m and lvl >= level]


@dataclass
class Harness:
    """A real buffer in a temporary directory and uploaders on fake APIs."""

    path: Path
    buffer: Buffer
    logs: LogLines
    uploaders: list[Uploader] = field(default_factory=list)

    def put(self, records: list[dict[str, Any]], datasource_id: str = DS) -> None:
        assert self.buffer.put([Reading(datasource_id, r) for r in records])
        assert self.buffer.flush()

    def start(
        self,
        api: FakeApi,
        *,
        token: str = "good",
        token_source: Callable[[], Secret] | None = None,
        rng: random.Random | None = None,
        probe: Callable[[EndpointConfig], str | None] = lambda ep: None,
        **overrides: Any,
    ) -> Uploader:
        """`probe` stands for the link: the fake API's host is no real one to dial."""
        up = Uploader(
            endpoint(**overrides),
            Secret(token),
            self.buffer,
            transport=httpx.MockTransport(api),
            rng=rng or random.Random(1),
            token_source=token_source,
            probe=probe,
        )
        up.start()
        self.uploaders.append(up)
        return up

    def session(self) -> BufferSession:
        return BufferSession(self.buffer.path)

    def pending(self) -> int:
        s = self.session()
        try:
            return s.pending_count()
        finally:
            s.close()

    def dead_letters(self) -> list[dict[str, Any]]:
        s = self.session()
        try:
            return s.dead_letters()
        finally:
            s.close()

    def close(self) -> None:
        for up in self.uploaders:
            up.stop(5.0)
        self.buffer.close()


@contextlib.contextmanager
def open_harness(path: Path) -> Iterator[Harness]:
    logs = LogLines()
    logger = logging.getLogger("edge_agent.uploader")
    level = logger.level
    logger.addHandler(logs)
    logger.setLevel(logging.DEBUG)
    buffer = Buffer(path / "buffer.db", BufferConfig(commit_interval_ms=5, sync="normal"))
    buffer.open()
    harness = Harness(path, buffer, logs)
    try:
        yield harness
    finally:
        harness.close()
        logger.removeHandler(logs)
        logger.setLevel(level)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with open_harness(tmp_path) as h:
        yield h


def settled(h: Harness) -> bool:
    return h.pending() == 0


# --------------------------------------------------------------------------- pure functions


V = Verdict


@pytest.mark.parametrize(
    ("status", "gzip_sent", "verdict"),
    [
        (200, False, V.DELIVERED),
        (201, True, V.DELIVERED),
        (204, False, V.DELIVERED),
        (400, False, V.BAD_RECORDS),
        (401, False, V.BAD_TOKEN),
        (403, False, V.FORBIDDEN),
        (404, False, V.WRONG_URL),
        (407, False, V.TRANSIENT),  # a proxy wants credentials: the records are fine
        (408, False, V.TRANSIENT),
        (409, False, V.BAD_RECORDS),
        (413, True, V.TOO_LARGE),
        (415, True, V.NO_GZIP),
        (415, False, V.BAD_RECORDS),
        (422, False, V.BAD_RECORDS),
        (429, False, V.TRANSIENT),
        (500, False, V.TRANSIENT),
        (502, False, V.TRANSIENT),
        (503, True, V.TRANSIENT),
        (504, False, V.TRANSIENT),
        (301, False, V.WRONG_URL),
    ],
)
def test_classify_follows_the_design_table(status: int, gzip_sent: bool, verdict: Verdict) -> None:
    assert classify(status, gzip_sent) is verdict


NOW = 1_750_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),  # "... GMT"
        (email.utils.formatdate(NOW + 45), 45.0),  # "... -0000", which parses without a zone
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: retry now
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
    ],
)
def test_retry_after_takes_seconds_or_an_http_date(value: str | None, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


@settings(max_examples=200)
@given(
    failures=st.integers(1, 80),
    seed=st.integers(0, 2**32),
    base=st.floats(0.01, 10.0),
    cap_factor=st.floats(1.0, 1000.0),
)
def test_backoff_is_full_jitter_under_the_exponential_ceiling(
    failures: int, seed: int, base: float, cap_factor: float
) -> None:
    ep = endpoint(backoff_base_s=base, backoff_max_s=base * cap_factor)
    up = Uploader(
        ep, Secret("t"), Buffer(Path("unused.db"), BufferConfig()), rng=random.Random(seed)
    )
    delay = up.backoff_delay(failures)
    assert 0.0 <= delay <= min(ep.backoff_max_s, base * 2 ** (failures - 1))


def test_backoff_spreads_over_the_whole_range_and_retry_after_sets_a_floor() -> None:
    ep = endpoint(backoff_base_s=1.0, backoff_max_s=300.0)
    up = Uploader(ep, Secret("t"), Buffer(Path("unused.db"), BufferConfig()), rng=random.Random(7))
    fifth = [up.backoff_delay(5) for _ in range(500)]  # ceiling 16 s
    assert min(fifth) < 1.0 and max(fifth) > 15.0
    assert max(up.backoff_delay(30) for _ in range(500)) <= 300.0  # the cap
    assert all(up.backoff_delay(1, retry_after=3.0) >= 3.0 for _ in range(100))
    assert up.backoff_delay(1, retry_after=100_000.0) == 300.0  # honoured up to the cap


def test_split_bound_is_log2_of_the_batch_per_bad_record() -> None:
    assert split_bound(500, 3) == 1 + 2 * 3 * 9
    assert split_bound(1, 1) == 1
    assert split_bound(8, 1) == 7  # 8 -> 4+4 -> 2+2 -> 1+1


# --------------------------------------------------------------------------- 400: bisection


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 64), bad=st.sets(st.integers(0, 63), max_size=5))
def test_bisection_isolates_exactly_the_refused_records_within_the_bound(
    n: int, bad: set[int]
) -> None:
    bad = {b for b in bad if b < n}

    def rule(sent: Sent) -> int | tuple[int, str, dict[str, str]]:
        for i, seq in enumerate(sent.seqs):
            if seq in bad:
                return 400, f"data[{i}]: seq {seq} is refused", {}
        return 200

    with tempfile.TemporaryDirectory() as tmp, open_harness(Path(tmp)) as h:
        h.put([record(i) for i in range(n)])
        api = FakeApi(rule)
        # gzip = true: under "auto" a first 400 to gzip is tried once as plain JSON first
        # (tests/test_budget.py); the bound is the bisection's own.
        up = h.start(api, max_batch_records=64, gzip=True)
        wait_until(lambda: settled(h), what="every reading delivered or dead-lettered")
        good = [i for i in range(n) if i not in bad]
        assert api.delivered_seqs() == good  # in order, each once
        dead = h.dead_letters()
        assert sorted(d["record"]["seq"] for d in dead) == sorted(bad)
        for d in dead:
            assert d["status"] == 400
            assert d["reason"] == f"data[0]: seq {d['record']['seq']} is refused"
        assert len(api.sent) <= split_bound(n, len(bad))
        assert up.stats.split_requests == len(api.sent) - 1
        assert up.stats.records_dead_lettered == len(bad)


def test_dead_letter_attempts_count_every_request_that_carried_the_record(
    harness: Harness,
) -> None:
    calls = 0

    def rule(sent: Sent) -> int | tuple[int, str, dict[str, str]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return 503  # a retry carries the record too
        return (400, "seq 5 is refused", {}) if 5 in sent.seqs else 200

    harness.put([record(i) for i in range(8)])
    api = FakeApi(rule)
    harness.start(api, gzip=True)  # no plain try of the first 400 (gzip = "auto")
    wait_until(lambda: settled(harness), what="the batch settled")
    (dead,) = harness.dead_letters()
    # 503 on all 8, 400 on all 8, then [4..7], [4, 5] and [5] alone.
    assert dead["record"]["seq"] == 5
    assert dead["attempts"] == 5
    assert sum(5 in s.seqs for s in api.sent) == 5
    assert harness.logs.matching("it is kept in dead letters", logging.WARNING)


# --------------------------------------------------------------------------- 401, 403, 404


def token_rule(sent: Sent) -> int | tuple[int, str, dict[str, str]]:
    return 200 if sent.token == "new" else (401, "unknown token", {})


def test_401_pauses_uploads_keeps_readings_and_a_new_token_file_resumes_at_once(
    harness: Harness,
) -> None:
    token = {"value": "old"}
    harness.put([record(i) for i in range(10)])
    api = FakeApi(token_rule)
    up = harness.start(api, token="old", token_source=lambda: Secret(token["value"]))
    wait_until(lambda: api.sent, what="the first request")
    time.sleep(0.5)  # paused for PAUSE_S: no second request comes in this window
    assert len(api.sent) == 1
    assert "*" in up.stats.paused
    assert harness.pending() == 10
    (line,) = harness.logs.matching("token rejected by", logging.ERROR)
    assert f"token rejected by {URL} (401: unknown token); readings are kept" in line
    token["value"] = "new"
    wait_until(lambda: settled(harness), timeout=PAUSE_S / 4, what="delivery with the new token")
    assert [s.token for s in api.sent] == ["old", "new"]
    assert api.delivered_seqs() == list(range(10))
    assert harness.logs.matching("the token changed; retrying now")
    assert up.stats.paused == {}


def test_reload_after_a_401_retries_at_once(harness: Harness) -> None:
    harness.put([record(i) for i in range(3)])
    api = FakeApi(token_rule)
    up = harness.start(api, token="old")
    wait_until(lambda: up.stats.paused, what="the 401 pause")
    up.reload(endpoint(), Secret("new"))
    wait_until(lambda: settled(harness), timeout=PAUSE_S / 4, what="delivery after reload")
    assert [s.token for s in api.sent] == ["old", "new"]


def test_403_pauses_only_that_data_source(harness: Harness) -> None:
    def rule(sent: Sent) -> int | tuple[int, str, dict[str, str]]:
        return (403, "not yours", {}) if sent.datasource_id == "99999" else 200

    harness.put([record(i) for i in range(5)], datasource_id="99999")  # the oldest
    harness.put([record(i) for i in range(5, 10)])
    api = FakeApi(rule)
    up = harness.start(api)
    wait_until(lambda: len(api.delivered_seqs()) == 5, what="the allowed data source delivered")
    harness.put([record(i) for i in range(10, 15)])  # keeps flowing while 99999 is paused
    wait_until(lambda: len(api.delivered_seqs()) == 10, what="newer readings delivered")
    assert [s.datasource_id for s in api.sent].count("99999") == 1
    assert set(up.stats.paused) == {"99999"}
    assert harness.pending() == 5
    (line,) = harness.logs.matching("forbidden", logging.ERROR)
    assert "data source 99999 is forbidden to this token (403: not yours)" in line
    assert "readings are kept" in line


def test_404_pauses_everything_and_says_the_url_is_wrong(harness: Harness) -> None:
    api = FakeApi(lambda sent: (404, "no such endpoint /insert", {}))
    harness.put([record(i) for i in range(3)])
    up = harness.start(api)
    wait_until(lambda: up.stats.paused, what="the 404 pause")
    time.sleep(0.3)
    assert len(api.sent) == 1
    assert harness.pending() == 3
    (line,) = harness.logs.matching("the URL looks wrong", logging.ERROR)
    assert f"{URL} answered 404 (no such endpoint /insert)" in line


# --------------------------------------------------------------------------- 413, 415


def test_413_splits_lowers_the_byte_limit_and_dead_letters_a_lone_record_too_large(
    harness: Harness,
) -> None:
    limit = 700

    def rule(sent: Sent) -> int | tuple[int, str, dict[str, str]]:
        size = len(json.dumps({"datasource_id": sent.datasource_id, "data": sent.data}))
        return (413, f"over {limit} bytes", {}) if size > limit else 200

    harness.put([record(i) for i in range(40)])
    harness.put([record(40, note="x" * 1000)])  # another schema: a batch of its own
    api = FakeApi(rule)
    up = harness.start(api)
    wait_until(lambda: settled(harness), what="all settled")
    assert api.delivered_seqs() == list(range(40))
    (dead,) = harness.dead_letters()
    assert (dead["record"]["seq"], dead["status"], dead["reason"]) == (40, 413, "over 700 bytes")
    assert up.byte_limit < limit
    refused = sum(1 for s in api.sent if len(json.dumps(s.data)) > limit)
    harness.put([record(i) for i in range(41, 81)])
    wait_until(lambda: settled(harness), what="the second wave delivered")
    assert api.delivered_seqs() == list(range(40)) + list(range(41, 81))
    # From then on, batches stay under the learnt limit: no new 413.
    assert sum(1 for s in api.sent if len(json.dumps(s.data)) > limit) == refused
    assert harness.logs.matching("batches are now kept under", logging.WARNING)


def test_gzip_stays_on_while_the_server_takes_it(harness: Harness) -> None:
    api = FakeApi(ok)
    harness.start(api, gzip=True)
    harness.put([record(1)])
    wait_until(lambda: settled(harness), what="first batch")
    harness.put([record(2)])
    wait_until(lambda: settled(harness), what="second batch")
    assert [s.gzip for s in api.sent] == [True, True]
    assert api.delivered_seqs() == [1, 2]


def test_a_415_to_gzip_falls_back_to_plain_json(harness: Harness) -> None:
    api = FakeApi(lambda sent: (415, "gzip is not supported", {}) if sent.gzip else 200)
    harness.put([record(i) for i in range(5)])
    harness.start(api, gzip=True)
    wait_until(lambda: settled(harness), what="delivery as plain JSON")
    harness.put([record(5)])
    wait_until(lambda: settled(harness), what="the next batch")
    assert [s.gzip for s in api.sent] == [True, False, False]
    assert api.delivered_seqs() == list(range(6))
    assert harness.dead_letters() == []
    assert harness.logs.matching("does not take gzip (415)", logging.WARNING)


# --------------------------------------------------------------------------- transient


def test_transient_answers_and_network_errors_retry_the_same_batch(harness: Harness) -> None:
    script = iter([503, 429, 500, 408, "refused", "timeout", "lost"])
    api: FakeApi

    def rule(sent: Sent) -> int | tuple[int, str, dict[str, str]]:
        step = next(script, 200)
        if step == "refused":
            raise httpx.ConnectError("[Errno 111] Connection refused")
        if step == "timeout":
            raise httpx.ReadTimeout("timed out")
        if step == "lost":  # stored, then the connection drops before the answer
            api.accepted.extend(sent.data)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        assert isinstance(step, int)
        return step

    api = FakeApi(rule)
    harness.put([record(i) for i in range(4)])
    up = harness.start(api)
    wait_until(lambda: settled(harness), what="delivery after the faults")
    assert all(s.seqs == [0, 1, 2, 3] for s in api.sent)
    assert len(api.sent) == 8
    assert up.stats.retries == 7
    assert api.delivered_seqs() == [0, 1, 2, 3] * 2  # the lost answer's batch came twice
    assert harness.dead_letters() == []
    assert up.stats.requests["error"] == 3


def test_backoff_starts_again_after_a_success(harness: Harness) -> None:
    script = iter([503, 503, 200, 503, 200])
    api = FakeApi(lambda sent: next(script, 200))
    harness.start(api)
    harness.put([record(1)])
    wait_until(lambda: settled(harness), what="first reading")
    harness.put([record(2)])
    wait_until(lambda: settled(harness), what="second reading")
    assert len(harness.logs.matching("(failure 1)", logging.WARNING)) == 2
    assert len(harness.logs.matching("uploads succeed again")) == 2


def test_retry_after_is_honoured_in_seconds_and_as_an_http_date(harness: Harness) -> None:
    def rule(sent: Sent) -> int | tuple[int, str, dict[str, str]]:
        if len(api.sent) == 1:
            return 503, "busy", {"Retry-After": "1"}
        if len(api.sent) == 2:
            # Whole seconds: between 1 and 2 s from now.
            return (
                429,
                "slow down",
                {"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)},
            )
        return 200

    api = FakeApi(rule)
    harness.put([record(1)])
    harness.start(api, backoff_max_s=10.0)
    wait_until(lambda: settled(harness), what="delivery after Retry-After")
    gaps = [b.at - a.at for a, b in zip(api.sent, api.sent[1:], strict=False)]
    assert len(gaps) == 2
    assert gaps[0] >= 0.9 and gaps[1] >= 0.9


# --------------------------------------------------------------------------- nothing answers


def test_while_nothing_answers_probes_replace_requests_and_one_that_gets_through_sends_at_once(
    harness: Harness,
) -> None:
    link_up = threading.Event()
    probes: list[float] = []

    def rule(sent: Sent) -> int:
        if not link_up.is_set():
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return 200

    def probe(ep: EndpointConfig) -> str | None:
        probes.append(time.monotonic())
        return None if link_up.is_set() else "ConnectionRefusedError: [Errno 111] refused"

    api = FakeApi(rule)
    harness.put([record(1)])
    # A backoff of up to 5 minutes from the first failure: only the probe can be this quick.
    up = harness.start(
        api, probe=probe, reconnect_probe_s=0.2, backoff_base_s=300.0, backoff_max_s=300.0
    )
    wait_until(lambda: len(probes) >= 3, what="probes while the link is down")
    assert len(api.sent) == 1, "no batch goes out while the link is down"
    view = up.uplink.view()
    assert view.state == "down" and view.summary.startswith("down since ")
    assert harness.logs.matching("retrying as soon as the link is back", logging.WARNING)
    link_up.set()
    wait_until(lambda: settled(harness), what="delivery once a probe got through")
    assert len(api.sent) == 2
    assert api.sent[1].at - probes[-1] < 1.0  # at once, not after a backoff
    assert up.uplink.view().state == "up"
    assert harness.logs.matching("can be reached again after")
    assert up.stats.retries == 1


def test_a_connect_timeout_is_nothing_answered_not_a_stall(harness: Harness) -> None:
    """A listener whose backlog is full drops new connections' SYNs: connecting times out."""
    full = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = full.getsockname()[1]
    waiting = []
    for _ in range(3):
        conn = socket.socket()
        conn.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            conn.connect(("127.0.0.1", port))
        waiting.append(conn)
    try:
        url = f"http://127.0.0.1:{port}/restapi/datasource/insert"
        up = Uploader(
            endpoint(url=url, timeout_s=0.5, reconnect_probe_s=0.5), Secret("t"), harness.buffer
        )
        up.start()
        harness.uploaders.append(up)
        harness.put([record(1)])
        wait_until(lambda: up.uplink.down, what="the link found down")
        assert up.stats.requests["error"] == 1 and up.stats.requests["stalled"] == 0
        assert "ConnectTimeout" in (up.stats.last_error or "")
        # The probes time out too (they dial the same full listener): still down, no request.
        time.sleep(1.5)
        assert up.uplink.down and sum(up.stats.requests.values()) == 1
    finally:
        for conn in waiting:
            conn.close()
        full.close()


# --------------------------------------------------------------------------- TLS and proxies


def test_certificates_are_checked_by_default() -> None:
    ctx = tls_context(endpoint(url="https://ingest.test/restapi/datasource/insert"))
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert tls_context(endpoint(verify_tls=False)) is False


def test_an_unusable_ca_file_stops_start_up_with_a_config_error(
    harness: Harness, tmp_path: Path
) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    up = Uploader(endpoint(ca_file=str(bad)), Secret("t"), harness.buffer)
    with pytest.raises(ConfigError, match="ca_file"):
        up.start()


class _Answering(BaseHTTPRequestHandler):
    """Answers every POST with success and remembers the request line's target."""

    server: _Recording

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append(self.path)
        payload = b'{"message": "Data successfully inserted"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, fmt: str, *args: Any) -> None:
        pass


class _Recording(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Answering)
        self.seen: list[str] = []


Server = TypeVar("Server", bound=ThreadingHTTPServer)


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.mark.parametrize("via", ["environment", "config"])
def test_requests_go_through_the_proxy_from_the_environment_or_config(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    with serving(_Recording()) as proxy:
        proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
        overrides: dict[str, Any] = {"url": "http://ingest.invalid/restapi/datasource/insert"}
        if via == "environment":
            monkeypatch.setenv("HTTP_PROXY", proxy_url)
        else:
            overrides["proxy"] = proxy_url
        up = Uploader(endpoint(**overrides), Secret("t"), harness.buffer)
        up.start()
        harness.uploaders.append(up)
        harness.put([record(1)])
        wait_until(lambda: settled(harness), what="delivery through the proxy")
        # A forward proxy gets the absolute URL: the request went through it.
        assert proxy.seen == ["http://ingest.invalid/restapi/datasource/insert"]


def test_an_untrusted_certificate_is_retried_with_a_hint_and_ca_file_fixes_it(
    harness: Harness, self_signed: tuple[Path, Path]
) -> None:
    cert, key = self_signed
    server = _Recording()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    with serving(server):
        url = f"https://127.0.0.1:{server.server_address[1]}/restapi/datasource/insert"
        up = Uploader(endpoint(url=url), Secret("t"), harness.buffer)
        up.start()
        harness.uploaders.append(up)
        harness.put([record(1)])
        wait_until(lambda: up.stats.requests["error"] >= 1, what="a failed TLS handshake")
        assert "set [endpoint] ca_file" in (up.stats.last_error or "")
        assert harness.pending() == 1 and server.seen == []
        up.reload(endpoint(url=url, ca_file=str(cert)), Secret("t"))
        wait_until(lambda: settled(harness), what="delivery once the CA is trusted")
        assert server.seen == ["/restapi/datasource/insert"]


# --------------------------------------------------------------------------- not the API


def reply(
    body: bytes, content_type: str = "application/json", status: int = 200, complete: bool = True
) -> Reply:
    return Reply(status, "OK", content_type, None, body, complete)


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (reply(b'{"message": "Data successfully inserted"}'), V.DELIVERED),
        (reply(b'{"ok": true}', "application/json; charset=utf-8", 201), V.DELIVERED),
        (reply(b'{"message": "x"}', ""), V.DELIVERED),  # no content type: the body decides
        (reply(b"{}", "application/problem+json"), V.DELIVERED),
        (reply(b"<!DOCTYPE html><html>sign in</html>", "text/html"), V.NOT_THE_API),
        (reply(b'{"message": "x"}', "text/html"), V.NOT_THE_API),
        (reply(b'{"message": "x"}', "text/plain"), V.NOT_THE_API),
        (reply(b""), V.NOT_THE_API),
        (reply(b"", "", 204), V.NOT_THE_API),
        (reply(b"[1, 2]"), V.NOT_THE_API),
        (reply(b'"ok"'), V.NOT_THE_API),
        (reply(b"not json"), V.NOT_THE_API),
        (reply(b"\xff\xfe{}"), V.NOT_THE_API),
        (reply(b"[" * 100_000), V.NOT_THE_API),  # deeper than the parser's stack
        # Over the 256 KiB cap, labelled JSON and opening an object: the API's answer, cut.
        # The readings were inserted: counting them delivered is what avoids duplicates.
        (reply(b'{"message": "Data successfully', complete=False), V.DELIVERED),
        (reply(b'  {"message": "x", "pad": "', "application/json", 201, False), V.DELIVERED),
        # Cut, but not labelled JSON or not an object: still not the API's answer.
        (reply(b'{"message": "Data successfully', "", complete=False), V.NOT_THE_API),
        (reply(b'{"message": "x"', "text/html", complete=False), V.NOT_THE_API),
        (reply(b"[1, 2, 3", complete=False), V.NOT_THE_API),
        (reply(b"<html>", complete=False), V.NOT_THE_API),
        (reply(b"<html>", "text/html", 400), V.BAD_RECORDS),  # only 2xx are checked
        (reply(b"", "", 503), V.TRANSIENT),
    ],
)
def test_a_2xx_is_delivered_only_when_its_body_is_a_json_object(
    answer: Reply, verdict: Verdict
) -> None:
    assert judge(answer, False, 0.0).verdict is verdict


def test_what_answered_instead_of_the_api_is_named_and_escaped() -> None:
    page = b"<html>\r\n<title>Hotel\x1b[2J WiFi</title>" + b" " * 300
    message = judge(reply(page, "text/html; charset=utf-8"), False, 0.0).message
    assert "something other than the insert API" in message
    assert "content type 'text/html; charset=utf-8'" in message
    assert "first bytes '<html>\\r\\n<title>Hotel\\x1b[2J WiFi</title>" in message
    assert "…'" in message  # cut after the first bytes
    assert not {"\r", "\n", "\x1b"} & set(message)
    huge = judge(reply(b"x" * MAX_ANSWER_BYTES, "", complete=False), False, 0.0).message
    assert "no content type" in huge and "over 256 KiB" in huge
    assert "an empty body" in judge(reply(b""), False, 0.0).message


def test_server_messages_are_escaped_and_cut() -> None:
    body = json.dumps({"message": "bad\r\nFAKE LINE\u2028" + "y" * 1000}).encode()
    message = judge(reply(body, status=400), False, 0.0).message
    assert message.startswith("bad\\r\\nFAKE LINE\\u2028yyy")
    assert len(message) <= 520 and message.endswith("…")
    plain = judge(reply(b"<h1>Bad\x1bGateway</h1>", "text/html", 502), False, 0.0).message
    assert plain == "<h1>Bad\\x1bGateway</h1>"


class PortalFirst(FakeApi):
    """The insert API behind a captive portal that answers the first `portal` requests."""

    def __init__(self, portal: int) -> None:
        super().__init__(ok)
        self.portal = portal

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.portal > 0:
            self.portal -= 1
            return httpx.Response(
                200, text="<html>Sign in</html>", headers={"Content-Type": "text/html"}
            )
        return super().__call__(request)


def test_a_portal_answer_keeps_the_batch_and_retries_with_backoff(harness: Harness) -> None:
    api = PortalFirst(3)
    harness.put([record(i) for i in range(5)])
    up = harness.start(api)
    wait_until(lambda: settled(harness), what="delivery once the portal is gone")
    assert api.delivered_seqs() == list(range(5))
    assert up.stats.requests["200"] == 4 and up.stats.retries == 3
    assert up.stats.records_uploaded == 5
    (line,) = harness.logs.matching("something other than the insert API", logging.WARNING)
    assert "readings are kept, retrying in" in line and "(failure 1)" in line
    assert harness.logs.matching("uploads succeed again")


def test_a_confirmation_in_other_words_is_delivered_and_said_once(harness: Harness) -> None:
    api = FakeApi(lambda sent: (200, "Rows stored", {}))
    up = harness.start(api)
    harness.put([record(1)])
    wait_until(lambda: settled(harness), what="first batch")
    harness.put([record(2)])
    wait_until(lambda: settled(harness), what="second batch")
    assert up.stats.records_uploaded == 2
    (line,) = harness.logs.matching("instead of 'Data successfully inserted'", logging.INFO)
    assert "confirmed an upload with 'Rows stored'" in line


# --------------------------------------------------------------------------- cannot send, stalls


def test_a_token_http_cannot_carry_pauses_uploads_says_so_once_and_a_fixed_token_resumes(
    harness: Harness,
) -> None:
    token = {"value": "s3crét-token"}
    harness.put([record(i) for i in range(3)])
    api = FakeApi(ok)
    up = harness.start(api, token=token["value"], token_source=lambda: Secret(token["value"]))
    wait_until(lambda: "*" in up.stats.paused, what="the pause")
    time.sleep(0.5)  # paused: no retry loop, no line every few seconds
    (line,) = harness.logs.matching("cannot be sent (UnicodeEncodeError)", logging.ERROR)
    assert "one line of printable ASCII" in line
    assert not any("s3cr" in m for _, m in harness.logs.lines)  # never the token
    assert not harness.logs.matching("unexpected error")
    assert up.stats.requests["error"] == 1 and up.stats.failing_since is not None
    assert harness.pending() == 3 and api.sent == []
    token["value"] = "good"
    wait_until(lambda: settled(harness), timeout=PAUSE_S / 4, what="delivery with a fixed token")
    assert up.stats.paused == {} and up.stats.failing_since is None


class _Trickling(ThreadingHTTPServer):
    """Takes the request, then sends its status line and headers a byte every 0.2 s."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TrickleHeaders)
        self.done = threading.Event()


class _TrickleHeaders(BaseHTTPRequestHandler):
    server: _Trickling

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        head = itertools.chain(b"HTTP/1.1 200 OK\r\n", itertools.cycle(b"X-Slow: yes\r\n"))
        for byte in head:
            if self.server.done.wait(0.2):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return  # the client gave up: what the test waits for

    def log_message(self, fmt: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_headers_sent_a_byte_at_a_time_end_at_timeout_s_as_a_stall(
    harness: Harness, request: pytest.FixtureRequest, scheme: str
) -> None:
    server = _Trickling()
    ca_file = None
    if scheme == "https":
        cert, key = request.getfixturevalue("self_signed")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        ca_file = str(cert)
    with serving(server):
        url = f"{scheme}://127.0.0.1:{server.server_address[1]}/restapi/datasource/insert"
        up = Uploader(
            endpoint(url=url, timeout_s=1.0, ca_file=ca_file), Secret("t"), harness.buffer
        )
        up.start()
        harness.uploaders.append(up)
        harness.put([record(1)])
        stall = "no complete answer within timeout_s = 1 s: no answer came"

        def stalled_twice() -> bool:
            return up.stats.requests["stalled"] >= 2 and stall in (up.stats.last_error or "")

        wait_until(stalled_twice, timeout=20, what="two stalls")
        assert up.stats.failing_since is not None and harness.pending() == 1
        server.done.set()
    assert harness.logs.matching(stall, logging.WARNING)
