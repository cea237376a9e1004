"""Time from the uplink: the insert API's `Date` header as a clock when NTP is missing.

Every HTTP answer carries a `Date` (RFC 9110, whole seconds). An answer of the API, over a
channel nobody in between can forge (TLS with the certificate checked, or plain HTTP to this
machine), tells the true time to within half a second plus half the round trip. `UplinkTime`
collects those samples as offsets from the monotonic clock, which no wall-clock jump moves,
so a sample stays valid after NTP or a person sets the clock.

    Sample            one answer's Date: the interval the true offset lies in
    UplinkTime        the samples, whether they agree, and when to probe for one
    uplink_usable     whether an endpoint's answers may serve as a time source at all

The uploader feeds it every answer (`observe`) and, while the clock waits for confirmation
and nothing else is sent, sends a probe (`probe_due`, `probe_batch`, `probed`): a request
with an empty `data` list, which carries no reading. The ClockGuard (clock.py) decides
from the samples; this module only measures.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from urllib.parse import urlsplit

from edge_agent.buffer import Batch
from edge_agent.clock import AGREE_S, Clock
from edge_agent.config import EndpointConfig
from edge_agent.exchange import Reply
from edge_agent.uploader import Answer, Verdict

# Probe pacing while the clock waits: a second after the last (a second answer is needed
# when the wall clock disagrees); the uploader's backoff comes on top after a failed one.
PROBE_INTERVAL_S = 1.0
_KEPT = 8  # samples kept: the latest decide; older ones only show history


@dataclass(frozen=True)
class Sample:
    """True time minus monotonic time lies in [low, high] (seconds)."""

    low: float
    high: float

    @property
    def offset(self) -> float:
        return (self.low + self.high) / 2

    @property
    def error(self) -> float:
        """The most the offset can be wrong by, if the server's clock is right."""
        return (self.high - self.low) / 2

    def distance(self, offset: float) -> float:
        """How far `offset` lies outside the interval (0 inside it)."""
        return max(0.0, self.low - offset, offset - self.high)


def sample_from(date: str | None, sent: float, received: float) -> Sample | None:
    """The sample an answer's `Date` gives, sent and received at these monotonic times.

    The server wrote the Date between `sent` and `received`, truncated to the second: the
    true time then was in [D, D + 1). Taking the middle corrects for half the round trip.
    """
    if not date:
        return None
    try:
        when = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    d = when.timestamp()
    return Sample(d - received, d + 1.0 - sent)


def uplink_usable(ep: EndpointConfig) -> str | None:
    """None when the endpoint's answers can be a time source, else why not."""
    parts = urlsplit(ep.url)
    if parts.scheme == "https":
        if ep.verify_tls:
            return None
        return "verify_tls = false: anyone on the way could answer with any Date"
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return "the URL is plain http:// to another machine: anyone on the way could answer"


def _from_the_api(reply: Reply, answer: Answer, probe: bool) -> bool:
    """An answer of the API itself, never a captive portal's or a proxy's.

    A delivered batch (a 2xx with a JSON object). For the probe also the API refusing the
    empty list in JSON (a 4xx the uploader takes for refused records, with a JSON object):
    the spec does not say what the API answers to it, and that answer still comes from it.
    """
    if answer.verdict is Verdict.DELIVERED:
        return True
    if not probe or answer.verdict is not Verdict.BAD_RECORDS or not reply.complete:
        return False
    try:
        return isinstance(json.loads(reply.body), dict)
    except (ValueError, RecursionError):
        return False


class UplinkTime:
    """Samples of the API's time. The uploader's thread writes, the main thread reads."""

    def __init__(self, clock: Clock, url: str, probe_datasource: str) -> None:
        self._clock = clock
        self.url = url
        self._probe_datasource = probe_datasource
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self.answers_without_date = 0
        self.wanted = True  # the guard waits for a sample: probe when nothing else goes out
        self._next_probe = 0.0  # monotonic
        self._sampled_since_probe = False
        self.probes = 0
        # Called (in the uploader's thread) after each new sample: the agent looks at its
        # clock at once instead of at its next tick.
        self.on_sample: Callable[[], None] | None = None
        self.last_probe: str | None = None  # what the last probe got, for the status page

    # -- fed by the uploader ---------------------------------------------------------------

    def observe(self, reply: Reply, answer: Answer, probe: bool) -> None:
        """Take the Date of an answer of the API; anything else is ignored."""
        if not _from_the_api(reply, answer, probe):
            return
        received = self._clock.monotonic()
        sample = sample_from(reply.date, received - reply.elapsed_s, received)
        with self._lock:
            if sample is None:
                self.answers_without_date += 1
                return
            self._samples = [*self._samples[-(_KEPT - 1) :], sample]
            self._sampled_since_probe = True
        if self.on_sample is not None:
            self.on_sample()

    def probe_due(self) -> bool:
        return self.wanted and self._clock.monotonic() >= self._next_probe

    def probe_batch(self) -> Batch:
        self._sampled_since_probe = False
        self.probes += 1
        return self.empty_batch()

    def empty_batch(self) -> Batch:
        """The probe's batch, without counting a probe: to weigh it against the budget."""
        return Batch(self._probe_datasource, 0, (), 0.0)

    def probed(self, answer: Answer) -> bool:
        """Note what the probe got; True when the API answered it (a sample was taken).

        The next probe follows a second later: the uploader backs off after a failed one."""
        status = f"{answer.status} " if answer.status else ""
        taken = self._sampled_since_probe
        self.last_probe = f"{status}answered by the API" if taken else f"{status}{answer.message}"
        self._next_probe = self._clock.monotonic() + PROBE_INTERVAL_S
        return taken

    # -- read by the clock guard -----------------------------------------------------------

    def latest(self) -> Sample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def agreed(self) -> Sample | None:
        """The offset of the last two answers when they agree within AGREE_S, else None.

        Their intervals' intersection when they overlap (better than either), else the
        interval spanning both middles."""
        with self._lock:
            if len(self._samples) < 2:
                return None
            a, b = self._samples[-2:]
        if abs(a.offset - b.offset) > AGREE_S:
            return None
        low, high = max(a.low, b.low), min(a.high, b.high)
        if low <= high:
            return Sample(low, high)
        return Sample(min(a.offset, b.offset), max(a.offset, b.offset))

    @property
    def no_date(self) -> bool:
        """The API answered but never with a Date: it cannot confirm the clock."""
        with self._lock:
            return self.answers_without_date > 0 and not self._samples
