"""The status endpoint: health rules, metrics, the page (also in a real browser), history.

Every HTTP test talks to a real StatusServer on a free port; its snapshot function returns a
copy of a dict the test changes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.errors import EdgeAgentError
from edge_agent.sources.base import SourceStats
from edge_agent.status import (
    AgentPart,
    BufferPart,
    ClockPart,
    ErrorPart,
    Health,
    History,
    Snapshot,
    SourcePart,
    Status,
    StatusServer,
    UploaderPart,
    fetch_status,
    health,
    parse_listen,
    render_page,
    render_status_line,
    render_status_text,
    status_document,
    status_json_url,
)
from edge_agent.status.snapshot import (
    OPTIONAL,
    BudgetPart,
    DrainPart,
    Part,
    SnapshotFormatError,
)
from edge_agent.uplink import UplinkView
from tests.helpers import wait_until

NOW = float(int(time.time()))  # the page says how long ago things were, from the real clock


def make_snapshot() -> Snapshot:
    """A healthy agent with one serial source that has seen some trouble."""
    return Snapshot(
        agent=AgentPart(
            version="0.1.0",
            device_id="gw-001",
            config="/etc/edge-agent/config.toml",
            buffer=None,
            uptime_s=4000.0,
        ),
        sources=(
            source_part(
                "weather",
                "serial",
                lines=10,
                readings=20,
                parse_errors=1,
                reconnects=2,
                last_data=NOW - 1,
            ),
            source_part("tank-level", "mqtt", lines=7, readings=7, last_data=NOW - 3),
        ),
        buffer=BufferPart(
            pending={"67890": 12, "67891": 3},
            pending_total=15,
            pending_bytes=3456,
            held=0,
            oldest_age_s=2.5,
            datasources={},
            file_bytes=1_000_000,
            max_bytes=268_435_456,
            dead_letters=4,
            counters={
                "dropped.buffer_full.67890": 3,
                "dropped.unparseable.weather": 1,
                "uploaded.67890": 100,
                "dead_letters.67890": 2,
            },
        ),
        uploader=UploaderPart(
            records_uploaded=100,
            requests={"200": 5, "503": 1, "error": 2},
            retries=3,
            last_success=NOW - 5,
            last_error=None,
            failing_for_s=None,
            paused={},
            uplink=None,
            records_set_aside=0,
            suspects=0,
        ),
        clock=ClockPart(
            trusted=True,
            confirming=False,
            state="synced",
            jumps=0,
            source="system",
            offset_s=None,
            uplink_error_s=None,
        ),
        errors=(ErrorPart(NOW - 60, "uploader", "503 Service Unavailable"),),
    )


def source_part(name: str, kind: str, **stats: Any) -> SourcePart:
    """A connected source with its counters at zero unless given."""
    return SourcePart(name=name, type=kind, **{**asdict(SourceStats(connected=True)), **stats})


def changed(snap: Snapshot, **parts: dict[str, Any]) -> Snapshot:
    """`snap` with fields of its parts replaced: changed(snap, uploader={"retries": 4})."""
    return replace(
        snap, **{name: replace(getattr(snap, name), **values) for name, values in parts.items()}
    )


def with_source(snap: Snapshot, index: int, **values: Any) -> Snapshot:
    """`snap` with fields of its source number `index` replaced."""
    sources = list(snap.sources)
    sources[index] = replace(sources[index], **values)
    return replace(snap, sources=tuple(sources))


@dataclass
class State:
    """What the test server's snapshot function returns; a test replaces `snap` to change it."""

    snap: Snapshot


@pytest.fixture
def state() -> State:
    return State(make_snapshot())


@pytest.fixture
def server(state: State) -> Iterator[StatusServer]:
    srv = StatusServer(
        "127.0.0.1:0",
        lambda: state.snap,
        unhealthy_after_s=60.0,
        history=History(interval_s=0.05),
    )
    srv.start()
    yield srv
    srv.stop()


def get(server: StatusServer, path: str) -> httpx.Response:
    return httpx.get(server.url.rstrip("/") + path, timeout=5, trust_env=False)


# -- health rules ------------------------------------------------------------------------


def test_a_working_agent_is_healthy() -> None:
    assert health(make_snapshot(), 60.0) == (True, [])


def test_a_disconnected_source_is_named_with_its_error() -> None:
    snap = make_snapshot()
    snap = with_source(
        snap, 0, connected=False, last_error="cannot open /dev/ttyUSB0: no such file"
    )
    snap = with_source(snap, 1, connected=False)
    healthy, reasons = health(snap, 60.0)
    assert not healthy
    assert reasons == [
        "serial source weather is not connected: cannot open /dev/ttyUSB0: no such file",
        "mqtt source tank-level is not connected (no error reported yet)",
    ]


def test_uploads_failing_longer_than_the_limit_are_unhealthy() -> None:
    snap = make_snapshot()
    snap = changed(snap, uploader={"failing_for_s": 60.0, "last_error": "503 Service Unavailable"})
    assert health(snap, 60.0) == (True, [])  # not longer than the limit yet
    snap = changed(snap, uploader={"failing_for_s": 125.0})
    healthy, reasons = health(snap, 60.0)
    assert not healthy
    assert reasons == [
        "uploads have been failing for 2 min (last error: 503 Service Unavailable); "
        "readings are kept in the buffer and retried"
    ]


def test_paused_uploads_are_unhealthy_for_everything_or_one_data_source() -> None:
    snap = make_snapshot()
    snap = changed(snap, uploader={"paused": {"99999": "403: forbidden for this token"}})
    # The uploader's own message says what happens to the readings: not repeated here.
    assert health(snap, 60.0)[1] == [
        "uploads to data source 99999 are paused: 403: forbidden for this token"
    ]
    snap = changed(snap, uploader={"paused": {"*": "token rejected by the server (401)"}})
    assert health(snap, 60.0)[1] == [
        "uploads are stopped for every data source: token rejected by the server (401)"
    ]


def test_an_untrusted_clock_is_unhealthy() -> None:
    snap = make_snapshot()
    snap = changed(snap, clock={"trusted": False, "state": "unsynced"})
    healthy, reasons = health(snap, 60.0)
    assert not healthy
    assert len(reasons) == 1
    assert reasons[0].startswith("the system clock is not trusted (state: unsynced)")


# -- /healthz, /status.json, 404 ---------------------------------------------------------


def test_healthz_answers_200_then_503_with_reasons(server: StatusServer, state: State) -> None:
    ok = get(server, "/healthz")
    assert (ok.status_code, ok.json()) == (200, {"status": "ok"})
    state.snap = with_source(state.snap, 0, connected=False, last_error="port disappeared")
    bad = get(server, "/healthz")
    assert bad.status_code == 503
    assert bad.json() == {
        "status": "unhealthy",
        "reasons": ["serial source weather is not connected: port disappeared"],
    }


def test_status_json_is_the_snapshot_with_its_health(server: StatusServer, state: State) -> None:
    state.snap = changed(state.snap, clock={"trusted": False, "state": "unsynced"})
    doc = get(server, "/status.json").json()
    assert doc["sources"] == state.snap.to_json()["sources"]
    assert doc["buffer"] == state.snap.to_json()["buffer"]
    assert doc["health"]["healthy"] is False
    assert "clock" in doc["health"]["reasons"][0]


def test_unknown_paths_are_404(server: StatusServer) -> None:
    response = get(server, "/admin")
    assert response.status_code == 404
    assert "/healthz" in response.text
    assert get(server, "/metrics?x=1").status_code == 200  # a query string is ignored


# -- /metrics ----------------------------------------------------------------------------


Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: StatusServer) -> Metrics:
    response = get(server, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values: Metrics = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith(("edge_agent_", "process_"))
        assert family.documentation, f"{family.name} has no HELP"
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return values


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics[(f"edge_agent_{name}", frozenset(labels.items()))]


def test_metrics_match_the_snapshot(server: StatusServer, state: State) -> None:
    state.snap = changed(state.snap, uploader={"paused": {"99999": "forbidden"}})
    m = scrape(server)
    assert value(m, "source_readings_total", source="weather") == 20
    assert value(m, "source_readings_total", source="tank-level") == 7
    assert value(m, "source_lines_total", source="weather") == 10
    assert value(m, "source_parse_errors_total", source="weather") == 1
    assert value(m, "source_reconnects_total", source="weather") == 2
    assert value(m, "source_connected", source="weather") == 1
    assert value(m, "source_last_data_timestamp_seconds", source="weather") == NOW - 1
    assert value(m, "buffer_pending_readings", datasource="67890") == 12
    assert value(m, "buffer_pending_readings", datasource="67891") == 3
    assert value(m, "buffer_pending_bytes") == 3456
    assert value(m, "buffer_file_bytes") == 1_000_000
    assert value(m, "buffer_max_bytes") == 268_435_456
    assert value(m, "buffer_oldest_pending_age_seconds") == 2.5
    assert value(m, "dead_letters") == 4
    assert value(m, "dropped_readings_total", reason="buffer_full", datasource="67890") == 3
    assert value(m, "source_dropped_total", reason="unparseable", source="weather") == 1
    assert value(m, "uploaded_records_total") == 100
    assert value(m, "upload_requests_total", status="200") == 5
    assert value(m, "upload_requests_total", status="503") == 1
    assert value(m, "upload_requests_total", status="error") == 2
    assert value(m, "upload_retries_total") == 3
    assert value(m, "upload_last_success_timestamp_seconds") == NOW - 5
    assert value(m, "uploads_paused", scope="99999") == 1
    assert value(m, "clock_trusted") == 1
    assert value(m, "healthy") == 0  # paused for a data source
    assert value(m, "info", version="0.1.0", device_id="gw-001") == 1


def test_metrics_follow_changes(server: StatusServer, state: State) -> None:
    state.snap = changed(
        with_source(state.snap, 0, connected=False, readings=25),
        clock={"trusted": False},
        buffer={"oldest_age_s": None},
        uploader={"last_success": None},
    )
    m = scrape(server)
    assert value(m, "source_connected", source="weather") == 0
    assert value(m, "source_readings_total", source="weather") == 25
    assert value(m, "clock_trusted") == 0
    assert value(m, "healthy") == 0
    assert value(m, "buffer_oldest_pending_age_seconds") == 0
    assert value(m, "upload_last_success_timestamp_seconds") == 0


def test_the_uplink_state_is_in_metrics_on_the_page_and_in_the_terminal(
    server: StatusServer, state: State
) -> None:
    summary = "down since 2027-01-15 08:00:00 UTC, next probe in 7.0 s"
    uplink = UplinkView(
        state="down", since=NOW - 120, next_probe_in_s=7.0, backing_off_until=None, summary=summary
    )
    state.snap = changed(state.snap, uploader={"uplink": uplink})
    m = scrape(server)
    assert value(m, "uplink_state", state="down") == 1
    assert value(m, "uplink_state", state="up") == 0
    assert value(m, "uplink_state", state="refusing") == 0
    assert summary in get(server, "/").text
    assert get(server, "/status.json").json()["uploader"]["uplink"]["summary"] == summary
    text = render_status_text(status_document(state.snap, 60.0), NOW)
    assert f"  uplink: {summary}" in text.splitlines()


def test_label_values_are_escaped(server: StatusServer, state: State) -> None:
    awkward = 'ds "quoted" back\\slash\nnewline'
    state.snap = changed(
        state.snap,
        buffer={"pending": {awkward: 7}, "counters": {f"dropped.unparseable.{awkward}": 2}},
    )
    raw = get(server, "/metrics").text
    assert 'datasource="ds \\"quoted\\" back\\\\slash\\nnewline"' in raw
    m = scrape(server)
    assert value(m, "buffer_pending_readings", datasource=awkward) == 7
    assert value(m, "source_dropped_total", reason="unparseable", source=awkward) == 2


def test_every_drop_is_labelled_by_what_it_counts_per(server: StatusServer, state: State) -> None:
    """The buffer counts drops per data source id, sources per source name: one label each."""
    counters = {
        "dropped.buffer_full.67890": 1,
        "dropped.max_age.67890": 2,
        "dropped.write_failed.67891": 3,
        "dropped.by_operator.67892": 4,
        "dropped.unparseable.weather": 5,
        "dropped.oversize.plant": 6,
    }
    state.snap = changed(state.snap, buffer={"counters": counters})
    m = scrape(server)
    for reason, ds, n in [
        ("buffer_full", "67890", 1),
        ("max_age", "67890", 2),
        ("write_failed", "67891", 3),
        ("by_operator", "67892", 4),
    ]:
        assert value(m, "dropped_readings_total", reason=reason, datasource=ds) == n
    assert value(m, "source_dropped_total", reason="unparseable", source="weather") == 5
    assert value(m, "source_dropped_total", reason="oversize", source="plant") == 6
    labels = {frozenset(k for k, _ in key[1]) for key in m if "dropped" in key[0]}
    assert labels == {frozenset({"reason", "datasource"}), frozenset({"reason", "source"})}
    by_family = {key[0]: {k for k, _ in key[1]} for key in m if "dropped" in key[0]}
    assert "source" not in by_family["edge_agent_dropped_readings_total"]
    assert "datasource" not in by_family["edge_agent_source_dropped_total"]


def test_process_metrics_describe_the_serving_process(server: StatusServer) -> None:
    """The server runs in this process: check /proc's figures against the standard library."""
    import resource

    cpu_before = time.process_time()
    m = scrape(server)
    cpu_after = time.process_time()

    def metric(name: str) -> float:
        return m[(name, frozenset())]

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 1_000_000 < metric("process_resident_memory_bytes") <= peak_rss
    assert metric("process_virtual_memory_bytes") >= metric("process_resident_memory_bytes")
    # /proc counts whole clock ticks: allow one tick either side.
    assert cpu_before - 0.02 <= metric("process_cpu_seconds_total") <= cpu_after + 0.02
    assert metric("process_open_fds") >= 3
    assert metric("process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    started = metric("process_start_time_seconds")
    assert NOW - 86_400 < started <= NOW + 1  # before this module was imported


def test_the_banner_says_failing_uploads_under_the_limit_not_all_is_well(
    state: State,
) -> None:
    state.snap = changed(
        state.snap,
        uploader={"failing_for_s": 17.0, "last_success": None, "last_error": "timed out"},
    )
    doc = status_document(state.snap, 300.0)
    assert doc.health.healthy is True
    page = render_page(doc, [], NOW)
    assert "Healthy so far: uploads failing for 17 s, unhealthy after 5 min" in page
    assert "uploads go through" not in page
    assert 'class="banner warn"' in page
    text = render_status_text(doc, NOW)
    assert "health: Healthy so far: uploads failing for 17 s, unhealthy after 5 min" in text
    line = render_status_line(doc, NOW)
    assert line.startswith("Healthy so far: uploads failing for 17 s")
    assert "15 readings waiting, oldest 2.5 s" in line and "no upload yet" in line


def test_the_banner_of_a_healthy_agent_says_what_it_knows(state: State) -> None:
    doc = status_document(state.snap, 300.0)
    page = render_page(doc, [], NOW)
    assert "Healthy: 2 sources connected, last upload 5.0 s ago" in page
    assert render_status_line(doc, NOW) == (
        "Healthy; 15 readings waiting, oldest 2.5 s; last upload 5.0 s ago"
    )
    state.snap = changed(state.snap, uploader={"last_success": None})
    assert "Healthy: 2 sources connected, no upload yet" in render_page(
        status_document(state.snap, 300.0), [], NOW
    )
    state.snap = changed(state.snap, uploader={"failing_for_s": 301.0})
    line = render_status_line(status_document(state.snap, 300.0), NOW)
    assert line.startswith("Unhealthy: uploads have been failing for 5 min")


# -- the page ----------------------------------------------------------------------------


def test_page_shows_sources_buffer_uploads_and_charts(server: StatusServer, state: State) -> None:
    wait_until(lambda: len(server.history) >= 3, 5, "three history samples")
    page = get(server, "/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    text = page.text
    assert '<meta http-equiv="refresh" content="10">' in text
    assert "<script" not in text and "http://" not in text.replace(
        "http://www.w3.org/2000/svg", ""
    )  # nothing to fetch: the gateway may be offline
    for fact in ("gw-001", "weather", "tank-level", "Healthy", "503 Service Unavailable"):
        assert fact in text
    assert text.count("<svg") == 2
    assert "<polyline" in text
    assert "Buffered readings" in text and "Upload rate" in text


def test_page_draws_empty_charts_before_any_sample(state: State) -> None:
    # An interval longer than the test: only the sample taken at start, so no rate yet.
    srv = StatusServer("127.0.0.1:0", lambda: state.snap, history=History(interval_s=3600.0))
    srv.start()
    try:
        text = get(srv, "/").text
    finally:
        srv.stop()
    assert text.count("<svg") == 2
    assert "no data yet" in text  # the rate needs two samples
    assert "one sample so far" in text
    empty = render_page(Status(state.snap, Health(True, (), ())), [], NOW)
    assert empty.count("no data yet") == 2
    assert "<polyline" not in empty


def test_page_escapes_text_from_devices_and_servers(server: StatusServer, state: State) -> None:
    state.snap = with_source(state.snap, 0, connected=False, last_error="<script>alert(1)</script>")
    state.snap = changed(state.snap, uploader={"last_error": '503 <b>"down"</b>'})
    text = get(server, "/").text
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;&quot;down&quot;&lt;/b&gt;" in text
    assert "Unhealthy" in text


# -- failures ----------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def status_log() -> Iterator[_Records]:
    # A handler of our own: the cli tests may have turned off propagation to the root logger.
    handler = _Records()
    logger = logging.getLogger("edge_agent.status")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_a_failing_snapshot_answers_500_and_is_logged_once(status_log: _Records) -> None:
    broken = {"now": True}

    def snapshot() -> Snapshot:
        if broken["now"]:
            raise RuntimeError("database is locked")
        return make_snapshot()

    srv = StatusServer("127.0.0.1:0", snapshot, history=History(interval_s=0.05))
    srv.start()
    try:
        for path in ("/", "/healthz", "/metrics", "/status.json"):
            response = get(srv, path)
            assert response.status_code == 500
            assert "RuntimeError: database is locked" in response.text
        time.sleep(0.2)  # the sampler fails a few more times meanwhile
        errors = [r for r in status_log.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert errors[0].exc_info is not None
        broken["now"] = False
        assert get(srv, "/healthz").status_code == 200
    finally:
        srv.stop()
    assert any("again" in r.getMessage() for r in status_log.records)


@pytest.mark.parametrize(
    "listen",
    ["9108", "localhost", "127.0.0.1:", ":9108", "127.0.0.1:http", "127.0.0.1:99999", "[::1"],
)
def test_bad_listen_values_are_refused_clearly(listen: str) -> None:
    with pytest.raises(ValueError, match="status listen address") as info:
        StatusServer(listen, make_snapshot)
    assert repr(listen) in str(info.value)


def test_listen_values() -> None:
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    assert parse_listen("gateway.local:80") == ("gateway.local", 80)


def test_an_address_in_use_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = StatusServer(f"127.0.0.1:{port}", make_snapshot)
        with pytest.raises(EdgeAgentError, match=f"127.0.0.1:{port}: the address is already in"):
            srv.start()


def test_a_server_starts_once(server: StatusServer) -> None:
    with pytest.raises(RuntimeError, match="running"):
        server.start()
    server.stop()
    server.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        server.start()


# -- history -----------------------------------------------------------------------------


def uploaded(n: int, pending: int = 0) -> Snapshot:
    return changed(
        make_snapshot(), buffer={"pending_total": pending}, uploader={"records_uploaded": n}
    )


def test_history_computes_the_upload_rate_between_samples() -> None:
    history = History(interval_s=10)
    assert history.sample(uploaded(0, pending=40), 100.0).rate is None
    assert history.sample(uploaded(50, pending=20), 110.0).rate == 5.0
    assert history.sample(uploaded(50, pending=20), 120.0).rate == 0.0
    # The uploader restarted from zero: its new count is what it uploaded since.
    assert history.sample(uploaded(30), 130.0).rate == 3.0
    assert [s.pending for s in history.samples()] == [40, 20, 20, 0]


def test_history_keeps_one_hour() -> None:
    history = History()  # every 10 s over 3600 s
    for i in range(500):
        history.sample(uploaded(i * 10), 1000.0 + i * 10)
    samples = history.samples()
    assert len(samples) == 360
    assert samples[-1].t == 1000.0 + 499 * 10
    assert samples[-1].t - samples[0].t < 3600
    assert all(s.rate == 1.0 for s in samples)
    # After a pause longer than the window (the sampler was stuck), old samples go too.
    history.sample(uploaded(5000), 1000.0 + 499 * 10 + 4000)
    assert len(history) == 1


def test_history_refuses_a_nonsense_interval() -> None:
    with pytest.raises(ValueError):
        History(interval_s=0)


# -- terminal and client -----------------------------------------------------------------


def test_status_text_for_the_terminal() -> None:
    snap = make_snapshot()
    snap = with_source(snap, 0, connected=False, last_error="port disappeared")
    snap = changed(snap, uploader={"paused": {"*": "token rejected (401)"}})
    healthy, reasons = health(snap, 60.0)
    text = render_status_text(Status(snap, Health(healthy, tuple(reasons), ())), NOW)
    lines = text.splitlines()
    assert lines[0].startswith("edge-agent 0.1.0 on gw-001, up 1 h 6 min")
    assert "health: UNHEALTHY" in lines
    assert "  - serial source weather is not connected: port disappeared" in lines
    assert any(
        line.startswith("  weather (serial): NOT CONNECTED, 20 readings, 1 parse error")
        and line.endswith("last error: port disappeared")
        for line in lines
    )
    assert any(line.startswith("  tank-level (mqtt): connected, 7 readings") for line in lines)
    assert any(line.startswith("buffer: 15 readings waiting") for line in lines)
    assert "  dropped: buffer_full 67890 3, unparseable weather 1" in lines
    assert any(
        line.startswith("uploads: 100 records, requests 200:5 503:1 error:2") for line in lines
    )
    assert "  paused for every data source: token rejected (401)" in lines
    assert "clock: synced (trusted)" in lines


def test_fetch_status_reads_a_running_agent(server: StatusServer) -> None:
    doc = fetch_status(server.url)
    assert doc is not None
    assert doc.to_json()["agent"]["device_id"] == "gw-001"
    assert doc.to_json()["health"] == {"healthy": True, "reasons": [], "concerns": []}
    assert render_status_text(doc).startswith("edge-agent 0.1.0 on gw-001")


def test_fetch_status_is_none_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert fetch_status(f"127.0.0.1:{port}", timeout=1.0) is None


def test_status_json_url_accepts_listen_addresses_and_urls() -> None:
    assert status_json_url("0.0.0.0:9108") == "http://127.0.0.1:9108/status.json"
    assert status_json_url("http://gw:9108/") == "http://gw:9108/status.json"
    assert status_json_url("http://gw:9108/status.json") == "http://gw:9108/status.json"


# -- the page in a real browser ----------------------------------------------------------


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("EDGE_AGENT_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed and EDGE_AGENT_REQUIRE_BROWSER=1")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return binary


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_page_renders_in_a_browser(tmp_path: Path, state: State) -> None:
    binary = _chromium()
    # An hour of history: the uplink went down for 15 min, the buffer filled, then drained.
    history = History()
    start = time.monotonic() - 3600
    pending, total = 40, 0
    for i in range(360):
        if 150 <= i < 240:
            pending += 30
        else:
            sent = min(30 + max(0, pending - 40), 120)
            pending, total = pending - sent + 30, total + sent
        history.sample(uploaded(total, pending), start + i * 10)
    state.snap = changed(
        with_source(state.snap, 1, connected=False, last_error="broker refused: <not authorised>"),
        buffer={"pending_total": pending},
        uploader={
            "records_uploaded": total,
            "failing_for_s": 400.0,
            "last_error": "503 Service Unavailable",
        },
    )
    srv = StatusServer("127.0.0.1:0", lambda: state.snap, 60.0, history)
    srv.start()
    try:
        shot = tmp_path / "status-page.png"
        run = _run_chromium(
            binary,
            tmp_path / "profile",
            f"--screenshot={shot}",
            "--window-size=1000,1400",
            srv.url,
        )
        assert shot.exists(), f"no screenshot: {run.stderr[-2000:]}"
        dom = _run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", srv.url)
    finally:
        srv.stop()
    assert shot.stat().st_size > 5_000
    print(f"status page screenshot: {shot}")
    artifacts = os.environ.get("EDGE_AGENT_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for fact in ("weather", "tank-level", "gw-001", "&lt;not authorised&gt;"):
        assert fact in dom.stdout
    assert "<svg" in dom.stdout and "<polyline" in dom.stdout


# -- the document as JSON, both ways -----------------------------------------------------


def test_the_status_document_reads_back_as_it_was_written() -> None:
    uplink = UplinkView("up", None, None, None, "up")
    snap = changed(make_snapshot(), uploader={"uplink": uplink}, agent={"buffer": "/b.db"})
    doc = status_document(with_source(snap, 1, last_data=None), 60.0)
    wire = json.loads(json.dumps(doc.to_json()))
    assert Status.from_json(wire) == doc


def test_a_value_of_the_wrong_type_is_refused_naming_where_it_is() -> None:
    wire = status_document(make_snapshot(), 60.0).to_json()
    wire["uploader"]["retries"] = "3"
    with pytest.raises(SnapshotFormatError, match=r"Snapshot\.uploader\.retries is str, not an"):
        Status.from_json(wire)
    wire["uploader"]["retries"] = 3
    wire["sources"][1]["connected"] = None
    with pytest.raises(SnapshotFormatError, match=r"Snapshot\.sources\[1\]\.connected is null"):
        Status.from_json(wire)


def test_an_older_agents_document_reads_with_what_it_did_not_say_empty() -> None:
    wire = status_document(make_snapshot(), 60.0).to_json()
    del wire["agent"]["buffer"], wire["uploader"]["suspects"], wire["health"]["concerns"]
    doc = Status.from_json(wire)
    assert doc.snapshot.agent.buffer is None
    assert doc.snapshot.uploader.suspects == 0
    assert doc.health.concerns == ()


# A part of the test's own, not a real one: Snapshot already has `budget` and `drain`.
@dataclass(frozen=True)
class _Quota(Part):
    used: int
    limit: int


@dataclass(frozen=True)
class _WithQuota(Snapshot):
    quota: _Quota | None = field(default=None, metadata=OPTIONAL)


def test_an_optional_part_is_left_out_of_the_json_until_it_is_set() -> None:
    plain = _WithQuota(**{f: getattr(make_snapshot(), f) for f in Snapshot.__dataclass_fields__})
    assert "quota" not in plain.to_json()
    assert _WithQuota.from_json(plain.to_json()) == plain
    with_quota = replace(plain, quota=_Quota(used=10, limit=100))
    assert with_quota.to_json()["quota"] == {"used": 10, "limit": 100}
    assert _WithQuota.from_json(with_quota.to_json()) == with_quota


def test_backlog_and_byte_budget_show_on_the_page_metrics_terminal_and_json(
    server: StatusServer, state: State
) -> None:
    drain = DrainPart("live_first", 60.0, 12_000, 3 * 3600.0 + 120, 50.0, 240.0)
    budget = BudgetPart(500_000_000, 3_250_000, 496_750_000, "2026-12-03", 5 * 3600.0, True, False)
    state.snap = replace(state.snap, drain=drain, budget=budget)
    m = scrape(server)
    assert value(m, "backlog_readings") == 12_000
    assert value(m, "backlog_oldest_age_seconds") == 3 * 3600.0 + 120
    assert value(m, "backlog_drain_seconds") == 240.0
    assert value(m, "uplink_bytes_today") == 3_250_000
    assert value(m, "uplink_bytes_per_day_limit") == 500_000_000
    assert value(m, "uplink_budget_waiting") == 1
    page = get(server, "/").text
    assert "12,000 readings older than 60 s, oldest 3 h 2 min" in page
    assert "about 4 min to drain at 50/s (live first)" in page
    assert "3.1 MiB of 476.8 MiB used today (UTC)" in page
    text = render_status_text(status_document(state.snap, 300.0), NOW)
    assert "  backlog: 12,000 readings older than 60 s" in text
    assert "  byte budget: 3.1 MiB of 476.8 MiB used today (UTC); the backlog waits" in text
    doc = get(server, "/status.json").json()
    assert doc["drain"]["backlog_readings"] == 12_000 and doc["budget"]["limit"] == 500_000_000
    assert Status.from_json(doc).snapshot.drain == drain


def test_a_budget_without_limit_and_no_backlog_read_plainly() -> None:
    drain = DrainPart("oldest_first", 60.0, 0, None, None, 0.0)
    budget = BudgetPart(None, 2048, None, "2026-12-03", 60.0, False, False)
    snap = replace(make_snapshot(), drain=drain, budget=budget)
    text = render_status_text(status_document(snap, 300.0), NOW)
    assert "  backlog: none (oldest first)" in text
    assert "  byte budget: no limit; 2.0 KiB sent today (UTC)" in text
    spent = replace(snap, budget=replace(budget, limit=4096, used=4096, remaining=0, spent=True))
    text = render_status_text(status_document(spent, 300.0), NOW)
    assert "4.0 KiB of 4.0 KiB used today (UTC); SPENT: readings wait; resets in 60 s" in text
