"""The agent against the sandbox over real HTTP, with the sandbox's faults switched on.

The agent runs in-process (`edge_agent.agent.Agent`, with a serial source on an idle pty) and
readings go in through `AgentIntake.put`, each with a unique `seq` and, from
`record_id_field`, a `reading_id`. What the sandbox stored, what the buffer still holds and
what went to dead letters are then compared with what was put. Time is only asserted as a
lower bound, for Retry-After.

EDGE_AGENT_CHAOS_SECONDS sets the length of the chaos run (default 15 s) and
EDGE_AGENT_CHAOS_SEED its random seed.
"""

from __future__ import annotations

import gzip
import http.server
import json
import logging
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.agent import Agent, snapshot
from edge_agent.buffer import BufferSession
from edge_agent.config import load_config, parse_duration
from edge_agent.records import Reading
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.simulator import PtySensor
from edge_agent.status import health
from edge_agent.testing.harness import free_port, run_cli
from edge_agent.uplink import PROBE_JITTER
from edge_agent.uploader import split_bound
from tests.helpers import (
    DATASOURCE,
    TOKEN,
    AgentProcess,
    serial_source,
    wait_until,
    write_config,
)
from tests.test_service import agent_config, edge_agent_status, healthz, with_status, write_lines
from tests.test_uploader import LogLines

POISON = {"kind": "poison"}  # the sandbox rule that refuses a record


def record(seq: int, kind: str = "ok", **extra: Any) -> dict[str, Any]:
    return {
        "timestamp": "2025-01-01T12:00:00.000Z",
        "metric": "temperature",
        "value": 20.5 + seq % 10,
        "kind": kind,
        "seq": seq,
        **extra,
    }


@dataclass
class Call:
    """One request as the uploader's transport saw it."""

    started: float  # monotonic
    ended: float
    status: int | None  # None: no answer (connection dropped, refused...)
    gzip: bool
    body: bytes

    def records(self) -> list[dict[str, Any]]:
        body = gzip.decompress(self.body) if self.gzip else self.body  # gzip = "auto"
        return list(json.loads(body)["data"])


class CallLog(httpx.BaseTransport):
    """Real HTTP (an `httpx.HTTPTransport`), with each request and its outcome written down."""

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self.inner = inner or httpx.HTTPTransport()
        self.calls: list[Call] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        gz = request.headers.get("Content-Encoding") == "gzip"
        try:
            response = self.inner.handle_request(request)
        except httpx.HTTPError:
            self.calls.append(Call(started, time.monotonic(), None, gz, request.content))
            raise
        self.calls.append(
            Call(started, time.monotonic(), response.status_code, gz, request.content)
        )
        return response

    def close(self) -> None:
        self.inner.close()


class RefuseGzip(httpx.BaseTransport):
    """A server that takes no gzip: answers 415 to compressed bodies, passes the rest on."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.refused = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Content-Encoding") == "gzip":
            self.refused += 1
            return httpx.Response(415, json={"message": "Content-Encoding 'gzip' is not supported"})
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Running:
    agent: Agent
    config_path: Path
    token_file: Path
    logs: LogLines

    def put(self, records: list[dict[str, Any]], datasource_id: str = DATASOURCE) -> None:
        intake = self.agent.intake
        assert intake is not None, "the agent is started"
        assert intake.put([Reading(datasource_id, r) for r in records])
        assert self.agent.buffer.flush()

    def _session(self) -> BufferSession:
        return BufferSession(self.agent.config.buffer_path)

    def pending(self) -> int:
        s = self._session()
        try:
            return s.pending_count()
        finally:
            s.close()

    def dead_letters(self) -> list[dict[str, Any]]:
        s = self._session()
        try:
            return s.dead_letters()
        finally:
            s.close()


StartAgent = Callable[..., Running]


@pytest.fixture
def start_agent(sandbox: Sandbox, tmp_path: Path) -> Iterator[StartAgent]:
    """Start an Agent on the sandbox; `record_id_field = "reading_id"`; stopped at teardown."""
    idle = PtySensor(tmp_path / "serial-idle")  # plugged in but silent: the source waits
    idle.plug()
    logs = LogLines()
    logger = logging.getLogger("edge_agent")
    level = logger.level
    logger.addHandler(logs)
    logger.setLevel(logging.INFO)
    started: list[Agent] = []

    def start(*, transport: httpx.BaseTransport | None = None, **endpoint: Any) -> Running:
        path = write_config(
            tmp_path / "agent.toml",
            url=sandbox.url,
            data_dir=tmp_path / "data",
            sources=[serial_source(idle.link)],
            endpoint={"record_id_field": "reading_id", **endpoint},
        )
        agent = Agent(load_config(path), transport=transport)
        agent.start()
        started.append(agent)
        return Running(agent, path, tmp_path / "token", logs)

    yield start
    for agent in started:
        agent.stop()
    idle.unplug()
    logger.removeHandler(logs)
    logger.setLevel(level)


def stored(sandbox: Sandbox, datasource_id: str = DATASOURCE) -> list[dict[str, Any]]:
    return sandbox.records(datasource_id)


def seqs(records: list[dict[str, Any]]) -> list[int]:
    return [int(r["seq"]) for r in records]


# --------------------------------------------------------------------------- 400


def test_three_bad_records_among_500_are_dead_lettered_and_497_delivered(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    sandbox.set_faults(Faults(reject_fields=POISON))
    run = start_agent()
    poison = {17, 250, 499}
    # One put is one commit, so the 500 go out as one batch.
    run.put([record(i, "poison" if i in poison else "ok") for i in range(500)])
    wait_until(lambda: run.pending() == 0, timeout=30, what="all 500 settled")
    assert seqs(stored(sandbox)) == [i for i in range(500) if i not in poison]
    dead = run.dead_letters()
    assert sorted(d["record"]["seq"] for d in dead) == sorted(poison)
    for d in dead:
        assert d["status"] == 400
        assert d["reason"] == "data[0]: rejected by sandbox rule kind=poison"
        assert d["datasource_id"] == DATASOURCE
        assert "reading_id" in d["record"]
        # Carried by the whole batch (gzip, then once plain: gzip = "auto" had not been
        # delivered to this URL yet) and by one half per level down to itself.
        assert 3 <= d["attempts"] <= 2 + 9
    requests = sandbox.stats()["requests"]
    assert requests <= 1 + split_bound(500, 3) == 2 + 2 * 3 * 9
    assert run.agent.uploader.stats.split_requests == requests - 2
    assert not run.logs.matching("400 to gzip")  # the plain try was refused too: kept gzip
    assert run.logs.matching("3 refused record(s) went to dead letters", logging.INFO)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


def test_dead_letters_are_listed_requeued_and_purged_while_the_agent_runs(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    sandbox.set_faults(Faults(reject_fields=POISON))
    run = start_agent()
    config = str(run.config_path)
    run.put([record(i, "poison" if i in (3, 7) else "ok") for i in range(10)])
    wait_until(lambda: run.pending() == 0, what="the batch settled")

    listed = json.loads(cli("buffer", "dead-letters", "--config", config, "--json").stdout)
    assert [sorted(d) for d in listed] == [
        ["attempts", "datasource_id", "failed_at", "id", "reason", "record", "status"]
    ] * 2
    originals = {d["id"]: d["record"] for d in listed}

    sandbox.set_faults(Faults())  # the cause is fixed: the server takes them now
    first = min(originals)
    done = cli("buffer", "requeue", "--config", config, str(first))
    assert done.returncode == 0 and "requeued 1 dead letter(s)" in done.stdout
    wait_until(lambda: len(stored(sandbox)) == 9, what="the requeued one delivered")
    done = cli("buffer", "requeue", "--config", config, "--all")
    assert done.returncode == 0 and "requeued 1 dead letter(s)" in done.stdout
    wait_until(lambda: len(stored(sandbox)) == 10, what="all delivered")
    # Sent again as they were: same record, same reading_id.
    by_seq = {r["seq"]: r for r in stored(sandbox)}
    for rec in originals.values():
        assert by_seq[rec["seq"]] == rec
    assert run.dead_letters() == []

    missing = cli("buffer", "requeue", "--config", config, "999")
    assert missing.returncode == 1 and "no dead letter with id 999" in missing.stderr
    neither = cli("buffer", "requeue", "--config", config)
    assert neither.returncode == 2 and "IDs or --all" in neither.stderr

    sandbox.set_faults(Faults(reject_fields=POISON))
    run.put([record(10, "poison")])
    wait_until(lambda: len(run.dead_letters()) == 1, what="a new dead letter")
    kept = cli("buffer", "purge-dead-letters", "--config", config, "--older-than", "7d")
    assert kept.returncode == 0 and "purged 0 dead letter(s)" in kept.stdout
    gone = cli("buffer", "purge-dead-letters", "--config", config, "--older-than", "0s")
    assert gone.returncode == 0 and "purged 1 dead letter(s)" in gone.stdout
    assert run.dead_letters() == []
    session = BufferSession(run.agent.config.buffer_path)
    try:
        counters = session.stats().counters
    finally:
        session.close()
    assert counters[f"dead_letters_purged.{DATASOURCE}"] == 1  # counted, not lost silently
    assert counters[f"requeued.{DATASOURCE}"] == 2

    bad = cli("buffer", "purge-dead-letters", "--config", config, "--older-than", "7 weeks")
    assert bad.returncode == 2
    assert "'7 weeks' is not a duration; write a number and a unit: 30s, 15m, 12h or 7d" in (
        bad.stderr
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("15m", 900.0), ("12h", 43_200.0), ("7d", 604_800.0), ("1.5h", 5400.0)],
)
def test_durations_take_seconds_minutes_hours_and_days(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "7w", "1e3s", "7d3h"])
def test_a_bad_duration_says_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="write a number and a unit"):
        parse_duration(text)


# --------------------------------------------------------------------------- 401, 403


def test_a_rotated_token_holds_readings_until_the_token_file_changes(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    run = start_agent()
    run.put([record(i) for i in range(50)])
    wait_until(lambda: run.pending() == 0, what="the first 50 delivered")

    sandbox.set_tokens(["rotated-token"])
    run.put([record(i) for i in range(50, 100)])
    uploader = run.agent.uploader
    wait_until(lambda: uploader.stats.requests["401"] >= 1, what="a 401")
    time.sleep(0.5)  # paused: no delivery, no second try in this window
    assert len(stored(sandbox)) == 50
    assert run.pending() == 50
    assert uploader.stats.requests["401"] == 1
    (line,) = run.logs.matching("token rejected by", logging.ERROR)
    assert f"token rejected by {sandbox.url} (401: unknown token" in line
    assert "readings are kept" in line

    run.token_file.write_text("rotated-token\n")
    wait_until(lambda: run.pending() == 0, what="delivery with the new token")
    assert seqs(stored(sandbox)) == list(range(100))


def test_a_forbidden_data_source_pauses_alone_while_others_flow(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    run = start_agent()
    run.put([record(i) for i in range(10)], datasource_id="99999")  # not served: 403
    run.put([record(i) for i in range(10, 20)])
    wait_until(lambda: len(stored(sandbox)) == 10, what="67890 delivered")
    run.put([record(i) for i in range(20, 30)])
    wait_until(lambda: run.pending() == 10, what="67890 keeps flowing")
    assert seqs(stored(sandbox)) == list(range(10, 30))
    uploader = run.agent.uploader
    assert set(uploader.stats.paused) == {"99999"}
    assert uploader.stats.requests["403"] == 1
    assert run.pending() == 10
    (line,) = run.logs.matching("is forbidden to this token", logging.ERROR)
    assert line.startswith("uploader: data source 99999 is forbidden to this token (403: ")
    assert "its readings are kept" in line


# --------------------------------------------------------------------------- 413, 415


def test_413_splits_learns_the_size_limit_and_dead_letters_a_record_too_large(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    sandbox.set_faults(Faults(max_bytes=2000))
    run = start_agent()
    run.put([record(i) for i in range(100)])
    run.put([record(100, note="x" * 3000)])  # over the limit alone
    wait_until(lambda: run.pending() == 0, timeout=20, what="all settled")
    assert seqs(stored(sandbox)) == list(range(100))
    (dead,) = run.dead_letters()
    assert (dead["record"]["seq"], dead["status"]) == (100, 413)
    assert "max_bytes" in dead["reason"]
    assert run.agent.uploader.byte_limit < 2000
    refused = sandbox.stats()["by_status"]["413"]
    run.put([record(i) for i in range(101, 201)])
    wait_until(lambda: run.pending() == 0, timeout=20, what="the second wave")
    assert seqs(stored(sandbox)) == [*range(100), *range(101, 201)]
    assert sandbox.stats()["by_status"]["413"] == refused  # the limit held from then on


def test_gzip_bodies_are_taken_by_the_sandbox(sandbox: Sandbox, start_agent: StartAgent) -> None:
    calls = CallLog()
    run = start_agent(transport=calls, gzip=True)
    run.put([record(i) for i in range(50)])
    wait_until(lambda: run.pending() == 0, what="delivery")  # acked: the call is logged
    assert len(stored(sandbox)) == 50
    assert calls.calls and all(c.gzip and c.status == 200 for c in calls.calls)


def test_a_415_to_gzip_falls_back_to_plain_json(sandbox: Sandbox, start_agent: StartAgent) -> None:
    refusing = RefuseGzip(CallLog())
    run = start_agent(transport=refusing, gzip=True)
    run.put([record(i) for i in range(50)])
    wait_until(lambda: len(stored(sandbox)) == 50, what="delivery as plain JSON")
    run.put([record(i) for i in range(50, 60)])
    wait_until(lambda: run.pending() == 0, what="the next batch")
    assert seqs(stored(sandbox)) == list(range(60))
    assert refusing.refused == 1
    assert run.dead_letters() == []
    assert run.logs.matching("does not take gzip (415)", logging.WARNING)


# --------------------------------------------------------------------------- transient


def test_429_with_retry_after_is_honoured(sandbox: Sandbox, start_agent: StartAgent) -> None:
    sandbox.set_faults(Faults(status=429, retry_after="1"))
    calls = CallLog()
    run = start_agent(transport=calls, backoff_max_s=5.0)
    run.put([record(i) for i in range(10)])
    wait_until(lambda: any(c.status == 429 for c in calls.calls), what="a 429")
    sandbox.set_faults(Faults())
    wait_until(lambda: run.pending() == 0, what="delivery after the 429s")
    assert seqs(stored(sandbox)) == list(range(10))
    answered = list(zip(calls.calls, calls.calls[1:], strict=False))
    waits = [nxt.started - c.ended for c, nxt in answered if c.status == 429]
    assert waits
    # Without Retry-After the backoff here is at most 0.05 s: the header set the pace.
    assert min(waits) >= 0.9


def test_random_503s_delay_but_deliver_everything(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    sandbox.set_faults(Faults(fail_rate=0.3, seed=11))
    run = start_agent(max_batch_records=50)
    for start in range(0, 500, 100):
        run.put([record(i) for i in range(start, start + 100)])
    wait_until(lambda: run.pending() == 0, timeout=30, what="all delivered")
    assert seqs(stored(sandbox)) == list(range(500))
    assert sandbox.stats()["by_status"]["503"] > 0
    assert run.dead_letters() == []


# --------------------------------------------------------------------------- the uplink


def test_after_an_outage_the_first_batch_arrives_within_a_probe_period_of_the_return(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    """The sandbox refuses connections (stopped, its port kept), then comes back on that port.

    The backoff is set to what a gateway reaches after a long outage with the defaults (its
    cap, 300 s): backing off alone, the first batch would come up to 5 minutes after the
    return. The probe period is shortened from its default (10 s) to keep the test short;
    the bound is relative to it.
    """
    probe_s, timeout_s = 1.0, 5.0
    status_port = free_port()
    config = with_status(
        agent_config(
            tmp_path,
            sandbox,
            pty_sensor,
            endpoint={
                "reconnect_probe_s": probe_s,
                "timeout_s": timeout_s,
                "backoff_base_s": 300.0,
                "backoff_max_s": 300.0,
            },
        ),
        status_port,
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        agent.wait_log("serial weather: reading")
        written = write_lines(pty_sensor, 0, 10)
        wait_until(lambda: len(sandbox.records()) == written, what="the lines before the outage")
        before = written
        port = sandbox.port
        sandbox.stop()
        written = write_lines(pty_sensor, written, 10)
        agent.wait_log("retrying as soon as the link is back")

        # The operator sees the state: status --json, /metrics.
        uplink = json.loads(edge_agent_status(config, "--json").stdout)["uploader"]["uplink"]
        assert uplink["state"] == "down", uplink
        assert uplink["summary"].startswith("down since "), uplink
        metrics = httpx.get(f"http://127.0.0.1:{status_port}/metrics", trust_env=False).text
        assert 'edge_agent_uplink_state{state="down"} 1' in metrics
        time.sleep(3 * probe_s)  # probes find the port closed meanwhile

        back = Sandbox(
            port=port, tokens=[TOKEN], datasources=[DATASOURCE], db_path=tmp_path / "sbx.db"
        ).start()
        returned = time.monotonic()
        try:
            wait_until(lambda: len(back.records()) > before, timeout=60, what="a record")
            took = time.monotonic() - returned
            # One probe period with its jitter, then one request (at most timeout_s).
            assert took <= probe_s * (1 + PROBE_JITTER) + timeout_s, took
            wait_until(lambda: len(back.records()) >= written, what="the whole backlog")
            assert sorted(int(r["seq"]) for r in back.records()) == list(range(written))
        finally:
            back.stop()
        agent.wait_log("can be reached again after")
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


def test_a_server_answering_503_throughout_still_sees_exponential_backoff(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    """An answer is not a dead link: no probing, the backoff paces the requests."""
    sandbox.set_faults(Faults(status=503))
    # Probes (if they were used) would send a batch every 0.1 s: ~80 requests in the window.
    run = start_agent(reconnect_probe_s=0.1, backoff_base_s=0.2, backoff_max_s=2.0)
    run.put([record(i) for i in range(10)])
    wait_until(lambda: sandbox.stats()["requests"] >= 1, what="a first 503")
    uplink = run.agent.uploader.uplink
    wait_until(
        lambda: uplink.view().summary.startswith("server refusing: backing off until "),
        what="the refusing state",
    )
    first = sandbox.stats()["requests"]
    window = 8.0
    time.sleep(window)
    requests = sandbox.stats()["requests"] - first
    # Full jitter under ceilings of 0.2, 0.4, 0.8, 1.6 then 2 s: about a dozen requests on
    # average in the window; 25 allows for luck, and no probing pace comes near it.
    assert 2 <= requests <= 25, requests
    assert not uplink.down
    assert sandbox.records() == [] and run.pending() == 10


def test_lost_answers_cause_duplicates_only_of_their_batches_and_ids_dedupe_them(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    sandbox.set_faults(Faults(drop_after_commit=True, drop_after_commit_rate=0.4, seed=3))
    calls = CallLog()
    run = start_agent(transport=calls, max_batch_records=25)
    run.put([record(i) for i in range(200)])
    wait_until(lambda: run.pending() == 0, timeout=30, what="all delivered")
    got = stored(sandbox)
    ids = [r["reading_id"] for r in got]
    assert len(set(ids)) == 200  # same id on every retry: dedupe leaves one per reading
    assert sorted({r["seq"] for r in got}) == list(range(200))
    lost = [c for c in calls.calls if c.status is None]
    assert lost and sandbox.stats()["by_status"]["dropped"] == len(lost)
    # Each batch whose answer was lost was stored once more; nothing else is duplicated.
    assert len(got) == 200 + sum(len(c.records()) for c in lost)
    carried_by_lost = {r["reading_id"] for c in lost for r in c.records()}
    assert {i for i in ids if ids.count(i) > 1} <= carried_by_lost


# --------------------------------------------------------------------------- chaos


def random_faults(rng: random.Random) -> Faults:
    """Faults that delay or duplicate but never refuse a valid record."""
    return Faults(
        fail_rate=rng.choice([0.0, 0.0, 0.2, 0.5]),
        status=rng.choice([None, None, None, None, 408, 429, 500, 502, 503]),
        latency_ms=rng.choice([0, 0, 20, 100]),
        retry_after=rng.choice([None, None, "1"]),
        max_bytes=rng.choice([None, None, 4000, 16000]),
        drop_after_commit=rng.random() < 0.3,
        drop_after_commit_rate=0.5,
        reject_fields=POISON,
        seed=rng.randrange(1 << 30),
    )


def test_chaos_every_valid_record_is_delivered_and_every_poison_record_dead_lettered(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    seconds = float(os.environ.get("EDGE_AGENT_CHAOS_SECONDS", "15"))
    rng = random.Random(int(os.environ.get("EDGE_AGENT_CHAOS_SEED", "2024")))
    sandbox.set_faults(Faults(reject_fields=POISON))
    run = start_agent(gzip=True, max_batch_records=50)
    valid: set[int] = set()
    poison: set[int] = set()
    token = "test-token"
    token_due: float | None = None  # when the token file catches up with the sandbox
    seq = 0
    end = time.monotonic() + seconds
    next_change = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_change:
            sandbox.set_faults(random_faults(rng))
            if token_due is None and rng.random() < 0.15:
                token = f"token-{seq}"
                sandbox.set_tokens([token])  # 401s until the file changes
                token_due = now + rng.uniform(0.2, 1.5)
            next_change = now + rng.uniform(0.3, 1.5)
        if token_due is not None and now >= token_due:
            run.token_file.write_text(token + "\n")
            token_due = None
        chunk = []
        for _ in range(rng.randint(1, 30)):
            bad = rng.random() < 0.03
            (poison if bad else valid).add(seq)
            chunk.append(record(seq, "poison" if bad else "ok"))
            seq += 1
        run.put(chunk)
        time.sleep(rng.uniform(0.02, 0.15))

    sandbox.set_faults(Faults(reject_fields=POISON))
    run.token_file.write_text(token + "\n")
    wait_until(lambda: run.pending() == 0, timeout=60, what="the backlog drained")

    got = stored(sandbox)
    by_id = {r["reading_id"]: r["seq"] for r in got}
    assert len(by_id) == len(set(by_id.values()))  # one id per reading, kept across retries
    assert set(by_id.values()) == valid
    assert {d["record"]["seq"] for d in run.dead_letters()} == poison
    assert len(run.dead_letters()) == len(poison)
    assert run.agent.uploader.alive and run.agent.check_health() is None
    assert not run.logs.matching("unexpected error")
    assert poison and sandbox.stats()["requests"] > 50  # the run did meet its faults


# --------------------------------------------------------------------------- hostile network


def pending_in(db: Path) -> int:
    session = BufferSession(db)
    try:
        return session.pending_count()
    finally:
        session.close()


def vm_kib(pid: int, key: str) -> int:
    """VmRSS or VmHWM (the peak) of a process, from /proc, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_a_captive_portal_keeps_the_readings_says_so_and_turns_healthz_unhealthy(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    sandbox.set_faults(Faults(portal=True))
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    status = {"listen": f"127.0.0.1:{port}", "unhealthy_after_s": 1.0}
    config = agent_config(tmp_path, sandbox, pty_sensor, status=status)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        agent.wait_log("serial weather: reading")
        agent.wait_log("status page on")
        written = write_lines(pty_sensor, 0, 10)
        wait_until(lambda: sandbox.stats()["by_status"].get("portal"), what="a portal answer")

        # The log names what answered instead of the API, escaped: no line is forged.
        agent.wait_log("answered by something other than the insert API")
        text = agent.log_text()
        assert "content type 'text/html; charset=utf-8'" in text
        assert "first bytes '<!DOCTYPE html>\\n<html><head><title>GuestNet" in text
        assert "\n<html>" not in text and "\n<body>" not in text
        # Nothing counted as delivered: every reading is still in the buffer.
        assert sandbox.records() == []
        assert pending_in(tmp_path / "data" / "buffer.db") == written

        # Lasting past unhealthy_after_s, it makes /healthz 503, saying why.
        wait_until(lambda: healthz(base).status_code == 503, what="/healthz 503")
        reasons = healthz(base).json()["reasons"]
        assert any("something other than the insert API" in r for r in reasons), reasons
        assert any("text/html" in r for r in reasons), reasons
        as_json = edge_agent_status(config, "--json")
        doc = json.loads(as_json.stdout)
        assert "something other than the insert API" in doc["uploader"]["last_error"]
        assert "something other than the insert API" in edge_agent_status(config).stdout
        page = httpx.get(base, timeout=5, trust_env=False).text
        assert "something other than the insert API" in page
        assert "&lt;!DOCTYPE html&gt;" in page  # shown as text, not as markup

        # The portal goes away: the readings kept are delivered, health comes back.
        sandbox.set_faults(Faults())
        wait_until(lambda: len(sandbox.records()) >= written, timeout=20, what="delivery")
        assert sorted({int(r["seq"]) for r in sandbox.records()}) == list(range(written))
        wait_until(lambda: healthz(base).status_code == 200, what="/healthz 200 again")
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


def test_a_trickled_answer_ends_at_timeout_s_is_counted_and_health_sees_it(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    # Each byte comes well within timeout_s: httpx's per-read timeout alone never fires.
    sandbox.set_faults(Faults(trickle_s=0.5))
    run = start_agent(timeout_s=1.5)
    run.put([record(i) for i in range(10)])
    uploader = run.agent.uploader
    wait_until(lambda: uploader.stats.requests["stalled"] >= 2, timeout=30, what="2 stalls")
    (first, *_) = run.logs.matching("no complete answer within timeout_s = 1.5 s", logging.WARNING)
    assert "the answer (200) was still coming" in first
    assert "readings are kept" in first

    def unhealthy() -> list[str]:
        healthy, reasons = health(snapshot(run.agent, []), unhealthy_after_s=1.0)
        return [] if healthy else reasons

    reasons = wait_until(unhealthy, what="health to see the stalls")
    assert any("no complete answer within timeout_s" in r for r in reasons), reasons

    sandbox.set_faults(Faults())
    wait_until(lambda: run.pending() == 0, timeout=20, what="delivery once answers flow")
    # Each stalled batch was stored and sent again: duplicates of the same ids, nothing lost.
    by_id = {r["reading_id"]: r["seq"] for r in stored(sandbox)}
    assert sorted(by_id.values()) == list(range(10))
    assert run.agent.uploader.alive
    assert not run.logs.matching("unexpected error")


def test_a_json_confirmation_longer_than_the_answer_cap_counts_as_delivered_once(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    # The API's own JSON object, padded to 1 MB: past the 256 KiB the agent reads. The
    # readings were inserted; sending them again would only store them twice.
    sandbox.set_faults(Faults(huge_body_mb=1))
    run = start_agent()
    run.put([record(i) for i in range(10)])
    wait_until(lambda: run.pending() == 0, timeout=20, what="the batch counted delivered")
    assert sorted(seqs(stored(sandbox))) == list(range(10)), "each reading stored once"
    assert sandbox.stats()["by_status"].get("200") == 1, sandbox.stats()
    assert not run.logs.matching("something other than the insert API")
    assert run.dead_letters() == []


def test_huge_answers_on_200_and_on_400_during_bisection_keep_memory_bounded(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    # Every answer is 50 MB: the 200s (stored, then answered with a huge JSON object: the
    # API's answer, cut at the cap, so delivered) and the 400s of the bisection down to seq 0,
    # which the sandbox refuses.
    sandbox.set_faults(Faults(huge_body_mb=50, reject_fields={"seq": "0"}))
    config = agent_config(tmp_path, sandbox, pty_sensor)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        agent.wait_log("serial weather: reading")
        written = write_lines(pty_sensor, 0, 64)
        assert agent.proc is not None
        pid = agent.proc.pid

        def answered(status: str) -> int:
            return int(sandbox.stats()["by_status"].get(status, 0))

        wait_until(lambda: answered("400") >= 6 and answered("200") >= 3, timeout=60)
        peak_mb = vm_kib(pid, "VmHWM") / 1024
        assert peak_mb < 80, f"the agent peaked at {peak_mb:.0f} MB through 50 MB answers"
        assert "over 256 KiB" in agent.log_text()

        sandbox.set_faults(Faults(reject_fields={"seq": "0"}))
        wait_until(lambda: pending_in(tmp_path / "data" / "buffer.db") == 0, timeout=30)
        assert {int(r["seq"]) for r in sandbox.records()} == set(range(1, written))
        assert vm_kib(pid, "VmHWM") / 1024 < 80
    finally:
        agent.ensure_dead()


class HangingUpProxy:
    """A proxy that takes each connection and closes it at once, answering nothing."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the test is over
            conn.recv(65536)
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


@pytest.mark.parametrize("proxy", ["refusing", "hanging-up"])
def test_upload_errors_through_a_proxy_name_the_proxy_without_its_password(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, proxy: str
) -> None:
    hanging = HangingUpProxy() if proxy == "hanging-up" else None
    port = hanging.port if hanging else free_port()  # nothing listens: refused
    env = {name: "" for name in ("HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "no_proxy")}
    env["HTTP_PROXY"] = f"http://edge:s3cret-pw@127.0.0.1:{port}"
    status_port = free_port()
    config = with_status(agent_config(tmp_path, sandbox, pty_sensor), status_port)
    agent = AgentProcess(config, tmp_path / "agent.log", env=env).start()
    try:
        agent.wait_log("serial weather: reading")
        write_lines(pty_sensor, 0, 5)
        note = f"(through the proxy 127.0.0.1:{port} from HTTP_PROXY)"
        agent.wait_log(note, timeout=30)
        (line,) = [x for x in agent.log_text().splitlines() if "upload to" in x and note in x][:1]
        assert ("ConnectError" if proxy == "refusing" else "RemoteProtocolError") in line, line
        doc = json.loads(edge_agent_status(config, "--json").stdout)
        assert note in doc["uploader"]["last_error"], doc["uploader"]
        assert "s3cret-pw" not in agent.log_text() + json.dumps(doc)
        assert sandbox.records() == [] and pending_in(tmp_path / "data" / "buffer.db") == 5
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
        if hanging:
            hanging.close()


def test_a_proxy_asking_for_credentials_keeps_the_readings_and_says_what_to_set(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    """Over http:// a proxy's 407 is an HTTP answer: not a bad record to dead-letter."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b"<html>407 Proxy Authentication Required</html>"
            self.send_response(407)
            self.send_header("Proxy-Authenticate", 'Basic realm="site"')
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {name: "" for name in ("HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "no_proxy")}
    env["HTTP_PROXY"] = f"http://127.0.0.1:{proxy.server_address[1]}"
    config = agent_config(tmp_path, sandbox, pty_sensor)
    agent = AgentProcess(config, tmp_path / "agent.log", env=env).start()
    try:
        agent.wait_log("serial weather: reading")
        write_lines(pty_sensor, 0, 5)
        agent.wait_log("the proxy between the gateway and the API wants a user name", timeout=30)
        assert "dead letter" not in agent.log_text().lower()
        db = tmp_path / "data" / "buffer.db"
        assert pending_in(db) == 5
        session = BufferSession(db)
        try:
            assert session.dead_letters() == []
        finally:
            session.close()
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
        proxy.shutdown()
        proxy.server_close()


def test_control_characters_in_a_server_message_are_escaped_in_the_log(
    sandbox: Sandbox, start_agent: StartAgent
) -> None:
    forged = "x\r\n2025-01-01T00:00:00.000Z ERROR agent: forged line\x1b[2J"
    sandbox.set_faults(Faults(reject_fields={"kind": forged}))
    run = start_agent()
    run.put([record(0, forged), record(1)])
    wait_until(lambda: run.pending() == 0, what="the batch settled")
    (line,) = run.logs.matching("the server refused a record", logging.WARNING)
    assert "kind=x\\r\\n2025-01-01T00:00:00.000Z ERROR agent: forged line\\x1b[2J" in line
    for _, message in run.logs.lines:
        assert not {"\r", "\n", "\x1b"} & set(message), repr(message)
    (dead,) = run.dead_letters()
    assert "\x1b" not in dead["reason"] and "\\x1b[2J" in dead["reason"]
    assert seqs(stored(sandbox)) == [1]
