"""The uploader: batches from the buffer become requests to the insert API.

It owns the decision table of the design (what each answer of the server does to a batch)
and its pacing: exponential backoff with full jitter, `Retry-After`, pauses per data source
(403) or for everything (401, 404). Readings are never held only in memory: a batch is
deleted from the buffer only after a 2xx, moved to `dead_letters` only after the server
refused the single record, and otherwise simply read again on the next round.

`send_batch` is the boundary with httpx: its exceptions and status codes become `Answer`s
here, once. Tests pass an `httpx.MockTransport` (unit) or point the URL at the sandbox.
"""

from __future__ import annotations

import email.utils
import enum
import gzip
import json
import logging
import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from edge_agent import __version__
from edge_agent.buffer import Batch, Buffer, BufferSession
from edge_agent.config import EndpointConfig, Secret

log = logging.getLogger("edge_agent.uploader")

# How long a 401/403/404 pause lasts before one probing request, and how often the error is
# logged again while it lasts: slow enough not to hammer the server or flood the log.
PAUSE_S = 60.0
REPEAT_LOG_S = 600.0
# A batch smaller than this share of a full one waits for `flush_interval_s` to fill up.
_FULL_SHARE = 0.9


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    BAD_RECORDS = "bad records"  # 400 and other permanent 4xx: split, dead-letter singles
    BAD_TOKEN = "bad token"  # 401: pause everything
    FORBIDDEN = "forbidden"  # 403: pause this data source
    WRONG_URL = "wrong url"  # 404: pause everything
    TOO_LARGE = "too large"  # 413: split and lower the byte limit
    NO_GZIP = "no gzip"  # 415 while compressing: send plain JSON from now on
    TRANSIENT = "transient"  # 408, 429, 5xx, network: back off and retry


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    status: int | None  # None when no HTTP answer came (network error)
    message: str
    retry_after: float | None = None


def classify(status: int, gzip_sent: bool) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in (408, 429) or status >= 500:
        return Verdict.TRANSIENT
    special = {401: Verdict.BAD_TOKEN, 403: Verdict.FORBIDDEN, 404: Verdict.WRONG_URL}
    if status in special:
        return special[status]
    if status == 413:
        return Verdict.TOO_LARGE
    if status == 415 and gzip_sent:
        return Verdict.NO_GZIP
    if 400 <= status < 500:
        return Verdict.BAD_RECORDS
    # 1xx/3xx: the client follows no redirects; a redirect means the URL needs fixing.
    return Verdict.WRONG_URL


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def build_body(batch: Batch) -> bytes:
    """The request body, built from the stored JSON texts without parsing them again."""
    head = '{"datasource_id":' + json.dumps(batch.datasource_id) + ',"data":['
    return (head + ",".join(r.record for r in batch.rows) + "]}").encode()


def tls_context(ep: EndpointConfig) -> ssl.SSLContext | bool:
    """Certificate checks on by default; our CA file and client certificate when given."""
    if not ep.verify_tls:
        return False
    ctx = ssl.create_default_context(cafile=ep.ca_file)
    if ep.client_cert:
        ctx.load_cert_chain(ep.client_cert, ep.client_key)
    return ctx


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:500]
    text = response.text.strip()
    return text[:200] if text else response.reason_phrase


@dataclass
class UploaderStats:
    requests: Counter[str] = field(default_factory=Counter)  # by status, "error" for network
    records_uploaded: int = 0
    records_dead_lettered: int = 0
    retries: int = 0
    last_success: float | None = None  # wall clock
    last_error: str | None = None
    failing_since: float | None = None  # monotonic; None while uploads succeed
    paused: dict[str, str] = field(default_factory=dict)  # data source or "*" -> why


class Uploader:
    """Drains the buffer to the endpoint in its own thread. Start once, stop once."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        token: Secret,
        buffer: Buffer,
        *,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
        token_source: Callable[[], Secret] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._token = token
        self._token_source = token_source
        self._buffer = buffer
        self._transport = transport
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._byte_limit = endpoint.max_batch_bytes
        self._gzip = endpoint.gzip
        self._failures = 0
        self._paused_until: dict[str, float] = {}  # data source or "*" -> monotonic time
        self._last_logged: dict[str, float] = {}
        self.stats = UploaderStats()
        self.heartbeat = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Uploader.start() called twice")
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)
        self._thread.start()

    def stop(self, deadline_s: float | None = None) -> None:
        """Let the request in flight finish (within the deadline), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(deadline_s if deadline_s is not None else self.endpoint.timeout_s + 5)

    def reload(self, endpoint: EndpointConfig, token: Secret) -> None:
        """New endpoint settings or token: lift the pauses and try again at once."""
        self.endpoint = endpoint
        self._token = token
        self._byte_limit = min(self._byte_limit, endpoint.max_batch_bytes)
        self._gzip = endpoint.gzip
        self._paused_until.clear()
        self.stats.paused.clear()
        self._failures = 0
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        session = BufferSession(self._buffer.path, self._buffer.config.sync)
        client = self._client()
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                try:
                    self._round(session, client)
                except Exception:
                    # A bug or a buffer failure: say so with the traceback, then back off
                    # rather than die; the readings are still in the buffer.
                    log.exception("uploader: unexpected error; retrying in 5 s")
                    self._sleep(5.0)
        finally:
            client.close()
            session.close()

    def _client(self) -> httpx.Client:
        return httpx.Client(
            timeout=self.endpoint.timeout_s,
            verify=tls_context(self.endpoint),
            proxy=self.endpoint.proxy,
            transport=self._transport,
            headers={"User-Agent": f"madevo-edge-agent/{__version__}"},
        )

    def _round(self, session: BufferSession, client: httpx.Client) -> None:
        now = time.monotonic()
        wait = self._pause_remaining(now)
        if wait > 0:
            self._sleep(wait)
            return
        excluded = frozenset(ds for ds, until in self._paused_until.items() if until > now)
        batch = session.next_batch(self.endpoint.max_batch_records, self._byte_limit, excluded)
        if batch is None:
            self._idle(1.0 if not excluded else min(1.0, self._next_resume(now)))
            return
        young = time.time() - batch.oldest_created < self.endpoint.flush_interval_s
        if young and not self._full(batch):
            self._idle(self.endpoint.flush_interval_s - (time.time() - batch.oldest_created))
            return
        self._deliver(session, client, batch)

    def _full(self, batch: Batch) -> bool:
        return (
            len(batch.rows) >= self.endpoint.max_batch_records
            or batch.nbytes >= _FULL_SHARE * self._byte_limit
        )

    def _idle(self, seconds: float) -> None:
        if seconds > 0 and not self._stop.is_set():
            self._buffer.wait_for_data(min(seconds, 1.0))

    def _sleep(self, seconds: float) -> None:
        """Wait, waking for stop or reload; beats the heartbeat so a watchdog sees us alive."""
        end = time.monotonic() + max(0.0, seconds)
        while not self._wake.is_set():
            self.heartbeat = time.monotonic()
            remaining = end - self.heartbeat
            if remaining <= 0:
                return
            self._wake.wait(min(remaining, 1.0))
        self._wake.clear()

    def _pause_remaining(self, now: float) -> float:
        until = self._paused_until.get("*", 0.0)
        if until > now and self._token_source is not None and self._token_changed():
            log.info("uploader: the token changed; retrying now")
            self._paused_until.pop("*", None)
            return 0.0
        return min(until - now, 1.0)

    def _next_resume(self, now: float) -> float:
        return max(0.05, min(until for until in self._paused_until.values()) - now)

    def _token_changed(self) -> bool:
        assert self._token_source is not None
        try:
            fresh = self._token_source()
        except Exception:  # an unreadable token file stays a 401 until it is fixed
            return False
        if fresh == self._token:
            return False
        self._token = fresh
        return True

    # -- one batch -------------------------------------------------------------------------

    def _deliver(self, session: BufferSession, client: httpx.Client, batch: Batch) -> None:
        """Send a batch, splitting on bad records and size; left half first keeps order."""
        todo: list[tuple[Batch, int]] = [(batch, 1)]
        while todo and not self._stop.is_set():
            part, attempts = todo.pop()
            answer = self.send_batch(client, part)
            halves = self._decide(session, part, answer, attempts)
            if halves is None:
                return  # transient or paused: the rest is read again later
            todo.extend((h, attempts + 1) for h in reversed(halves))

    def _decide(
        self, session: BufferSession, batch: Batch, answer: Answer, attempts: int
    ) -> list[Batch] | None:
        """Settle the batch per the design's table; returns parts still to send, or None."""
        v = answer.verdict
        if v is Verdict.DELIVERED:
            session.ack(batch)
            self._succeeded(batch.datasource_id, len(batch.rows))
            return []
        if v is Verdict.NO_GZIP:
            log.warning("uploader: the server does not take gzip (415); sending plain JSON")
            self._gzip = False
            return [batch]
        if v in (Verdict.BAD_RECORDS, Verdict.TOO_LARGE):
            return self._split_or_dead_letter(session, batch, answer, attempts)
        self._failed(answer)
        if v is Verdict.TRANSIENT:
            self._back_off(answer)
        elif v is Verdict.FORBIDDEN:
            self._pause(
                batch.datasource_id,
                f"data source {batch.datasource_id} is forbidden to this token (403: "
                f"{answer.message}); its readings are kept and retried every {PAUSE_S:.0f} s; "
                "grant the token access to it or fix datasource_id",
            )
        elif v is Verdict.BAD_TOKEN:
            self._pause(
                "*",
                f"token rejected by {self.endpoint.url} (401: {answer.message}); readings are "
                f"kept; fix the token (token_env/token_file) and reload, retrying every "
                f"{PAUSE_S:.0f} s",
            )
        else:
            self._pause(
                "*",
                f"{self.endpoint.url} answered {answer.status} ({answer.message}); the URL looks "
                "wrong: set [endpoint] url to the insert URL and reload; readings are kept",
            )
        return None

    def _split_or_dead_letter(
        self, session: BufferSession, batch: Batch, answer: Answer, attempts: int
    ) -> list[Batch]:
        if answer.verdict is Verdict.TOO_LARGE and len(batch.rows) > 1:
            self._byte_limit = max(1024, min(self._byte_limit, batch.nbytes // 2))
            log.warning(
                "uploader: the server refused %d bytes as too large (413); batches are now "
                "kept under %d bytes",
                batch.nbytes,
                self._byte_limit,
            )
        if len(batch.rows) > 1:
            return list(batch.split())
        session.dead_letter(batch, answer.status, answer.message, attempts)
        self.stats.records_dead_lettered += 1
        self._log_limited(
            "dead-letter",
            logging.WARNING,
            f"uploader: the server refused a record of data source {batch.datasource_id} "
            f"({answer.status}: {answer.message}); it is kept in dead letters: see "
            "`edge-agent buffer dead-letters`",
        )
        return []

    def send_batch(self, client: httpx.Client, batch: Batch) -> Answer:
        """One request; httpx errors and status codes become an Answer here, and only here."""
        body = build_body(batch)
        headers = {
            "Authorization": f"Bearer {self._token.reveal()}",
            "Content-Type": "application/json",
        }
        gzip_sent = self._gzip
        if gzip_sent:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        try:
            response = client.post(self.endpoint.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self.stats.requests["error"] += 1
            return Answer(Verdict.TRANSIENT, None, f"{type(exc).__name__}: {exc or 'no detail'}")
        self.stats.requests[str(response.status_code)] += 1
        message = _server_message(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        return Answer(
            classify(response.status_code, gzip_sent), response.status_code, message, retry_after
        )

    # -- pacing and reporting --------------------------------------------------------------

    def _succeeded(self, datasource_id: str, records: int) -> None:
        if self._failures or self.stats.failing_since is not None:
            log.info("uploader: uploads succeed again")
        for key in ("*", datasource_id):
            self._paused_until.pop(key, None)
            self.stats.paused.pop(key, None)
        self._failures = 0
        self.stats.records_uploaded += records
        self.stats.last_success = time.time()
        self.stats.failing_since = None
        self.stats.last_error = None

    def _failed(self, answer: Answer) -> None:
        detail = f"{answer.status} {answer.message}" if answer.status else answer.message
        self.stats.last_error = detail
        if self.stats.failing_since is None:
            self.stats.failing_since = time.monotonic()

    def _back_off(self, answer: Answer) -> None:
        self._failures += 1
        self.stats.retries += 1
        ep = self.endpoint
        ceiling = min(ep.backoff_max_s, ep.backoff_base_s * 2 ** min(self._failures - 1, 30))
        delay = self._rng.uniform(0, ceiling)
        if answer.retry_after is not None:
            delay = max(delay, min(answer.retry_after, ep.backoff_max_s))
        what = f"{answer.status} {answer.message}" if answer.status else answer.message
        self._log_limited(
            "transient",
            logging.WARNING,
            f"uploader: upload to {ep.url} failed ({what}); readings are kept, retrying "
            f"in {delay:.1f} s (failure {self._failures})",
            force=self._failures == 1,
        )
        self._sleep(delay)

    def _pause(self, key: str, message: str) -> None:
        self._paused_until[key] = time.monotonic() + PAUSE_S
        self.stats.paused[key] = message
        self._log_limited("pause:" + key, logging.ERROR, "uploader: " + message)

    def _log_limited(self, key: str, level: int, message: str, force: bool = False) -> None:
        now = time.monotonic()
        last = self._last_logged.get(key)
        if force or last is None or now - last >= REPEAT_LOG_S:
            self._last_logged[key] = now
            log.log(level, message)
