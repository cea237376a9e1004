"""One request to the insert API, bounded in time and in memory.

httpx's timeouts apply to each network operation, not to the request: a server or a proxy
that sends a byte every few seconds keeps a request going for ever, and `response.read()`
takes whatever size the other end sends. `Exchange.send` gives the whole exchange one
deadline and keeps at most `limit` bytes of the answer, so the uploader always gets a
`Reply` (a status, its headers and the start of the body) or a `Stalled` within about
`timeout_s`, and never holds more of an answer than the limit.

The deadline is kept in two ways. Between chunks of the answer, the clock is checked. And a
timer shuts down the sockets of the client's connections when the deadline passes, which
wakes a read or a write blocked inside httpx (headers sent a byte at a time, a request body
the server does not take). The sockets are learnt from httpcore's `trace` extension as
connections open; one Exchange serves one thread, so the only request in flight on them is
ours. httpx errors pass through to the caller, which translates them, except those caused by
the deadline once connected: they become `Stalled`. `NO_CONNECTION` errors always pass: no
connection was made, so nothing answered (the uploader then probes the link).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

# Events of httpcore's `trace` extension whose return value is a new network stream.
_STREAM_EVENTS = frozenset({"connection.connect_tcp.complete", "connection.start_tls.complete"})
_SENT_EVENT = "http11.send_request_body.complete"
# The connection itself failed: refused, DNS, unreachable, connect timeout, TLS handshake.
NO_CONNECTION = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclass(frozen=True)
class Reply:
    """An answer, as far as it was read."""

    status: int
    reason: str
    content_type: str  # "" when the server sent none
    retry_after: str | None
    body: bytes  # decoded, at most the limit
    complete: bool  # False: the body went on past the limit (the rest was not read)
    date: str | None = None  # the Date header: the server's clock (uplink_time.py)
    elapsed_s: float = 0.0  # from sending the request to the end of the answer (monotonic)
    wire_bytes: int = 0  # the status line, headers and body bytes received (budget.py)


@dataclass(frozen=True)
class Stalled:
    """The deadline passed first: no complete answer within `timeout_s`."""

    timeout_s: float
    sent: bool  # the whole request went out (False: it was still being sent)
    status: int | None  # None when not even the status line and headers came
    received: int  # bytes of the answer's body received before the deadline


class Exchange:
    """Sends one request at a time with a whole-request deadline and a capped answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the timer's thread reads the sockets too
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._sent = False  # of the request in flight

    def send(
        self, client: httpx.Client, request: httpx.Request, timeout_s: float, limit: int
    ) -> Reply | Stalled:
        started = time.monotonic()
        deadline = started + timeout_s
        request.extensions["trace"] = self._trace
        self._sent = False
        timer = threading.Timer(timeout_s, self._cut)
        timer.daemon = True
        timer.start()
        status: int | None = None
        body = _Body(limit)
        try:
            response = client.send(request, stream=True)
            try:
                status = response.status_code
                for chunk in _chunks(response, body):
                    if time.monotonic() >= deadline:
                        return self._stalled(timeout_s, status, body.received)
                    if not body.feed(chunk):
                        break  # past the limit: closing the response drops the rest
            finally:
                response.close()
        except httpx.HTTPError as exc:
            # Our timer cut the connection; but a connection never made (refused, timed out
            # connecting, a failed TLS handshake) is the caller's news whenever it comes.
            if time.monotonic() >= deadline and not isinstance(exc, NO_CONNECTION):
                return self._stalled(timeout_s, status, body.received)
            raise
        finally:
            timer.cancel()
        return Reply(
            status,
            response.reason_phrase,
            response.headers.get("Content-Type", ""),
            response.headers.get("Retry-After"),
            body.data(),
            not body.overflowed,
            response.headers.get("Date"),
            time.monotonic() - started,
            _head_bytes(response) + body.received,
        )

    def _stalled(self, timeout_s: float, status: int | None, received: int) -> Stalled:
        # An answer started means the request went out, also through a transport that
        # traces nothing (a mock).
        return Stalled(timeout_s, self._sent or status is not None, status, received)

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event == _SENT_EVENT:
            self._sent = True
        if event not in _STREAM_EVENTS:
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sockets.add(sock)

    def _cut(self) -> None:
        """The deadline passed: wake whatever httpx waits for on our connections."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            # Closed already, or never connected: nothing to wake.
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown
                # would unwrap it under the feet of the thread reading it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _head_bytes(response: httpx.Response) -> int:
    """The answer's status line and headers as they came over the wire (HTTP/1.1)."""
    line = len(response.http_version) + len(response.reason_phrase) + 7  # "H 200 R\r\n"
    return line + sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 2


def _chunks(response: httpx.Response, body: _Body) -> Iterator[bytes]:
    """The answer's bytes as they arrive, still encoded (`body` decodes them)."""
    if response.is_stream_consumed:  # a transport that read it already (MockTransport)
        return iter([response.content])  # decoded by httpx already
    body.start(response.headers.get("Content-Encoding", ""))
    return response.iter_raw()


class _Body:
    """The first `limit` bytes of an answer, decoded when it came gzip- or zlib-compressed.

    Decoding is ours, with a bound on its output, because httpx would inflate a whole chunk
    at once: 64 KiB of a gzip bomb are 64 MB.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._inflate: Any = None
        self.received = 0
        self.overflowed = False

    def start(self, content_encoding: str) -> None:
        if content_encoding.strip().lower() in ("gzip", "x-gzip", "deflate"):
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header

    def feed(self, chunk: bytes) -> bool:
        """Take a chunk; False once the limit is passed (read no more)."""
        self.received += len(chunk)
        room = self._limit + 1 - len(self._buf)
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk, room)
            except zlib.error:
                self._inflate = None  # not what it claims: keep the bytes as they came
        self._buf += chunk[:room]
        self.overflowed = len(self._buf) > self._limit
        return not self.overflowed

    def data(self) -> bytes:
        return bytes(self._buf[: self._limit])
