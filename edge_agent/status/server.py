"""The status endpoint: a small HTTP server and a sampler thread around a snapshot function.

    GET /             the page (refreshes itself every 10 s; no JavaScript, no CDN)
    GET /healthz      200 {"status": "ok"} or 503 {"status": "unhealthy", "reasons": [...]}
    GET /metrics      Prometheus text format 0.0.4
    GET /status.json  the snapshot plus {"health": {"healthy": ..., "reasons": [...]}}

A failing snapshot never takes the server down: the request answers 500 and the traceback is
logged once until the snapshot works again (Prometheus and the page poll, so logging every
failure would flood the journal).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import EdgeAgentError
from edge_agent.httpserver import QuietHandler, QuietServer, bind_failure
from edge_agent.status.client import SERVER_NAME
from edge_agent.status.health import status_document
from edge_agent.status.history import History
from edge_agent.status.metrics import METRICS_CONTENT_TYPE, ProcessStats, render_metrics
from edge_agent.status.page import render_page
from edge_agent.status.snapshot import Snapshot, Status

log = logging.getLogger("edge_agent.status")

_LISTEN = re.compile(r"(?P<host>\[[^\]\s]+\]|[^\s:\[\]]*):(?P<port>[0-9]{1,5})")


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:9108') -> (host, port); ValueError says what is expected."""
    match = _LISTEN.fullmatch(listen.strip()) if isinstance(listen, str) else None
    example = "host:port, e.g. 127.0.0.1:9108 (this machine only) or 0.0.0.0:9108 (every network)"
    if match is None:
        raise ValueError(f"status listen address {listen!r} is not {example}")
    host, port = match["host"].strip("[]"), int(match["port"])
    if not host:
        raise ValueError(f"status listen address {listen!r} has no host; expected {example}")
    if port > 65535:
        raise ValueError(
            f"status listen address {listen!r}: port {port} is out of range 0-65535 "
            "(0 picks a free port)"
        )
    return host, port


@dataclass(frozen=True)
class _Answer:
    status: int
    content_type: str
    body: bytes


def _json_answer(status: int, doc: Any) -> _Answer:
    text = json.dumps(doc, ensure_ascii=False, default=str)
    return _Answer(status, "application/json", text.encode())


def _text_answer(status: int, text: str) -> _Answer:
    return _Answer(status, "text/plain; charset=utf-8", text.encode())


class StatusServer:
    """Serves /, /healthz, /metrics and /status.json. Lifecycle: new -> start() -> stop()."""

    def __init__(
        self,
        listen: str,
        snapshot: Callable[[], Snapshot],
        unhealthy_after_s: float = 300.0,
        history: History | None = None,
    ) -> None:
        self.listen = listen
        self._address = parse_listen(listen)
        self._snapshot = snapshot
        self.unhealthy_after_s = unhealthy_after_s
        self.history = history if history is not None else History()
        self._stop = threading.Event()
        self._state = "new"
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._failure_lock = threading.Lock()
        self._failure: str | None = None  # the failure already logged, until snapshots work

    # lifecycle

    def start(self) -> StatusServer:
        if self._state != "new":
            raise RuntimeError(f"this StatusServer is {self._state}; make a new one")
        try:
            self._server = _Server(self._address, self)
        except OSError as exc:
            raise EdgeAgentError(
                f"status page: cannot listen on {self.listen}: {bind_failure(exc)}"
            ) from exc
        self._threads = [
            threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},  # stop() waits up to one poll interval
                name=f"status:{self.port}",
                daemon=True,
            ),
            threading.Thread(target=self._sample_loop, name="status-sampler", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._state = "running"
        log.info("status: serving %s (/, /healthz, /metrics, /status.json)", self.url)
        return self

    def stop(self) -> None:
        if self._state == "running":
            assert self._server is not None
            self._stop.set()
            self._server.shutdown()
            self._server.server_close()
            for thread in self._threads:
                thread.join()
        self._state = "stopped"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the status server has no port until start()")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._address[0]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"  # a client cannot dial the wildcard address
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    # work

    def answer(self, path: str) -> _Answer:
        """The answer to GET `path`; never raises (a failure is a 500 that says why)."""
        render = _ROUTES.get(path)
        if render is None:
            return _text_answer(404, f"no page {path}; try /, /healthz, /metrics or /status.json\n")
        try:
            doc = status_document(self._take_snapshot(), self.unhealthy_after_s)
            answer = render(self, doc)
        except Exception as exc:  # the boundary: answer 500 rather than drop the connection
            self._note_failure(exc)
            return _text_answer(
                500, f"the agent could not report its status: {type(exc).__name__}: {exc}\n"
            )
        self._note_success()
        return answer

    def _take_snapshot(self) -> Snapshot:
        doc = self._snapshot()
        if not isinstance(doc, Snapshot):
            raise TypeError(f"snapshot() returned {type(doc).__name__}, not a Snapshot")
        return doc

    def _note_failure(self, exc: Exception) -> None:
        key = f"{type(exc).__name__}: {exc}"
        with self._failure_lock:
            if key == self._failure:
                return
            self._failure = key
        log.error(
            "status: cannot build the agent's status (%s); answering 500 until it works again",
            key,
            exc_info=exc,
        )

    def _note_success(self) -> None:
        with self._failure_lock:
            recovered, self._failure = self._failure is not None, None
        if recovered:
            log.info("status: the agent's status can be built again")

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                snapshot = self._take_snapshot()
            except Exception as exc:  # logged once; the next interval tries again
                self._note_failure(exc)
            else:
                self.history.sample(snapshot, time.monotonic())
            self._stop.wait(self.history.interval_s)

    def _page(self, doc: Status) -> _Answer:
        page = render_page(doc, self.history.samples(), time.time())
        return _Answer(200, "text/html; charset=utf-8", page.encode())

    def _healthz(self, doc: Status) -> _Answer:
        if doc.health.healthy:
            return _json_answer(200, {"status": "ok"})
        return _json_answer(503, {"status": "unhealthy", "reasons": list(doc.health.reasons)})

    def _metrics(self, doc: Status) -> _Answer:
        text = render_metrics(doc, ProcessStats.read())
        return _Answer(200, METRICS_CONTENT_TYPE, text.encode())

    def _status_json(self, doc: Status) -> _Answer:
        return _json_answer(200, doc.to_json())


_ROUTES: dict[str, Callable[[StatusServer, Status], _Answer]] = {
    "/": StatusServer._page,
    "/healthz": StatusServer._healthz,
    "/metrics": StatusServer._metrics,
    "/status.json": StatusServer._status_json,
}


class _Server(QuietServer):
    def __init__(self, address: tuple[str, int], status: StatusServer) -> None:
        self.status = status
        super().__init__(address, _Handler, log, "status")


class _Handler(QuietHandler):
    server: _Server
    server_version = SERVER_NAME  # `fetch_status` tells the agent from another program by it

    def do_GET(self) -> None:
        self._reply(with_body=True)

    def do_HEAD(self) -> None:
        self._reply(with_body=False)

    def _reply(self, with_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        answer = self.server.status.answer(path)
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if with_body:
                self.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to tell it
