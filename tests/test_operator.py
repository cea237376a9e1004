"""Operator commands and the buffer's single owner: one agent per buffer, what each `buffer`
command does beside a running agent, and export and import that keep the buffer's promises."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.buffer import Buffer, BufferSession, wal_reserve
from edge_agent.config import BufferConfig
from edge_agent.records import Reading
from edge_agent.sandbox import Faults, Sandbox
from edge_agent.simulator import PtySensor, kv_line
from edge_agent.store import used_bytes
from edge_agent.testing.harness import free_port, run_cli
from tests.helpers import (
    DATASOURCE,
    AgentProcess,
    counters,
    serial_source,
    wait_until,
    write_config,
)

OTHER = "67891"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=120)


def fill(db: Path, count: int, ds: str = DATASOURCE, start: int = 0) -> None:
    buf = Buffer(db, BufferConfig())
    buf.open()
    buf.put([Reading(ds, {"timestamp": "2026-11-20T00:00:00.000Z", "seq": i})
             for i in range(start, start + count)])  # fmt: skip
    assert buf.flush()
    buf.close()


def seqs(db: Path, ds: str | None = None) -> list[int]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute(
            "SELECT record FROM readings WHERE ?1 IS NULL OR datasource_id = ?1 ORDER BY id", (ds,)
        ).fetchall()
    finally:
        conn.close()
    return [json.loads(r)["seq"] for (r,) in rows]


def received(sandbox: Sandbox, ds: str = DATASOURCE) -> list[int]:
    return [int(r["seq"]) for r in sandbox.records(ds)]


def write_lines(sensor: PtySensor, start: int, count: int) -> int:
    for seq in range(start, start + count):
        assert sensor.write_line(kv_line(seq, time.time()))
        time.sleep(0.002)
    return start + count


def agent_config(
    tmp_path: Path, url: str, port: Path, *, listen: str | None = None, max_bytes: int = 1 << 28
) -> Path:
    path = write_config(
        tmp_path / "agent.toml",
        url=url,
        data_dir=tmp_path / "data",
        sources=[serial_source(port)],
        buffer={"max_bytes": max_bytes},
        status=None if listen is None else {"listen": listen},
    )
    return path


# -- one agent per buffer ---------------------------------------------------------------------


def test_a_second_agent_on_the_same_buffer_exits_2_and_nothing_is_sent_twice(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    config = agent_config(tmp_path, sandbox.url, pty_sensor.link)
    # As systemd starts it: the refusal should say it is probably the service.
    first = AgentProcess(config, tmp_path / "first.log", env={"INVOCATION_ID": "0123"}).start()
    agents.append(first)
    first.wait_log("serial weather: reading")
    written = write_lines(pty_sensor, 0, 20)
    wait_until(lambda: len(received(sandbox)) >= 20, what="the first readings")

    second = AgentProcess(config, tmp_path / "second.log").start()
    agents.append(second)
    assert second.proc is not None
    assert second.proc.wait(30) == 2
    message = second.log_text()
    assert first.proc is not None
    assert f"PID {first.proc.pid}" in message, message
    assert "probably the edge-agent service" in message and "systemctl stop edge-agent" in message
    assert f"run --config {config}" in message and "Traceback" not in message
    assert "started with" not in message, "the second agent must touch nothing"

    assert first.proc.poll() is None, "the first agent goes on"
    written = write_lines(pty_sensor, written, 30)
    wait_until(lambda: len(received(sandbox)) >= written, what="the next readings")

    # kill -9: the kernel releases the lock with the process; a new agent starts at once.
    wait_until(lambda: not seqs(tmp_path / "data" / "buffer.db"), what="an empty buffer")
    first.kill9()
    third = AgentProcess(config, tmp_path / "third.log").start()
    agents.append(third)
    third.wait_log("serial weather: reading")
    written = write_lines(pty_sensor, written, 30)
    wait_until(lambda: len(received(sandbox)) >= written, what="readings after the restart")
    got = received(sandbox)
    assert sorted(got) == list(range(written)), "each reading arrives exactly once"
    assert third.terminate() == 0


def test_deleting_the_lock_file_under_a_running_agent_lets_no_second_agent_start(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    config = agent_config(tmp_path, sandbox.url, pty_sensor.link)
    lock_file = tmp_path / "data" / "buffer.db.lock"
    first = AgentProcess(config, tmp_path / "first.log").start()
    agents.append(first)
    assert first.proc is not None
    first_pid = first.proc.pid
    first.wait_log("serial weather: reading")
    written = write_lines(pty_sensor, 0, 20)
    wait_until(lambda: len(received(sandbox)) >= 20, what="the first readings")

    lock_file.unlink()  # a tidy-up by hand: `rm /var/lib/edge-agent/*.lock`
    second = AgentProcess(config, tmp_path / "second.log").start()
    agents.append(second)
    assert second.proc is not None
    assert second.proc.wait(30) == 2, second.log_text()
    message = second.log_text()
    assert f"PID {first_pid}" in message and "another agent already runs" in message, message
    refused = cli("buffer", "drop", "--config", str(config), "--datasource", DATASOURCE, "--yes")
    assert refused.returncode == 2 and f"PID {first_pid}" in refused.stderr, refused.stderr

    # The holder makes its lock file again, with its PID, and says so.
    wait_until(lock_file.exists, timeout=30, what="the lock file made again")
    wait_until(lambda: lock_file.read_text().strip() == str(first_pid), what="its PID")
    first.wait_log("was deleted while the agent runs; took it again, with the agent's PID")
    status = cli("status", "--config", str(config))
    assert status.returncode != 3, "status finds the agent running: " + status.stdout

    written = write_lines(pty_sensor, written, 30)
    wait_until(lambda: len(received(sandbox)) >= written, what="the next readings")
    assert sorted(received(sandbox)) == list(range(written)), "each reading arrives once"
    assert first.proc.poll() is None and first.terminate() == 0


def test_a_lock_file_that_is_a_link_a_fifo_or_a_hard_link_is_refused_and_left_alone(
    tmp_path: Path, agents: list[AgentProcess]
) -> None:
    config = agent_config(tmp_path, "http://127.0.0.1:9/restapi/datasource/insert", tmp_path / "p")
    data = tmp_path / "data"
    data.mkdir()
    lock_file = data / "buffer.db.lock"
    victim = tmp_path / "precious.conf"
    victim.write_text("keep me\n")

    def refused_run(expected: str) -> None:
        agent = AgentProcess(config, tmp_path / "agent.log").start()
        agents.append(agent)
        assert agent.proc is not None
        assert agent.proc.wait(30) == 2, agent.log_text()
        message = agent.log_text()
        assert expected in message and f"rm {lock_file}" in message, message
        assert "Traceback" not in message and not (data / "buffer.db").exists()
        assert victim.read_text() == "keep me\n", "nothing written through the lock file"

    lock_file.symlink_to(victim)
    refused_run("is a symbolic link (to ")
    lock_file.unlink()
    os.link(victim, lock_file)
    refused_run("has 2 names (hard links)")
    lock_file.unlink()
    os.mkfifo(lock_file)
    refused_run("is not a regular file")
    # `status` must not block opening the FIFO either: the agent is simply not running.
    status = subprocess.run(
        [sys.executable, "-m", "edge_agent", "status", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 3, status.stdout + status.stderr


# -- each operator command beside a running agent --------------------------------------------


def dead_letter_some(db: Path, count: int) -> None:
    """Readings the server refused, as the uploader keeps them."""
    fill(db, count, ds=OTHER, start=1000)
    session = BufferSession(db)
    try:
        batch = session.next_batch(count, 1 << 20)
        assert batch is not None and len(batch.rows) == count
        session.dead_letter(batch, 400, "refused for the test", 1)
    finally:
        session.close()


def test_operator_commands_beside_a_running_agent_do_what_the_readme_says(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    config = agent_config(tmp_path, sandbox.url, pty_sensor.link, listen=listen)
    db = tmp_path / "data" / "buffer.db"
    fill(db, 0)
    dead_letter_some(db, 3)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("serial weather: reading")
    assert agent.proc is not None
    written = write_lines(pty_sensor, 0, 10)
    wait_until(lambda: len(received(sandbox)) >= 10, what="the first readings")
    c = str(config)

    # Read-only commands work alongside.
    check = cli("check", "--config", c)
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr
    status = cli("status", "--config", c, "--json")
    assert status.returncode in (0, 1) and "offline" not in json.loads(status.stdout)
    stats = cli("buffer", "stats", "--config", c, "--json")
    assert stats.returncode == 0 and json.loads(stats.stdout)["dead_letters"] == 3
    dead = cli("buffer", "dead-letters", "--config", c, "--json")
    assert dead.returncode == 0 and len(json.loads(dead.stdout)) == 3
    exported = cli("buffer", "export", "--config", c, "-o", str(tmp_path / "x.jsonl"))
    assert exported.returncode == 0, exported.stderr

    # Commands that only add or remove what the uploader does not hold: safe alongside.
    requeued = cli("buffer", "requeue", "--config", c, "--all")
    assert requeued.returncode == 0 and "requeued 3" in requeued.stdout, requeued.stderr
    wait_until(lambda: len(received(sandbox, OTHER)) == 3, what="the requeued dead letters")
    carried = tmp_path / "carried.jsonl"
    carried.write_text("".join(
        json.dumps({"datasource_id": OTHER, "record": {"timestamp": "2026-11-20T00:00:00.000Z",
                                                       "seq": 2000 + i}}) + "\n"
        for i in range(50)
    ))  # fmt: skip
    imported = cli("buffer", "import", "--config", c, str(carried))
    assert imported.returncode == 0 and "queued 50 readings" in imported.stdout, imported.stderr
    wait_until(lambda: len(received(sandbox, OTHER)) == 53, what="the imported readings")
    purged = cli("buffer", "purge-dead-letters", "--config", c, "--older-than", "0s")
    assert purged.returncode == 0, purged.stderr

    # Commands that change what a batch in flight belongs to: refused, naming the agent.
    sandbox.set_faults(Faults(status=503))  # keep readings pending
    written = write_lines(pty_sensor, written, 10)
    wait_until(lambda: len(seqs(db)) >= 10, what="readings waiting")
    before = (seqs(db), counters(db))
    for command in (
        ["move", "--from", DATASOURCE, "--to", OTHER],
        ["drop", "--datasource", DATASOURCE, "--yes"],
    ):
        refused = cli("buffer", *command, "--config", c)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"PID {agent.proc.pid}" in refused.stderr and "needs the agent stopped" in (
            refused.stderr
        )
        assert f"kill {agent.proc.pid}" in refused.stderr  # started by hand, not by systemd
    assert (seqs(db), counters(db)) == before, "a refused command changes nothing"

    # Stopped, the agent lets them work; and while one works, no agent starts.
    assert agent.terminate() == 0
    moved = cli("buffer", "move", "--config", c, "--from", DATASOURCE, "--to", OTHER)
    assert moved.returncode == 0 and f"moved {len(before[0])}" in moved.stdout, moved.stderr


# -- export ------------------------------------------------------------------------------------


def test_export_never_overwrites_by_accident_nor_writes_onto_the_buffer(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "http://127.0.0.1:9/restapi/datasource/insert", tmp_path / "p")
    db = tmp_path / "data" / "buffer.db"
    fill(db, 25)
    c = str(config)
    (tmp_path / "to-wal").symlink_to(db.with_name("buffer.db-wal"))
    (tmp_path / "to-db").symlink_to(db)
    for target in (
        db,
        tmp_path / "to-db",
        tmp_path / "to-wal",
        tmp_path / "data" / "buffer.db.lock",
    ):
        for force in ([], ["--force"]):
            refused = cli("buffer", "export", "--config", c, "-o", str(target), *force)
            assert refused.returncode == 2 and "buffer's own file" in refused.stderr
    assert seqs(db) == list(range(25)), "the buffer keeps every reading"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    conn.close()

    kept = tmp_path / "yesterday.jsonl"
    kept.write_text("yesterday's export\n")
    refused = cli("buffer", "export", "--config", c, "-o", str(kept))
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert kept.read_text() == "yesterday's export\n"
    replaced = cli("buffer", "export", "--config", c, "-o", str(kept), "--force")
    assert replaced.returncode == 0, replaced.stderr
    lines = kept.read_text().splitlines()
    assert [json.loads(line)["record"]["seq"] for line in lines] == list(range(25))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


def test_export_refuses_fifos_devices_sockets_and_dangling_links_even_with_force(
    tmp_path: Path,
) -> None:
    config = agent_config(tmp_path, "http://127.0.0.1:9/restapi/datasource/insert", tmp_path / "p")
    fill(tmp_path / "data" / "buffer.db", 5)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    device = tmp_path / "null"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone.jsonl")  # removed since, say
    to_fifo = tmp_path / "to-pipe"
    to_fifo.symlink_to(fifo)
    expected = {
        fifo: "is a FIFO (named pipe), not a regular file",
        to_fifo: "is a FIFO (named pipe), not a regular file",
        device: "is a character device, not a regular file",
        sock_path: "is a socket, not a regular file",
        dangling: "which does not exist: give the real path, or remove the link",
    }
    try:
        for target, message in expected.items():
            for force in ([], ["--force"]):
                refused = cli("buffer", "export", "--config", str(config), "-o", str(target),
                              *force)  # fmt: skip
                assert refused.returncode == 2, (target, force, refused.stderr)
                assert message in refused.stderr, refused.stderr
                assert "Traceback" not in refused.stderr
    finally:
        sock.close()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISCHR(os.lstat(device).st_mode)
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode) and dangling.is_symlink()
    assert not (tmp_path / "gone.jsonl").exists(), "nothing was written through the link"


# -- import --------------------------------------------------------------------------------


def export_file(path: Path, count: int, pad: int = 60) -> Path:
    with path.open("w") as f:
        for i in range(count):
            record = {"timestamp": "2026-11-20T00:00:00.000Z", "seq": i, "pad": "p" * pad}
            f.write(json.dumps({"datasource_id": DATASOURCE, "record": record}) + "\n")
    return path


def test_import_queues_only_what_fits_and_the_agent_then_drops_none_of_it(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor, agents: list[AgentProcess]
) -> None:
    max_bytes = 1 << 20
    config = agent_config(tmp_path, sandbox.url, pty_sensor.link, max_bytes=max_bytes)
    db = tmp_path / "data" / "buffer.db"
    fill(db, 0)
    big = export_file(tmp_path / "big.jsonl", 20_000)

    refused = cli("buffer", "import", "--config", str(config), str(big))
    assert refused.returncode == 1 and "nothing was imported" in refused.stderr, refused.stderr
    assert "20,000 readings" in refused.stderr and "--when-full" in refused.stderr
    assert seqs(db) == []

    partial = cli("buffer", "import", "--config", str(config), str(big), "--when-full",
                  "drop_newest")  # fmt: skip
    assert partial.returncode == 0, partial.stderr
    queued = seqs(db)
    n = len(queued)
    assert 0 < n < 20_000 and queued == list(range(n))
    assert f"queued {n} readings" in partial.stdout and f"(lines 1-{n})" in partial.stdout
    assert f"not queued: {20_000 - n} readings (lines {n + 1}-20000)" in partial.stderr
    conn = sqlite3.connect(db)
    assert used_bytes(conn) <= max_bytes - wal_reserve(max_bytes)
    conn.close()

    # The agent takes the buffer as it is: every queued reading is delivered, none dropped.
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    try:
        wait_until(lambda: len(received(sandbox)) >= n, timeout=20, what="the imported readings")
    except AssertionError:
        print("LOG", agent.log_text()[-3000:], len(received(sandbox)), n)
        raise
    assert sorted(received(sandbox)) == list(range(n))
    assert agent.terminate() == 0
    assert not [k for k in counters(db) if k.startswith("dropped.")]


def readings_in(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])
    finally:
        conn.close()


def start_import(config: Path, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "buffer", "import", "--config", str(config),
         str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def interrupt(proc: subprocess.Popen[str], signum: int) -> None:
    """Deliver `signum` to a stopped process and let it go on."""
    os.kill(proc.pid, signum)
    os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_import_says_what_it_queued_and_how_to_queue_the_rest(
    tmp_path: Path, signum: int
) -> None:
    config = agent_config(tmp_path, "http://127.0.0.1:9/restapi/datasource/insert", tmp_path / "p")
    db = tmp_path / "data" / "buffer.db"
    fill(db, 0)
    total = 100_000
    big = export_file(tmp_path / "big.jsonl", total)

    proc = start_import(config, big)
    wait_until(lambda: readings_in(db) > 0, timeout=60, what="the first chunk committed")
    os.kill(proc.pid, signal.SIGSTOP)  # hold it mid-way, then interrupt it there
    assert readings_in(db) < total // 2, "the import is still under way"
    interrupt(proc, signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, out + err
    queued = seqs(db)
    n = len(queued)
    assert 0 < n < total and queued == list(range(n)), "what committed is a prefix"
    assert f"queued {n} readings from {big} (lines 1-{n}) before the interruption" in out, out
    name = signal.Signals(signum).name
    assert f"interrupted ({name}): the readings from line {n + 1} on were not queued" in err
    assert f"tail -n +{n + 1} {big} > rest.jsonl" in err and "Traceback" not in err

    # Doing what it says queues the rest, each reading once.
    rest = tmp_path / "rest.jsonl"
    with big.open("rb") as src, rest.open("wb") as dst:
        dst.writelines(line for number, line in enumerate(src, 1) if number > n)
    resumed = cli("buffer", "import", "--config", str(config), str(rest))
    assert resumed.returncode == 0, resumed.stderr
    assert seqs(db) == list(range(total))


def test_an_import_interrupted_while_checking_the_file_imports_nothing_and_says_so(
    tmp_path: Path,
) -> None:
    config = agent_config(tmp_path, "http://127.0.0.1:9/restapi/datasource/insert", tmp_path / "p")
    db = tmp_path / "data" / "buffer.db"
    fill(db, 0)
    big = export_file(tmp_path / "big.jsonl", 100_000)
    proc = start_import(config, big)

    def reading_the_file() -> bool:
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
            try:
                if os.readlink(fd) == str(big):
                    return True
            except FileNotFoundError:  # closed meanwhile
                continue
        return False

    wait_until(reading_the_file, timeout=60, what="the import reading the file")
    os.kill(proc.pid, signal.SIGSTOP)
    if readings_in(db) > 0:
        pytest.fail("the import was already queueing: make the file larger for this machine")
    interrupt(proc, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert readings_in(db) == 0
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err, err
    # Still checking: "nothing was imported"; or just past it: nothing queued yet either.
    assert "nothing was imported" in err or "from line 1 on were not queued" in err, err


def test_import_reports_malformed_lines_by_number_and_imports_nothing(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "http://127.0.0.1:9/restapi/datasource/insert", tmp_path / "p")
    db = tmp_path / "data" / "buffer.db"
    fill(db, 0)
    good = json.dumps({"datasource_id": DATASOURCE, "record": {"seq": 1}}).encode()
    lines = [
        good,
        b'{"datasource_id": "67890", "record": {"seq": NaN}}',
        b'{"datasource_id": "67890", "record": {"seq": "caf\xe9"}}',  # Latin-1, not UTF-8
        b'{"datasource_id": "67890", "record": {"seq": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b"",
        b'{"datasource_id": "67890", "record": [1, 2]}',
        b'{"datasource_id": "67890", "record": {"pad": "' + b"x" * (5 << 20) + b'"}}',
        good,
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    done = cli("buffer", "import", "--config", str(config), str(bad))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    for number, why in [(2, "NaN"), (3, "not UTF-8"), (4, "nested too deeply"),
                        (6, "expected"), (7, "longer than")]:  # fmt: skip
        assert f"bad.jsonl line {number}: " in done.stderr and why in done.stderr, done.stderr
    assert "line 1:" not in done.stderr and "line 8:" not in done.stderr
    assert "nothing was imported: 5 line(s)" in done.stderr
    assert seqs(db) == []
