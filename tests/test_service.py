"""`edge-agent run` the way systemd runs it: sd_notify, reloads under load, the status endpoint.

Real agent processes read a real pty sensor and upload to the sandbox. The watchdog's choice of
what counts as wedged is tested in-process on a real Service: an uploader only stalls after
45 s or more, too slow for a process test, and nothing outside the process can kill the buffer
writer without test-aware code in the agent.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent import lock
from edge_agent.config import load_config
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.service import Service
from edge_agent.simulator import PtySensor, kv_line
from edge_agent.status import StatusServer
from edge_agent.testing.harness import free_port, run_cli
from tests.helpers import DATASOURCE, AgentProcess, serial_source, wait_until, write_config
from tests.test_status import _chromium, _run_chromium, changed, make_snapshot

# systemd's WatchdogSec=2: the agent must ping at least every 2 s, and aims for every 1 s.
WATCHDOG_USEC = 2_000_000


class NotifySocket:
    """The receiving end of NOTIFY_SOCKET, bound the way systemd binds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, list[str]]] = []  # (monotonic time, fields)

    def receive(self, timeout: float) -> list[str] | None:
        self.sock.settimeout(max(0.01, timeout))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = data.decode().split("\n")
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, field: str, timeout: float = 15.0) -> list[list[str]]:
        """Messages received until one holding `field` (that one last)."""
        deadline = time.monotonic() + timeout
        seen: list[list[str]] = []
        while (remaining := deadline - time.monotonic()) > 0:
            fields = self.receive(remaining)
            if fields is None:
                break
            seen.append(fields)
            if field in fields:
                return seen
        raise AssertionError(f"no {field} within {timeout} s; got {seen}")

    def collect(self, seconds: float) -> list[tuple[float, list[str]]]:
        end = time.monotonic() + seconds
        start = len(self.messages)
        while (remaining := end - time.monotonic()) > 0:
            self.receive(remaining)
        return self.messages[start:]

    def close(self) -> None:
        self.sock.close()


def received_seqs(sandbox: Sandbox) -> set[int]:
    return {int(r["seq"]) for r in sandbox.records(DATASOURCE) if "seq" in r}


def with_status(config: Path, port: int) -> Path:
    """Turn the [status] endpoint on at `port` (write_config turns it off)."""
    text = config.read_text()
    assert 'listen = "off"' in text
    config.write_text(text.replace('listen = "off"', f'listen = "127.0.0.1:{port}"'))
    return config


def agent_config(tmp_path: Path, sandbox: Sandbox, sensor: PtySensor, **kw: Any) -> Path:
    source = kw.pop("source", {})
    return write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=tmp_path / "data",
        sources=[serial_source(sensor.link, reopen_backoff_max_s=1.0, **source)],
        **kw,
    )


# -- sd_notify ---------------------------------------------------------------------------


def test_systemd_hears_ready_watchdog_reload_and_stopping(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    systemd = NotifySocket(tmp_path / "notify")
    try:
        config = agent_config(tmp_path, sandbox, pty_sensor)
        env = {
            "NOTIFY_SOCKET": str(systemd.path),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": "",  # the agent's pid is not known before it starts: any is ours
        }
        agent = AgentProcess(config, tmp_path / "agent.log", env=env).start()
        agents.append(agent)
        started = systemd.wait_for("READY=1")
        assert all("WATCHDOG=1" not in m for m in started), "no ping before READY=1"
        assert "agent: started" in agent.log_text(), "READY=1 comes after start-up"
        status = [f for _, m in systemd.collect(1.0) for f in m if f.startswith("STATUS=")]
        assert status[:1] == ["STATUS=Healthy; 0 readings waiting; no upload yet"], status

        pings = [t for t, fields in systemd.collect(4.5) if fields == ["WATCHDOG=1"]]
        assert len(pings) >= 3, f"pings every second expected, got {len(pings)} in 4.5 s"
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < WATCHDOG_USEC / 1e6, f"a gap this long gets us killed: {gaps}"

        agent.signal(signal.SIGHUP)
        reloading = systemd.wait_for("RELOADING=1")[-1]
        assert any(f.startswith("MONOTONIC_USEC=") for f in reloading), reloading
        systemd.wait_for("READY=1", 5.0)
        agent.wait_log("configuration reloaded")
        systemd.wait_for("WATCHDOG=1", 3.0)  # pings go on after the reload

        agent.signal(signal.SIGTERM)
        systemd.wait_for("STOPPING=1", 10.0)
        assert agent.terminate() == 0
    finally:
        systemd.close()


def test_systemctl_status_shows_what_waits_and_the_last_upload(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    """The STATUS= line is refreshed from the agent's facts, not a fixed "running"."""
    systemd = NotifySocket(tmp_path / "notify")
    try:
        sandbox.set_faults(Faults(status=503))
        config = agent_config(tmp_path, sandbox, pty_sensor)
        agent = AgentProcess(
            config, tmp_path / "agent.log", env={"NOTIFY_SOCKET": str(systemd.path)}
        )
        agents.append(agent.start())
        systemd.wait_for("READY=1")
        pty_sensor.start()
        failing = wait_status(systemd, "Healthy so far: uploads failing for", 30.0)
        assert "readings waiting, oldest" in failing and "no upload yet" in failing, failing
        sandbox.set_faults(Faults())
        done = wait_status(systemd, "last upload", 30.0)
        assert done.startswith("STATUS=Healthy; "), done
        assert agent.terminate() == 0
    finally:
        systemd.close()


def wait_status(systemd: NotifySocket, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        for field in systemd.receive(remaining) or []:
            if field.startswith("STATUS=") and text in field:
                return field
    raise AssertionError(f"no STATUS= line with {text!r} within {timeout} s")


class WarningLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_watchdog_pings_stop_when_the_uploader_a_source_or_the_buffer_writer_stalls(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    systemd = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    service = Service(load_config(agent_config(tmp_path, sandbox, pty_sensor)))
    agent = service.agent
    agent.start()
    warnings = WarningLines()
    logging.getLogger("edge_agent.systemd").addHandler(warnings)
    try:

        def pinged(now: float) -> bool:
            sent = service.watchdog.tick(now)
            assert (systemd.receive(0.5) == ["WATCHDOG=1"]) is sent, "tick says what it sent"
            return sent

        now = time.monotonic()
        assert pinged(now), "a healthy agent pings"
        # A stopped thread beats no more; its last beat is made old enough to count as stalled.
        long_ago = time.monotonic() - 3600
        agent.uploader.stop()
        agent.uploader.heartbeat = long_ago
        assert not pinged(now + 1.0)
        assert "not pinging the watchdog: uploader stopped making progress" in warnings.lines[-1]
        agent.uploader.heartbeat = time.monotonic()
        assert pinged(now + 1.1), "pings resume as soon as the component beats again"

        source = agent.sources["weather"]
        source.stop()
        source.heartbeat = long_ago
        assert not pinged(now + 2.2)
        assert "not pinging the watchdog: source weather stopped" in warnings.lines[-1]
        source.heartbeat = time.monotonic()
        assert pinged(now + 2.3)

        agent.buffer.close()  # the writer thread ends, as if it had died
        assert not agent.buffer.alive
        assert not pinged(now + 3.4)
        assert "not pinging the watchdog: buffer writer stopped" in warnings.lines[-1]
        assert agent.check_health() is not None, "the main loop then stops the agent"
    finally:
        logging.getLogger("edge_agent.systemd").removeHandler(warnings)
        agent.stop()
        systemd.close()


# -- reload ------------------------------------------------------------------------------


def flowing_agent(
    tmp_path: Path, sandbox: Sandbox, sensor: PtySensor, agents: list[AgentProcess]
) -> AgentProcess:
    """An agent reading `sensor`, which writes ~50 lines/s once the port is open."""
    agent = AgentProcess(agent_config(tmp_path, sandbox, sensor), tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("serial weather: reading")
    sensor.start()  # after the open: opening a port discards what waits in it
    wait_until(lambda: len(received_seqs(sandbox)) >= 50, what="the first readings")
    return agent


def assert_every_line_arrives(sensor: PtySensor, sandbox: Sandbox) -> None:
    sensor.stop()
    last = sensor.written - 1
    # One data source goes out oldest first: once the last line is in, all before it are.
    wait_until(lambda: last in received_seqs(sandbox), what=f"the last line, seq {last}")
    missing = sorted(set(range(sensor.written)) - received_seqs(sandbox))
    assert not missing, f"{len(missing)} of {sensor.written} lines lost: {missing[:20]}"


def reloads(agent: AgentProcess) -> int:
    return agent.log_text().count("agent: configuration reloaded")


def test_reload_while_readings_flow_loses_nothing(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    agent = flowing_agent(tmp_path, sandbox, pty_sensor, agents)

    # An endpoint change: the uploader takes it, the source keeps reading.
    agent_config(tmp_path, sandbox, pty_sensor, endpoint={"flush_interval_s": 0.5})
    agent.signal(signal.SIGHUP)
    wait_until(lambda: reloads(agent) == 1, what="configuration reloaded")
    assert "stopped for the reload" not in agent.log_text()

    # A bad file is refused; the agent keeps running the previous configuration.
    agent_config(tmp_path, sandbox, pty_sensor, agent={"no_such_key": 1})
    agent.signal(signal.SIGHUP)
    agent.wait_log("reload rejected")
    assert "unknown key 'no_such_key'" in agent.log_text()
    before = len(received_seqs(sandbox))
    wait_until(lambda: len(received_seqs(sandbox)) >= before + 50, what="readings after it")
    assert agent.proc is not None and agent.proc.poll() is None

    # A new token: the server refuses the old one once, then the file is read again.
    sandbox.set_tokens(["token-2"])
    wait_until(lambda: sandbox.stats()["by_status"].get("401"), what="a 401")
    (tmp_path / "token").write_text("token-2\n")
    agent.wait_log("uploader: the token changed; retrying now")
    before = len(received_seqs(sandbox))
    wait_until(lambda: len(received_seqs(sandbox)) >= before + 50, what="uploads with it")

    assert_every_line_arrives(pty_sensor, sandbox)
    assert sandbox.stats()["by_status"]["401"] == 1, "the next request carried the new token"
    assert agent.terminate() == 0


def test_reload_that_changes_a_serial_source_keeps_its_port_and_loses_nothing(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    agent = flowing_agent(tmp_path, sandbox, pty_sensor, agents)
    agent_config(tmp_path, sandbox, pty_sensor, source={"tags": {"site": "north"}})
    agent.signal(signal.SIGHUP)
    wait_until(lambda: reloads(agent) == 1, what="configuration reloaded")
    # Reopening the port would flush what waits in it (pyserial), losing a line in transit.
    assert "agent: source weather updated in place" in agent.log_text()
    wait_until(
        lambda: any(r.get("site") == "north" for r in sandbox.records(DATASOURCE)),
        what="records with the new tag",
    )
    assert_every_line_arrives(pty_sensor, sandbox)
    assert agent.terminate() == 0


# -- the status endpoint -----------------------------------------------------------------


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(base + "metrics", timeout=5, trust_env=False).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def healthz(base: str) -> httpx.Response:
    return httpx.get(base + "healthz", timeout=5, trust_env=False)


def edge_agent_status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("status", "--config", str(config), *args, timeout=30)


def write_lines(sensor: PtySensor, start: int, count: int) -> int:
    for seq in range(start, start + count):
        assert sensor.write_line(kv_line(seq, time.time()))
        time.sleep(0.002)
    return start + count


def test_metrics_health_and_the_status_command(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    config = with_status(agent_config(tmp_path, sandbox, pty_sensor), port)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("serial weather: reading")
    agent.wait_log("status page on")

    written = write_lines(pty_sensor, 0, 120)
    wait_until(lambda: sandbox.stats()["records"] == written, what="every line delivered")
    wait_until(
        lambda: metric(scrape(base), "edge_agent_uploaded_records_total") == written,
        what="the upload counted",
    )
    metrics, stats = scrape(base), sandbox.stats()
    assert metric(metrics, "edge_agent_uploaded_records_total") == stats["records"]
    assert metric(metrics, "edge_agent_source_lines_total", source="weather") == written
    assert metric(metrics, "edge_agent_source_readings_total", source="weather") == written
    assert (
        metric(metrics, "edge_agent_upload_requests_total", status="200")
        == stats["by_status"]["200"]
    )
    assert metric(metrics, "edge_agent_source_connected", source="weather") == 1
    assert metric(metrics, "edge_agent_healthy") == 1
    assert healthz(base).status_code == 200

    # Unplugged: unhealthy, naming the source.
    pty_sensor.unplug()
    wait_until(lambda: healthz(base).status_code == 503, what="/healthz 503")
    reasons = healthz(base).json()["reasons"]
    assert any("serial source weather is not connected" in r for r in reasons), reasons
    status = edge_agent_status(config)
    assert status.returncode == 1, status.stdout + status.stderr
    assert "health: UNHEALTHY" in status.stdout
    assert "serial source weather is not connected" in status.stdout
    as_json = edge_agent_status(config, "--json")
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)
    assert doc["health"]["healthy"] is False
    assert [s["connected"] for s in doc["sources"]] == [False]

    # Plugged back in: healthy again.
    pty_sensor.plug()
    wait_until(lambda: healthz(base).status_code == 200, what="/healthz 200 again")
    status = edge_agent_status(config)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "health: Healthy: 1 source connected" in status.stdout
    assert metric(scrape(base), "edge_agent_source_reconnects_total", source="weather") >= 1

    # Stopped with readings waiting: not running (3), but the buffer still shows.
    sandbox.set_faults(Faults(status=503))
    write_lines(pty_sensor, written, 25)
    wait_until(
        lambda: (
            metric(scrape(base), "edge_agent_buffer_pending_readings", datasource=DATASOURCE) == 25
        ),
        what="25 readings waiting",
    )
    # The uplink's bytes today and the backlog: the 25 are younger than live_window_s.
    metrics = scrape(base)
    assert metric(metrics, "edge_agent_uplink_bytes_today") >= sandbox.stats()["wire_bytes"] > 0
    assert metric(metrics, "edge_agent_backlog_readings") == 0
    doc = httpx.get(base + "status.json", timeout=5, trust_env=False).json()
    assert doc["drain"]["mode"] == "live_first" and doc["budget"]["limit"] is None
    assert agent.terminate() == 0
    status = edge_agent_status(config)
    assert status.returncode == 3, status.stdout + status.stderr
    assert "25 readings waiting" in status.stdout
    assert "the agent is not running (no process holds its buffer)" in status.stdout
    doc = json.loads(edge_agent_status(config, "--json").stdout)
    assert doc["buffer"]["pending_total"] == 25


def test_status_tells_an_agent_with_its_endpoint_off_from_one_not_running(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    config = agent_config(tmp_path, sandbox, pty_sensor)  # [status] listen = "off"
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("agent: started")
    running = edge_agent_status(config)
    assert running.returncode == 4, running.stdout + running.stderr
    assert agent.proc is not None
    assert f"the agent runs (PID {agent.proc.pid}" in running.stdout
    assert 'its status endpoint is off ([status] listen = "off")' in running.stdout
    assert "health: unknown" in running.stdout
    assert agent.terminate() == 0
    stopped = edge_agent_status(config)
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert "the agent is not running (no process holds its buffer)" in stopped.stdout


def test_the_default_status_port_taken_leaves_the_agent_running_without_its_page(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    """127.0.0.1:9108 is one port for every agent on a host: taken, it costs only the page."""
    holder = socket.socket()
    with contextlib.suppress(OSError):  # already taken by someone else: as good
        holder.bind(("127.0.0.1", 9108))
        holder.listen()
    try:
        config = agent_config(tmp_path, sandbox, pty_sensor)
        text = config.read_text()
        config.write_text(text.replace('listen = "off"', "unhealthy_after_s = 300.0"))
        agent = AgentProcess(config, tmp_path / "agent.log").start()
        agents.append(agent)
        agent.wait_log("running without the status page")
        agent.wait_log("agent: started")
        assert "status page: cannot listen on 127.0.0.1:9108" in agent.log_text()
        pty_sensor.start()
        wait_until(lambda: sandbox.stats()["records"] >= 5, what="readings uploaded anyway")
        assert agent.terminate() == 0
    finally:
        holder.close()


def test_status_does_not_take_another_agents_answer_for_its_own(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    """Another agent on the (default) port answers: its health is not this one's."""
    other = changed(make_snapshot(), agent={"buffer": "/var/lib/another-agent/buffer.db"})
    server = StatusServer("127.0.0.1:0", lambda: other).start()
    try:
        config = with_status(agent_config(tmp_path, sandbox, pty_sensor), server.port)
        proc = edge_agent_status(config)
    finally:
        server.stop()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"the agent answering on 127.0.0.1:{server.port} runs " in proc.stdout
    assert "not this configuration" in proc.stdout


class ForeignServer:
    """Another program on the status port: answers every GET with one fixed answer."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        answer = (status, content_type, body)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, kind, data = answer
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


FOREIGN_ANSWERS = {
    # JSON that says "healthy" the way other tools do: not the agent's health.
    "healthy-json": (200, "application/json", b'{"health": {"healthy": true}, "status": "ok"}'),
    "odd-json": (200, "application/json", b'{"agent": "grafana-agent", "health": "ok"}'),
    "json-list": (200, "application/json", b"[1, 2, 3]"),
    "html-page": (200, "text/html", b"<!DOCTYPE html><html><body>Router login</body></html>"),
    "not-found": (404, "text/html", b"<html><body>404 Not Found</body></html>"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_ANSWERS))
def test_status_says_when_another_program_answers_on_the_status_port(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, kind: str
) -> None:
    foreign = ForeignServer(*FOREIGN_ANSWERS[kind])
    try:
        config = with_status(agent_config(tmp_path, sandbox, pty_sensor), foreign.port)
        proc = edge_agent_status(config)
        as_json = edge_agent_status(config, "--json")
    finally:
        foreign.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "Traceback" not in out and "health: ok" not in out
    assert f"another program answers on http://127.0.0.1:{foreign.port}/status.json" in out
    assert "it is not the agent's status endpoint" in out
    assert "the agent is not running" in out and "set [status] listen to a free port" in out
    doc = json.loads(as_json.stdout)
    assert as_json.returncode == 3 and doc["health"]["healthy"] is False


def test_status_of_a_running_agent_whose_port_another_program_holds_exits_4(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    """An agent on the default port runs on without its page when the port is taken (see
    above); this process holds the buffer's lock as that agent would."""
    foreign = ForeignServer(*FOREIGN_ANSWERS["healthy-json"])
    config = with_status(agent_config(tmp_path, sandbox, pty_sensor), foreign.port)
    owner = lock.hold(load_config(config, secrets=False).buffer_path, "run", create=True)
    try:
        proc = edge_agent_status(config)
    finally:
        owner.release()
        foreign.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out
    assert f"the agent runs (PID {os.getpid()}), but another program holds" in out
    assert "it is not the agent's status endpoint" in out and "Traceback" not in out
    assert "health: ok" not in out


def test_the_running_agents_page_in_a_browser(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    binary = _chromium()
    port = free_port()
    config = with_status(agent_config(tmp_path, sandbox, pty_sensor), port)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("status page on")
    pty_sensor.start()
    wait_until(lambda: sandbox.stats()["records"] >= 20, what="readings uploaded")
    url = f"http://127.0.0.1:{port}/"
    shot = tmp_path / "status-page-running-agent.png"
    run = _run_chromium(
        binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1000,1400", url
    )
    assert shot.exists(), f"no screenshot: {run.stderr[-2000:]}"
    dom = _run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert agent.terminate() == 0
    artifacts = os.environ.get("EDGE_AGENT_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    assert shot.stat().st_size > 5_000
    assert dom.returncode == 0, dom.stderr[-2000:]
    for fact in ("Edge agent gw-test", "weather", "Healthy", "<svg"):
        assert fact in dom.stdout, fact
