"""The uploader: batches from the buffer become requests to the insert API.

Over 600 lines on purpose: the decision table (what each answer does to a batch) and the
pacing that follows from it (backoff, Retry-After, pauses, probing) share the uploader
thread's state and are only right read together. What stands apart already lives beside it:
the drain order (drain.py), setting a failing record aside (isolation.py), the link's state
(uplink.py), the byte budget (budget.py) and one HTTP exchange (exchange.py).

It owns the decision table of the design (what each answer of the server does to a batch)
and its pacing: exponential backoff with full jitter, `Retry-After`, pauses per data source
(403) or for everything (401, 404), and probing instead of sending while nothing answers at
all (`uplink.py`: the link is down, and the agent must notice soon that it is back).
Readings are never held only in memory: a batch is deleted from the buffer only after a
2xx, moved to `dead_letters` only after the server refused the single record, and otherwise
simply read again on the next round.

`send_batch` is the boundary with httpx: its exceptions and status codes become `Answer`s
here, once. Tests pass an `httpx.MockTransport` (unit) or point the URL at the sandbox.

Only the uploader thread touches the HTTP client, the pauses and the counters; `reload`
(called from the main thread) hands its new settings over and the thread applies them.
"""

from __future__ import annotations

import email.utils
import enum
import gzip
import json
import logging
import math
import random
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from edge_agent import __version__
from edge_agent.budget import ANSWER_ALLOWANCE, META_KEY, BudgetView, DailyBudget, size_text
from edge_agent.buffer import Batch, Buffer, BufferSession
from edge_agent.clock import Clock, SystemClock
from edge_agent.config import EndpointConfig, Secret
from edge_agent.credentials import redact
from edge_agent.drain import DrainPolicy, RateMeter
from edge_agent.errors import ConfigError
from edge_agent.exchange import NO_CONNECTION, Exchange, Reply, Stalled
from edge_agent.isolation import REASON, Isolation, Rules, Step
from edge_agent.logs import RateLimitedLog, printable
from edge_agent.uplink import ROUTE_CHECK_S, Uplink, probe, proxy_note, target_for

if TYPE_CHECKING:
    from edge_agent.uplink_time import UplinkTime

log = logging.getLogger("edge_agent.uploader")

# How long a 401/403/404 pause lasts before one probing request, and how often the error is
# logged again while it lasts: slow enough not to hammer the server or flood the log.
PAUSE_S = 60.0
REPEAT_LOG_S = 600.0
# A failing uplink is said again once a minute (with the failure count), so a log read in
# the middle of an outage shows it is still going on.
TRANSIENT_REPEAT_LOG_S = 60.0
# While paused, how often the token (file) is read again to notice a new one.
TOKEN_CHECK_S = 1.0
_IDLE_SLICE_S = 0.25
# Requests per reading are counted in memory for the dead letters' `attempts`; past this many
# unsettled readings (a long outage) the counts start again rather than grow without bound.
_MAX_TRACKED = 100_000
# The most of an answer's body that is read. The API answers with a short JSON message;
# a longer body is not its answer, and only its first bytes are ever shown.
MAX_ANSWER_BYTES = 256 * 1024
_SHOWN_BYTES = 160
SUCCESS_MESSAGE = "Data successfully inserted"
_UNEXPECTED = "unexpected error in the uploader, readings are kept: please report it"
# Where `gzip = "auto"` remembers the URL that refused gzip (415), so that a restart does not
# spend a refused request on it again.
GZIP_REFUSED_KEY = "gzip_refused_url"


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    BAD_RECORDS = "bad records"  # 400 and other permanent 4xx: split, dead-letter singles
    BAD_TOKEN = "bad token"  # 401: pause everything
    FORBIDDEN = "forbidden"  # 403: pause this data source
    WRONG_URL = "wrong url"  # 404: pause everything
    TOO_LARGE = "too large"  # 413: split and lower the byte limit
    NO_GZIP = "no gzip"  # 415 while compressing: send plain JSON from now on
    TRANSIENT = "transient"  # 408, 429, 5xx, network, stalled: back off and retry
    UNREACHABLE = "unreachable"  # no connection (refused, DNS, TLS...): probe until it is back
    NOT_THE_API = "not the API"  # a 2xx that is not a JSON object: a portal answered; retry
    CANNOT_SEND = "cannot send"  # the request could not be built or sent: pause everything


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    status: int | None  # None when no HTTP answer came (network error, stall)
    message: str  # escaped: safe for a log line, the status page and a dead letter
    retry_after: float | None = None


def classify(status: int, gzip_sent: bool) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DELIVERED
    # 407: a proxy on the way wants credentials; nothing is wrong with the records.
    if status in (407, 408, 429) or status >= 500:
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
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def split_bound(records: int, bad: int) -> int:
    """Most requests bisection needs for a batch holding `bad` refused records.

    Each refused record fails one request per level on its way down to a single record,
    and each failed request costs two more (its halves): 1 + 2 * bad * ceil(log2(records)).
    """
    return 1 + 2 * bad * math.ceil(math.log2(max(records, 1)))


def build_body(batch: Batch) -> bytes:
    """The request body, built from the stored JSON texts without parsing them again.

    One join of references to the records, then one encode: at most two copies of the
    batch's bytes at a time besides the records themselves, the text one dropped on return.
    """
    parts = ['{"datasource_id":', json.dumps(batch.datasource_id), ',"data":[']
    for i, row in enumerate(batch.rows):
        if i:
            parts.append(",")
        parts.append(row.record)
    parts.append("]}")
    return "".join(parts).encode()


def request_bytes(request: httpx.Request) -> int:
    """A request's bytes on the wire: its request line, headers and body (HTTP/1.1)."""
    line = len(request.method) + len(request.url.raw_path) + 12  # " " " HTTP/1.1\r\n"
    headers = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
    return line + headers + 2 + len(request.content)


def _head(batch: Batch) -> int:
    return batch.rows[0].id if batch.rows else -1


def _gzipped(request: httpx.Request) -> bool:
    return "Content-Encoding" in request.headers


def tls_context(ep: EndpointConfig) -> ssl.SSLContext | bool:
    """Certificate checks on by default; our CA file and client certificate when given."""
    if not ep.verify_tls:
        return False
    ctx = ssl.create_default_context(cafile=ep.ca_file)
    if ep.client_cert:
        ctx.load_cert_chain(ep.client_cert, ep.client_key)
    return ctx


def judge(reply: Reply, gzip_sent: bool, now: float) -> Answer:
    """What an answer does to its batch (the design's table), its message made printable.

    The insert API confirms with a JSON object (`{"message": "Data successfully inserted"}`).
    A 2xx with anything else came from something between the gateway and the API (a captive
    portal, a login page, a proxy): the batch was not delivered. The message text itself is
    not required, as the spec says its behaviour may evolve.

    A 2xx longer than the cap is read only in part: labelled as JSON and starting with `{`, it
    is the API's answer (a portal sends a page, not a JSON object) and the batch is delivered:
    the readings were inserted, and sending them again would only duplicate them.
    """
    verdict = classify(reply.status, gzip_sent)
    doc = _json_object(reply)
    retry_after = parse_retry_after(reply.retry_after, now)
    if verdict is Verdict.DELIVERED and not _api_json(reply, doc):
        return Answer(Verdict.NOT_THE_API, reply.status, _foreign(reply), retry_after)
    if reply.status == 407:
        return Answer(verdict, reply.status, _PROXY_AUTH, retry_after)
    return Answer(verdict, reply.status, _server_message(reply, doc), retry_after)


_PROXY_AUTH = (
    "Proxy Authentication Required: the proxy between the gateway and the API wants a user "
    'name and password; give them in its URL ([endpoint] proxy = "http://user:password@host:'
    'port", or HTTP(S)_PROXY)'
)


def _api_json(reply: Reply, doc: dict[str, Any] | None) -> bool:
    if not _says_json(reply.content_type):
        return False
    if reply.complete:
        return doc is not None
    # Cut at the cap: it cannot be parsed, but it is labelled JSON and opens an object.
    return bool(reply.content_type.strip()) and reply.body.lstrip().startswith(b"{")


def _says_json(content_type: str) -> bool:
    """A JSON media type, or none at all (then the body decides)."""
    media = content_type.partition(";")[0].strip().lower()
    return not media or media == "application/json" or media.endswith("+json")


def _json_object(reply: Reply) -> dict[str, Any] | None:
    if not reply.complete:
        return None
    try:
        doc = json.loads(reply.body)
    except (ValueError, RecursionError):  # deep nesting overflows the parser, not an error
        return None
    return doc if isinstance(doc, dict) else None


def _server_message(reply: Reply, doc: dict[str, Any] | None) -> str:
    if doc is not None and isinstance(doc.get("message"), str):
        return printable(doc["message"].strip(), 500)
    text = reply.body[:_SHOWN_BYTES].decode("utf-8", "backslashreplace").strip()
    over = "" if reply.complete else f" (an answer over {MAX_ANSWER_BYTES // 1024} KiB, cut)"
    return printable(text or reply.reason, 200) + over


def _foreign(reply: Reply) -> str:
    """Why a 2xx is not the API's answer, naming what came instead."""
    if reply.content_type:
        kind = f"content type '{printable(reply.content_type, 100)}'"
    else:
        kind = "no content type"
    if not reply.body:
        shown = "an empty body"
    else:
        first = printable(reply.body[:_SHOWN_BYTES].decode("utf-8", "backslashreplace"))
        cut = "…" if len(reply.body) > _SHOWN_BYTES or not reply.complete else ""
        over = "" if reply.complete else f", over {MAX_ANSWER_BYTES // 1024} KiB"
        shown = f"first bytes '{first}{cut}'{over}"
    return (
        "answered by something other than the insert API: a captive portal, a login page or "
        f"a proxy between the gateway and the API? ({kind}, {shown})"
    )


def _stall_message(stall: Stalled) -> str:
    if not stall.sent:
        got = "the request was still being sent (a slow link for this batch size)"
    elif stall.status is None:
        got = "no answer came"
    else:
        got = f"the answer ({stall.status}) was still coming, {stall.received} bytes of its body"
    return (
        f"no complete answer within timeout_s = {stall.timeout_s:g} s: {got}; the server or "
        "something on the way (a proxy, a weak link) stalled"
    )


def _unsendable(exc: Exception) -> str:
    """Why no request went out, without the exception's text: it may quote a header, and the
    Authorization header holds the token."""
    name = type(exc).__name__
    if isinstance(exc, UnicodeError | httpx.LocalProtocolError):
        return (
            f"the request cannot be sent ({name}): a header holds a character HTTP cannot "
            "carry; check the token (token_file or token_env): it must be one line of "
            "printable ASCII; fix it and reload"
        )
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = "" if tb is None else f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
    return (
        f"the request cannot be built or sent ({name}{where}): an unexpected error, please "
        "report it; check the [endpoint] settings and reload"
    )


def _network_message(exc: httpx.HTTPError) -> str:
    """What went wrong on the wire, with a hint when it is a certificate problem.

    (A request whose headers cannot be written never gets here: `send_batch` reports it
    without the error's text, which would quote the Authorization header.)
    """
    text = f"{type(exc).__name__}: {redact(str(exc)) or 'no detail'}"
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        text += " (the server's certificate is not trusted: set [endpoint] ca_file)"
    elif cause is not None:
        text += " (TLS failed: check the URL's scheme and port, client_cert and ca_file)"
    return text


@dataclass
class UploaderStats:
    requests: Counter[str] = field(default_factory=Counter)  # by status, "error" for network
    records_uploaded: int = 0
    records_dead_lettered: int = 0
    records_set_aside: int = 0  # of those, records the server failed on alone with a 5xx
    suspects: int = 0  # records sent alone now because the server failed on them alone
    retries: int = 0
    split_requests: int = 0  # requests spent on halves of refused or too large batches
    last_success: float | None = None  # wall clock
    last_error: str | None = None
    failing_since: float | None = None  # monotonic; None while uploads succeed
    paused: dict[str, str] = field(default_factory=dict)  # data source or "*" -> why


@dataclass
class _Split:
    """What splitting one batch cost and gave, for one summary line."""

    records: int
    extra_requests: int = 0
    dead_lettered: int = 0
    plain_tried: bool = False  # a 400 to gzip was tried once as plain JSON


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
        probe: Callable[[EndpointConfig], str | None] | None = None,
        clock: Clock | None = None,
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
        self._client: httpx.Client | None = None
        self._reload_lock = threading.Lock()
        self._reloaded: tuple[EndpointConfig, Secret, httpx.Client] | None = None
        self._byte_limit = endpoint.max_batch_bytes
        self._gzip = endpoint.gzip is not False
        self._gzip_refused: str | None = None  # the URL that refused gzip, with "auto"
        # With "auto", the URL that took a gzip body (a 2xx): from then on a 400 to gzip is
        # about the records. Until then a 400 to a gzip body is tried once as plain JSON: the
        # head of that batch, while its plain request is due.
        self._gzip_confirmed: str | None = None
        self._plain_trial: int | None = None
        # Wall times it reports or judges (the last success, an answer's Retry-After date, the
        # budget's UTC day) come from the agent's clock. What decides when to wait stays on
        # real time: timers (sleeps, pauses, the heartbeat) on time.monotonic, as the events
        # they wait on, and a batch's age on time.time, so that the flush interval passes even
        # under a clock a test holds still.
        self._clock = clock or SystemClock()
        self.budget = DailyBudget(endpoint.bytes_per_day, self._clock)
        # The batch held back for the budget: its first reading, its lane and its cost.
        self._held: tuple[int, str, int] | None = None
        self._spent_day: str | None = None  # the UTC day the budget was last spent
        self._failures = 0
        self._paused_until: dict[str, float] = {}  # data source or "*" -> monotonic time
        self._token_checked = 0.0
        self._token_problem: str | None = None  # why the last re-read failed, said once
        self._carried: Counter[int] = Counter()  # reading id -> requests that carried it
        self._dead_letter_log = RateLimitedLog(log, every=60.0)
        self._set_aside_log = RateLimitedLog(log, every=60.0)
        # Lines that say again what is still going on, their text unchanged: the traceback
        # of an unexpected error, a pause (by data source and status: a 404 followed by a
        # 401 is news worth a line at once), a failure (by verdict: a portal answering after
        # a run of 503s is news too), a failed probe, a 413, a record the server fails on.
        self._unexpected_log = RateLimitedLog(log, REPEAT_LOG_S, tally=False)
        self._pause_log = RateLimitedLog(log, REPEAT_LOG_S, tally=False)
        self._failed_log = RateLimitedLog(log, TRANSIENT_REPEAT_LOG_S, tally=False)
        self._probe_log = RateLimitedLog(log, TRANSIENT_REPEAT_LOG_S, tally=False)
        self._too_large_log = RateLimitedLog(log, TRANSIENT_REPEAT_LOG_S, tally=False)
        self._suspect_log = RateLimitedLog(log, TRANSIENT_REPEAT_LOG_S, tally=False)
        self._paced_log = RateLimitedLog(log, 86_400.0, tally=False)  # once a UTC day
        self._exchange = Exchange()
        # Wall times it reports or judges (the last success, an answer's Retry-After date)
        # come from the agent's clock. What decides when to wait stays on real time: timers
        # (sleeps, pauses, the heartbeat) on time.monotonic, as the events they wait on, and
        # a batch's age on time.time, so that the flush interval passes even under a clock
        # a test holds still.
        self._isolation = Isolation(Rules.of(endpoint), self._clock)
        self._drain = DrainPolicy()
        self._backlog_rate = RateMeter()
        self._confirmations: set[str] = {SUCCESS_MESSAGE}  # messages of 2xx seen and logged
        self.stats = UploaderStats()
        self.heartbeat = time.monotonic()
        self.uplink = Uplink(endpoint.reconnect_probe_s, rng=self._rng)
        self._probe = probe or self._probe_link
        # Set by the agent before start: sees every answer, and probes while the clock
        # waits for confirmation (edge_agent/uplink_time.py).
        self.time_source: UplinkTime | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Build the HTTP client (bad TLS or proxy settings stop start-up), then run."""
        if self._thread is not None:
            raise RuntimeError("Uploader.start() called twice")
        self._client = self._build_client(self.endpoint)
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)
        self._thread.start()

    def stop(self, deadline_s: float | None = None) -> None:
        """Let the request in flight finish (within the deadline), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(deadline_s if deadline_s is not None else self.endpoint.timeout_s + 5)

    def reload(self, endpoint: EndpointConfig, token: Secret) -> None:
        """New endpoint settings or token: lift the pauses and try again at once.

        Settings the HTTP client cannot use (an unreadable CA file...) are refused here, in
        the caller's thread, and the previous ones stay.
        """
        try:
            client = self._build_client(endpoint)
        except ConfigError as exc:
            log.error("uploader: reload not applied, the previous endpoint settings stay: %s", exc)
            return
        with self._reload_lock:
            previous, self._reloaded = self._reloaded, (endpoint, token, client)
        if previous is not None:
            previous[2].close()
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def budget_view(self) -> BudgetView:
        """The daily byte budget's figures now (any thread)."""
        return self.budget.view()

    def backlog_rate(self) -> float | None:
        """Backlog readings delivered per second lately (drain.DrainView); None before any."""
        return self._backlog_rate.rate(time.monotonic())

    @property
    def backlog_delivered(self) -> int:
        """Backlog readings delivered since start (those older than `live_window_s`)."""
        return self._backlog_rate.total

    @property
    def byte_limit(self) -> int:
        """Bytes of records per request now: `max_batch_bytes`, or lower after a 413."""
        return self._byte_limit

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        session = BufferSession(self._buffer.path, self._buffer.config.sync)
        try:
            self._load_state(session)
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._apply_reload()
                try:
                    self._round(session)
                except Exception as exc:
                    # A bug or a buffer failure: back off rather than die; the readings are
                    # still in the buffer. Requests never get here (send_batch answers).
                    self._unexpected(exc)
                    self._sleep(5.0)
        finally:
            with self._reload_lock:
                pending, self._reloaded = self._reloaded, None
            for client in (self._client, pending[2] if pending else None):
                if client is not None:
                    client.close()
            self._store_count(session)
            session.close()

    def _load_state(self, session: BufferSession) -> None:
        """What the buffer remembers for the uploader: the day's bytes, a gzip refusal."""
        self.budget.load(session.read_meta(META_KEY))
        self._gzip_refused = session.read_meta(GZIP_REFUSED_KEY)
        if self.endpoint.gzip == "auto" and self._gzip_refused == self.endpoint.url:
            self._gzip = False
            log.info(
                'uploader: sending plain JSON: %s refused gzip before (gzip = "auto"); '
                "set gzip = true to try it again",
                self.endpoint.url,
            )
        view = self.budget.view()
        if view.limit is not None:
            log.info(
                "uploader: daily byte budget %s, %s used on %s (UTC)",
                size_text(view.limit),
                size_text(view.used),
                view.day,
            )

    def _store_count(self, session: BufferSession) -> None:
        """At a clean stop, the day's exact count (no headroom) for the next start."""
        try:
            session.write_meta(META_KEY, self.budget.exact())
        except sqlite3.Error as exc:
            log.warning("uploader: the day's byte count was not stored at stop (%s)", exc)

    def _unexpected(self, exc: Exception) -> None:
        """Counted as a failure (health sees it); the traceback once per incident (until an
        upload succeeds) and then every REPEAT_LOG_S while it lasts."""
        self.stats.last_error = _UNEXPECTED
        if self.stats.failing_since is None:
            self.stats.failing_since = time.monotonic()
        self._unexpected_log(
            logging.ERROR,
            f"uploader: {_UNEXPECTED} ({type(exc).__name__}); retrying every 5 s",
            exc_info=exc,
        )

    def _build_client(self, ep: EndpointConfig) -> httpx.Client:
        try:
            return httpx.Client(
                timeout=ep.timeout_s,
                verify=tls_context(ep),
                proxy=ep.proxy,
                transport=self._transport,
                # HTTP(S)_PROXY and NO_PROXY from the environment apply unless a transport
                # was handed in, which then decides alone how requests travel.
                trust_env=self._transport is None,
                headers={"User-Agent": f"madevo-edge-agent/{__version__}"},
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"[endpoint]: cannot use the TLS or proxy settings (ca_file, client_cert, "
                f"client_key, proxy): {exc}"
            ) from None

    def _apply_reload(self) -> None:
        with self._reload_lock:
            reloaded, self._reloaded = self._reloaded, None
        if reloaded is None:
            return
        endpoint, token, client = reloaded
        if self._client is not None:
            self._client.close()
        same_url = endpoint.url == self.endpoint.url
        self.endpoint, self._token, self._client = endpoint, token, client
        # A limit learnt from a 413 still holds for the same URL; a new URL starts afresh.
        limit = min(self._byte_limit, endpoint.max_batch_bytes) if same_url else None
        self._byte_limit = limit or endpoint.max_batch_bytes
        self._gzip = endpoint.gzip is True or (
            endpoint.gzip == "auto" and self._gzip_refused != endpoint.url
        )
        self.budget.limit = endpoint.bytes_per_day
        self._held = None
        self._failures = 0
        self.uplink.reset(endpoint.reconnect_probe_s)
        self._isolation.rules = Rules.of(endpoint)
        self._lift_pauses()

    def _round(self, session: BufferSession) -> None:
        now = time.monotonic()
        self._check_token(now)
        wait = self._pause_remaining(now)
        if wait > 0:
            self._sleep(wait)
            return
        if self.uplink.down and not self._link_back():
            return
        excluded = frozenset(ds for ds, until in self._paused_until.items() if until > now)
        if self._send_suspect(session, excluded):
            return
        # Ages are measured on the system's wall clock, as the buffer stamps `created` with it
        # (a test's fake clock stands still; the system's does not).
        pick = self._drain.pick(
            session,
            self.endpoint,
            self._byte_limit,
            time.time(),
            excluded,
            frozenset(self._isolation.skipped()),
        )
        if pick.batch is None:
            if not pick.waiting and self._probe_time(session):
                return
            self._forget_expired_pauses(now)
            self._idle(min(pick.wait_s, self._next_resume(now)))
            return
        self._deliver(session, pick.batch)

    def _probe_time(self, session: BufferSession) -> bool:
        """While the clock waits for confirmation and nothing else goes out: one request
        without readings, for the API's Date (uplink_time.py). True when one was sent.

        A probe goes plain (`_gzips`); were one ever refused for gzip (415), the uploads
        fall back to plain JSON as after an upload's 415. It is weighed against the daily
        budget like a high-priority request: none goes while there is no room for it (its
        bytes are counted as any request's)."""
        source = self.time_source
        if source is None or self._client is None or not source.probe_due():
            return False
        request = None
        if self.budget.limit is not None:
            empty = source.empty_batch()
            try:
                request = self._request(self._client, empty, self._gzips(empty))
            except Exception:
                pass  # `send_batch` builds it again and reports why it cannot
            else:
                cost = request_bytes(request) + ANSWER_ALLOWANCE
                if self.budget.allows(cost, "high") > 0:
                    return False
                ahead = self.budget.ahead(cost)
                if ahead is not None:
                    session.write_meta(META_KEY, ahead)
        answer = self.send_batch(self._client, source.probe_batch(), request)
        if answer.verdict is Verdict.NO_GZIP:
            self._no_gzip(session, 415)
            source.probed(answer)
            return True
        if not source.probed(answer):  # not the API's answer: said and paced like an upload's
            self._failed(answer)
            self._back_off(answer)
        return True

    def _send_suspect(self, session: BufferSession, excluded: frozenset[str]) -> bool:
        """Send one record that the server failed on alone, if its turn came (isolation.py);
        it is left out of batches meanwhile, so its data source goes on."""
        for rid in self._isolation.due():
            part = session.pending_reading(rid)
            if part is None:  # dropped meanwhile (buffer full, max_age)
                self._isolation.forget([rid])
            elif part.datasource_id not in excluded:
                self._deliver(session, part)
                return True
        return False

    def _idle(self, seconds: float) -> None:
        # Short slices: the buffer's data event cannot be woken by `stop`, and an idle
        # round is one indexed SELECT.
        if seconds > 0 and not self._stop.is_set():
            self._buffer.wait_for_data(min(seconds, _IDLE_SLICE_S))

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

    def _forget_expired_pauses(self, now: float) -> None:
        """Nothing is pending for a data source whose pause ran out (its readings were moved
        or dropped): it is not paused any more, so health and status stop reporting it."""
        for key, until in list(self._paused_until.items()):
            if key != "*" and until <= now:
                del self._paused_until[key]
                self.stats.paused.pop(key, None)

    def _pause_remaining(self, now: float) -> float:
        until = self._paused_until.get("*")
        return 0.0 if until is None else min(until - now, 1.0)

    def _next_resume(self, now: float) -> float:
        """Seconds until the next paused data source may be probed (1 s when none is)."""
        ahead = [until - now for until in self._paused_until.values() if until > now]
        return max(0.05, min(ahead, default=1.0))

    def _check_token(self, now: float) -> None:
        """While anything is paused, a new token (file) lifts every pause at once."""
        if self._token_source is None or not self._paused_until:
            return
        if now - self._token_checked < TOKEN_CHECK_S:
            return
        self._token_checked = now
        try:
            fresh = self._token_source()
        except ConfigError as exc:
            # Unreadable or not a token (two lines, a stray byte): keep the previous one and
            # say so once per problem; the message names the file, never the token.
            if str(exc) != self._token_problem:
                self._token_problem = str(exc)
                log.error("uploader: the token was not re-read, keeping the previous one: %s", exc)
            return
        if self._token_problem is not None:
            self._token_problem = None
            log.info("uploader: the token file reads correctly again")
        if fresh != self._token:
            self._token = fresh
            log.info("uploader: the token changed; retrying now")
            self._lift_pauses()

    def _lift_pauses(self) -> None:
        self._paused_until.clear()
        self.stats.paused.clear()
        self._pause_log.forget()

    # -- one batch -------------------------------------------------------------------------

    def _deliver(self, session: BufferSession, batch: Batch) -> None:
        """Send a batch, splitting on bad records and size; left half first keeps order."""
        assert self._client is not None
        if len(self._carried) > _MAX_TRACKED:
            self._carried.clear()
        split = _Split(len(batch.rows))
        # Halves share the batch's records (tuples of references, no copy of their text),
        # and a body exists only for the request in flight: the bytes held stay bounded by
        # the batch and one body, however deep the bisection goes.
        todo = [batch]
        while not self._stop.is_set():
            todo = todo or list(reversed(self._isolation.resume()))
            if not todo:
                break
            fitted = self._fit(self._client, session, todo.pop())
            if fitted is None:
                break  # held back for the budget: the rest is read again later
            part, request = fitted
            self._carried.update(part.ids)
            gzip_sent = self._gzips(part) if request is None else _gzipped(request)
            answer = self.send_batch(self._client, part, request)
            if answer.status is not None:
                self.uplink.answered()
            halves = self._decide(session, part, answer, split, gzip_sent)
            if halves is None:
                break  # transient or paused: the rest is read again later
            todo.extend(reversed(halves))
        self._plain_trial = None
        self._isolation.end()
        self.stats.suspects = self._isolation.suspects
        if split.extra_requests:
            log.info(
                "uploader: a batch of %d records of data source %s was split: %d refused "
                "record(s) went to dead letters, %d extra request(s)",
                split.records,
                batch.datasource_id,
                split.dead_lettered,
                split.extra_requests,
            )

    def _decide(
        self,
        session: BufferSession,
        batch: Batch,
        answer: Answer,
        split: _Split,
        gzip_sent: bool = False,
    ) -> list[Batch] | None:
        """Settle the batch per the design's table; returns parts still to send, or None."""
        v = answer.verdict
        trial, self._plain_trial = self._plain_trial == _head(batch), None
        if self._gzip_400_unsure(answer, gzip_sent, split):
            # Some servers and proxies answer 400, not 415, to a body they cannot decode:
            # the same batch once more as plain JSON tells that from a bad record.
            split.plain_tried = True
            self._plain_trial = _head(batch)
            return [batch]
        step = self._isolation.answered(batch, answer.status, v is Verdict.DELIVERED)
        if v is Verdict.DELIVERED and trial and not gzip_sent:
            self._no_gzip(session, 400)
        if v is Verdict.DELIVERED:
            self._note_confirmation(answer.message)
            session.ack(batch, meta={META_KEY: self.budget.settled()})
            self._settled(batch)
            if batch.oldest_created < time.time() - self.endpoint.live_window_s:
                self._backlog_rate.add(len(batch.rows), time.monotonic())
            self._succeeded(batch.datasource_id, len(batch.rows))
            return []
        if v is Verdict.NO_GZIP:
            self._no_gzip(session, 415)
            return [batch]
        if v in (Verdict.BAD_RECORDS, Verdict.TOO_LARGE):
            return self._split_or_dead_letter(session, batch, answer, split)
        if v is Verdict.UNREACHABLE:
            self._link_down(answer)
            return None
        if step is not None and step is not Step.BACK_OFF:
            # The server is up and fails on these records: no backoff, nothing to report as
            # an uplink failure (the 5xx streak before the split backed off and counted).
            return self._isolate(session, batch, answer, step)
        self._failed(answer)
        if v in (Verdict.TRANSIENT, Verdict.NOT_THE_API):
            self._back_off(answer)
        elif v is Verdict.CANNOT_SEND:
            self._pause(
                "*",
                answer,
                f"no request can be sent to {self.endpoint.url}: {answer.message}; readings are "
                f"kept, retrying every {PAUSE_S:.0f} s",
            )
        elif v is Verdict.FORBIDDEN:
            self._pause(
                batch.datasource_id,
                answer,
                f"data source {batch.datasource_id} is forbidden to this token (403: "
                f"{answer.message}); its readings are kept and retried every {PAUSE_S:.0f} s; "
                "grant the token access to it or fix datasource_id, then reload",
            )
        elif v is Verdict.BAD_TOKEN:
            self._pause(
                "*",
                answer,
                f"token rejected by {self.endpoint.url} (401: {answer.message}); readings are "
                f"kept; fix the token (token_env/token_file) and reload, retrying every "
                f"{PAUSE_S:.0f} s",
            )
        else:
            self._pause(
                "*",
                answer,
                f"{self.endpoint.url} answered {answer.status} ({answer.message}); the URL looks "
                "wrong: set [endpoint] url to the insert URL and reload; readings are kept",
            )
        return None

    def _gzip_400_unsure(self, answer: Answer, gzip_sent: bool, split: _Split) -> bool:
        """A 400 to a gzip body, with "auto", from a URL that never took gzip: try plain."""
        return (
            answer.status == 400
            and gzip_sent
            and self.endpoint.gzip == "auto"
            and self._gzip_confirmed != self.endpoint.url
            and not split.plain_tried
        )

    def _no_gzip(self, session: BufferSession, status: int) -> None:
        """Plain JSON from now on: a 415 to gzip, or (with "auto") a 400 to gzip while the
        same batch went through as plain JSON."""
        self._gzip = False
        if self.endpoint.gzip != "auto":
            log.warning("uploader: the server does not take gzip (415); sending plain JSON")
            return
        self._gzip_refused = self.endpoint.url
        session.write_meta(GZIP_REFUSED_KEY, self.endpoint.url)
        said = (
            "does not take gzip (415)"
            if status == 415
            else "answered 400 to gzip and took the same batch as plain JSON"
        )
        log.warning(
            "uploader: %s %s; sending plain JSON from now on, also after a restart "
            '(gzip = "auto"; set gzip = true to try gzip again)',
            self.endpoint.url,
            said,
        )

    # -- the daily byte budget -------------------------------------------------------------

    def _fit(
        self, client: httpx.Client, session: BufferSession, batch: Batch
    ) -> tuple[Batch, httpx.Request | None] | None:
        """The batch, or its first part, whose request the budget allows now, with that
        request; None when not even one record may go (the batch is held back).

        Without a limit there is nothing to weigh, and a request that cannot be built is
        `send_batch`'s to report: then the request is built when it is sent.
        """
        lane = getattr(batch, "lane", "backlog")
        room = self.budget.room(lane)
        if room is None:
            return batch, None
        held = self._held
        if held is not None and held[:2] == (_head(batch), lane) and room < held[2]:
            # The same batch as when it was held back, and still no room for it: wait on.
            self._wait_for_budget(lane, held[2])
            return None
        try:
            request = self._request(client, batch, self._gzips(batch))
        except Exception:
            return batch, None
        cost = request_bytes(request) + ANSWER_ALLOWANCE
        while cost > room and len(batch.rows) > 1:
            # Send what fits: a part sized by the share that fits (halves when that misses).
            keep = max(1, min(len(batch.rows) // 2, len(batch.rows) * room // cost))
            batch = replace(batch, rows=batch.rows[:keep])
            request = self._request(client, batch, self._gzips(batch))
            cost = request_bytes(request) + ANSWER_ALLOWANCE
        if cost > room:
            self._hold_back(session, batch, lane, room, cost)
            return None
        ahead = self.budget.ahead(cost)
        if ahead is not None:
            session.write_meta(META_KEY, ahead)
        self._budget_resumed()
        return batch, request

    def _hold_back(
        self, session: BufferSession, batch: Batch, lane: str, room: int, cost: int
    ) -> None:
        self._held = (_head(batch), lane, cost)
        limit = self.budget.limit
        assert limit is not None
        view = self.budget.view()
        self.budget.waiting = True
        if view.used + cost > limit and not self.budget.spent:
            self.budget.spent = True
            self._spent_day = view.day
            log.warning(
                "uploader: daily byte budget of %s spent (%s used on %s); %d readings wait "
                "until 00:00 UTC",
                size_text(limit),
                size_text(view.used),
                view.day,
                session.pending_count(),
            )
        elif view.used + cost <= limit:
            self._paced_log(
                logging.INFO,
                f"uploader: daily byte budget: {size_text(view.used)} of {size_text(limit)} "
                f"used; the backlog waits while the rest is kept for high-priority and live "
                f"readings (a reserve that shrinks to nothing by 00:00 UTC)",
                key=view.day,
            )
        self._wait_for_budget(lane, cost)

    def _wait_for_budget(self, lane: str, cost: int) -> None:
        """Sleep a second at most: the day turns on the injected clock, not on this sleep."""
        wait = self.budget.allows(cost, lane)
        self._sleep(min(max(wait, 0.05), 1.0))

    def _budget_resumed(self) -> None:
        if self._held is None:
            return
        self._held = None
        self.budget.waiting = False
        if self.budget.spent:
            self.budget.spent = False
            view = self.budget.view()
            if view.day != self._spent_day:
                log.info(
                    "uploader: daily byte budget: a new UTC day (%s) began; sending resumes",
                    view.day,
                )
            else:  # a smaller request fits in what is left (a reload may raise the budget)
                log.info(
                    "uploader: daily byte budget: sending resumes (%s left on %s)",
                    size_text(view.remaining or 0),
                    view.day,
                )

    def _split_or_dead_letter(
        self, session: BufferSession, batch: Batch, answer: Answer, split: _Split
    ) -> list[Batch]:
        if answer.verdict is Verdict.TOO_LARGE and len(batch.rows) > 1:
            # Halving converges whatever the server's limit is: a batch of one record always
            # goes out, and the server then refuses only that record.
            self._byte_limit = max(1, min(self._byte_limit, batch.nbytes // 2))
            # Once a minute at most: one batch may halve several times in a row.
            self._too_large_log(
                logging.WARNING,
                f"uploader: {self.endpoint.url} refused {batch.nbytes} bytes as too large "
                f"(413: {answer.message}); batches are now kept under {self._byte_limit} bytes",
            )
        if len(batch.rows) > 1:
            split.extra_requests += 2
            self.stats.split_requests += 2
            return list(batch.split())
        attempts = self._carried[batch.rows[0].id]
        session.dead_letter(batch, answer.status, answer.message, attempts)
        self._settled(batch)
        split.dead_lettered += 1
        self.stats.records_dead_lettered += 1
        self._dead_letter_log(
            logging.WARNING,
            f"uploader: the server refused a record of data source {batch.datasource_id} "
            f"({answer.status}: {answer.message}); it is kept in dead letters: see "
            "`edge-agent buffer dead-letters`",
        )
        return []

    def _isolate(
        self, session: BufferSession, batch: Batch, answer: Answer, step: Step
    ) -> list[Batch]:
        """A 5xx that may follow the records rather than the server (isolation.py)."""
        if step is Step.SPLIT:
            self.stats.split_requests += 2
            return list(batch.split())
        rid = batch.rows[0].id
        watched = self._isolation.watch(rid)
        if step is Step.SET_ASIDE and watched is not None:
            self._set_aside(session, batch, answer, watched[1], watched[2])
        elif watched is not None and watched[0] == 1:
            self._suspect_log(
                logging.WARNING,
                f"uploader: the server fails on a record of data source {batch.datasource_id} "
                f"sent alone ({answer.status}: {answer.message}); the rest of the data source "
                "goes on, the record is retried alone and set aside to dead letters after "
                f"{self.endpoint.poison_attempts} failures over "
                f"{self.endpoint.poison_min_age_s:g} s while other requests succeed",
            )
        return []

    def _set_aside(
        self, session: BufferSession, batch: Batch, answer: Answer, strikes: int, age: float
    ) -> None:
        attempts = self._carried[batch.rows[0].id]
        session.dead_letter(batch, answer.status, f"{answer.message} ({REASON})", attempts)
        self._settled(batch)
        self.stats.records_dead_lettered += 1
        self.stats.records_set_aside += 1
        self._set_aside_log(
            logging.WARNING,
            f"uploader: the server failed on a record of data source {batch.datasource_id} "
            f"alone {strikes} times over {age:.0f} s while other requests succeeded "
            f"({answer.status}: {answer.message}); it is set aside in dead letters: see "
            "`edge-agent buffer dead-letters`, and requeue it once the server is fixed",
        )

    def _note_confirmation(self, message: str) -> None:
        """Say once that the API confirmed in other words; the batch counts as delivered."""
        if message in self._confirmations or len(self._confirmations) > 20:
            return
        self._confirmations.add(message)
        log.info(
            "uploader: %s confirmed an upload with '%s' instead of '%s'; any JSON object in a "
            "2xx answer counts as delivered",
            self.endpoint.url,
            message,
            SUCCESS_MESSAGE,
        )

    def _settled(self, batch: Batch) -> None:
        for rid in batch.ids:
            self._carried.pop(rid, None)
        self._isolation.forget(batch.ids)

    def send_batch(
        self, client: httpx.Client, batch: Batch, request: httpx.Request | None = None
    ) -> Answer:
        """One request (`request`, when the budget built it already); whatever comes of it
        becomes an Answer here, and only here. Its bytes on the wire count in the budget."""
        gzip_sent = self._gzips(batch) if request is None else _gzipped(request)
        try:
            request = request or self._request(client, batch, gzip_sent)
            outcome = self._exchange.send(
                client, request, self.endpoint.timeout_s, MAX_ANSWER_BYTES
            )
        except httpx.LocalProtocolError as exc:  # our request is malformed: a bad header
            self.stats.requests["error"] += 1
            return Answer(Verdict.CANNOT_SEND, None, _unsendable(exc))
        except httpx.HTTPError as exc:
            # Also a lost answer (connection closed after the request went out): the batch
            # is sent again, so the server may get it twice (at-least-once).
            self.stats.requests["error"] += 1
            nothing = isinstance(exc, NO_CONNECTION)  # no connection, so nothing answered
            if not nothing and request is not None:  # it may have gone out whole: count it
                self.budget.spend(request_bytes(request))
            verdict = Verdict.UNREACHABLE if nothing else Verdict.TRANSIENT
            via = proxy_note(self.endpoint, self._transport is None)
            return Answer(verdict, None, printable(_network_message(exc), 400) + via)
        except Exception as exc:
            # The boundary: anything else raised while building or sending (a token HTTP
            # cannot carry, a bug) is a failed upload like any other, not a crash loop.
            self.stats.requests["error"] += 1
            return Answer(Verdict.CANNOT_SEND, None, _unsendable(exc))
        match outcome:
            case Stalled():
                self.budget.spend(request_bytes(request) + outcome.received)
                self.stats.requests["stalled"] += 1
                return Answer(Verdict.TRANSIENT, None, _stall_message(outcome))
            case Reply():
                self.budget.spend(request_bytes(request) + outcome.wire_bytes)
                self.stats.requests[str(outcome.status)] += 1
                answer = judge(outcome, gzip_sent, self._clock.wall())
                if gzip_sent and answer.verdict is Verdict.DELIVERED:
                    self._gzip_confirmed = self.endpoint.url
                if self.time_source is not None:
                    self.time_source.observe(outcome, answer, probe=not batch.rows)
                return answer

    def _gzips(self, batch: Batch) -> bool:
        """Whether the batch's request is compressed: never one without readings (a clock
        probe, ~50 bytes), nor the plain try of a batch that got 400 to gzip."""
        return self._gzip and bool(batch.rows) and self._plain_trial != _head(batch)

    def _request(self, client: httpx.Client, batch: Batch, gzip_sent: bool) -> httpx.Request:
        """The request for a batch; its body is the only copy of the batch's bytes it adds,
        dropped with the request (halves of a split batch are built when they are sent)."""
        body = build_body(batch)
        headers = {
            "Authorization": f"Bearer {self._token.reveal()}",
            "Content-Type": "application/json",
            # The answer is a short message: ask for it plain, so a bomb is less likely.
            "Accept-Encoding": "identity",
        }
        if gzip_sent:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        return client.build_request("POST", self.endpoint.url, content=body, headers=headers)

    # -- pacing and reporting --------------------------------------------------------------

    def _succeeded(self, datasource_id: str, records: int) -> None:
        if self._failures or self.stats.failing_since is not None:
            log.info("uploader: uploads succeed again")
        for key in ("*", datasource_id):
            self._paused_until.pop(key, None)
            self.stats.paused.pop(key, None)
        # Keyed (data source or "*", status): both pauses are over, their next line is news.
        self._pause_log.forget(
            lambda logged: isinstance(logged, tuple) and logged[0] in ("*", datasource_id)
        )
        self._failures = 0
        self.uplink.answered()
        self._unexpected_log.forget()  # the next one is a new incident
        self.stats.records_uploaded += records
        self.stats.last_success = self._clock.wall()
        self.stats.failing_since = None
        self.stats.last_error = None

    def _failed(self, answer: Answer) -> None:
        detail = f"{answer.status} {answer.message}" if answer.status else answer.message
        self.stats.last_error = detail
        if self.stats.failing_since is None:
            self.stats.failing_since = time.monotonic()

    def backoff_delay(self, failures: int, retry_after: float | None = None) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(failures-1))], at least Retry-After.

        Retry-After is honoured up to `backoff_max_s`, the longest the agent ever waits.
        """
        ep = self.endpoint
        ceiling = min(ep.backoff_max_s, ep.backoff_base_s * 2 ** min(failures - 1, 30))
        delay = self._rng.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, ep.backoff_max_s))
        return delay

    def _back_off(self, answer: Answer) -> None:
        self._failures += 1
        self.stats.retries += 1
        delay = self.backoff_delay(self._failures, answer.retry_after)
        what = f"{answer.status} {answer.message}" if answer.status else answer.message
        self._failed_log(
            logging.WARNING,
            f"uploader: upload to {self.endpoint.url} failed ({what}); readings are kept, "
            f"retrying in {delay:.1f} s (failure {self._failures})",
            key=answer.verdict,
            force=self._failures == 1,
        )
        self.uplink.refusing(delay)
        self._sleep(delay)

    # -- while nothing answers -------------------------------------------------------------

    def _link_down(self, answer: Answer) -> None:
        """No connection could be made: send nothing more until a probe gets through."""
        first = self.stats.failing_since is None
        self._failed(answer)
        self.stats.retries += 1
        self.uplink.unreachable()
        target = target_for(self.endpoint, self._transport is None)
        self._failed_log(
            logging.WARNING,
            f"uploader: upload to {self.endpoint.url} failed ({answer.message}); readings are "
            f"kept, retrying as soon as the link is back (probing {target} every "
            f"{self.uplink.probe_every_s:g} s)",
            key=Verdict.UNREACHABLE,
            force=first,
        )
        self._probe_log.hold()  # the next line about it in a minute

    def _link_back(self) -> bool:
        """While the link is down: probe when due; True once a probe got through."""
        wait = self.uplink.until_probe()
        if wait > 0:
            self._sleep(min(wait, ROUTE_CHECK_S))
            return False
        why = self._probe(self.endpoint)
        target = target_for(self.endpoint, self._transport is None)
        if why is not None:
            self.uplink.probe_failed()
            self._probe_log(
                logging.WARNING,
                f"uploader: {target} still cannot be reached ({why}); readings are kept, "
                f"{self.uplink.view().summary}",
            )
            return False
        down_s = self.uplink.probe_succeeded()
        self._failures = 0  # the backoff starts afresh: the link is back, send at once
        log.info("uploader: %s can be reached again after %.0f s; sending now", target, down_s)
        return True

    def _probe_link(self, ep: EndpointConfig) -> str | None:
        # The proxies of the environment apply as they do to requests (not to a transport
        # handed in, which decides alone how requests travel).
        return probe(target_for(ep, self._transport is None), ep.timeout_s, tls_context(ep))

    def _pause(self, key: str, answer: Answer, message: str) -> None:
        self._paused_until[key] = time.monotonic() + PAUSE_S
        self.stats.paused[key] = message
        self._pause_log(logging.ERROR, "uploader: " + message, key=(key, answer.status))
