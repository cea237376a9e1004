"""A data directory the agent cannot use (permissions, a read-only mount, a file that refuses
writes) is an access problem, not damage: the file is never moved aside or changed, the agent
exits 2 at start with the path, the user and the modes, and retries while running."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.buffer import Buffer, BufferSession
from edge_agent.config import BufferConfig
from edge_agent.records import Reading
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtySensor
from edge_agent.testing.harness import run_cli
from tests.helpers import DATASOURCE, AgentProcess, serial_source, wait_until, write_config

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534

# `edge-agent run` as the user nobody: the interpreter and the modules `run` needs are loaded
# as root (nobody cannot read this machine's Python), then the process gives up root for good.
RUN_AS_NOBODY = f"""
import os, sys
import edge_agent.cli, edge_agent.demo, edge_agent.service
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
sys.exit(edge_agent.cli.main(["run", "--config", sys.argv[1]]))
"""


def fingerprint(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Each file's content hash, size and modification time (a lock file aside)."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if not p.name.endswith(".lock")
    }


def fill(db: Path, n: int) -> None:
    buf = Buffer(db, BufferConfig())
    buf.open()
    buf.put([Reading(DATASOURCE, {"seq": i}) for i in range(n)])
    buf.close()


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory others may enter (pytest's own tmp_path is root's alone)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the agent as another user")
    path = Path(tempfile.mkdtemp(prefix="edge-agent-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def config_in(base: Path) -> Path:
    config = write_config(
        base / "agent.toml",
        url="http://127.0.0.1:9/restapi/datasource/insert",
        data_dir=base / "data",
        sources=[serial_source(base / "no-such-port")],
    )
    token = base / "token"
    os.chown(token, NOBODY, NOBODY)  # the agent's user reads its token, nobody else
    token.chmod(0o600)
    return config


@pytest.mark.parametrize(
    ("case", "dir_owner", "file_mode", "shown"),
    [
        # The file is unreadable to the agent: on main it was moved aside as "damaged".
        ("unreadable file", NOBODY, 0o600, "-rw-------"),
        # The directory is not writable (no WAL can be made): a traceback or exit 1 on main.
        ("read-only directory", 0, 0o644, "drwxr-xr-x"),
        # A new installation whose data_dir belongs to root.
        ("no file yet", 0, None, "drwxr-xr-x"),
    ],
)
def test_an_agent_that_cannot_use_its_data_dir_exits_2_naming_path_user_and_mode(
    world_dir: Path, case: str, dir_owner: int, file_mode: int | None, shown: str
) -> None:
    config = config_in(world_dir)
    data = world_dir / "data"
    db = data / "buffer.db"
    if file_mode is None:
        data.mkdir()
    else:
        fill(db, 500)
        db.chmod(file_mode)
    os.chown(data, dir_owner, dir_owner)
    before = fingerprint(data)
    run = subprocess.run(
        [sys.executable, "-c", RUN_AS_NOBODY, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert f"cannot open the buffer database {db}" in run.stderr
    assert "runs as user nobody (uid 65534" in run.stderr
    assert shown in run.stderr and "The file was left as it is" in run.stderr
    assert "Traceback" not in out and "damaged" not in out
    assert fingerprint(data) == before  # nothing moved aside, created or written
    if file_mode is not None:
        db.chmod(0o644)
        session = BufferSession(db)
        assert session.pending_count() == 500
        session.close()


@pytest.fixture
def read_only_data(tmp_path: Path) -> Iterator[Path]:
    """A buffer with readings, then its directory mounted read-only (a bind mount)."""
    source = tmp_path / "source"
    fill(source / "buffer.db", 300)
    mount = tmp_path / "data"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to bind-mount a directory read-only")
    done = subprocess.run(["mount", "--bind", str(source), str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"this platform forbids bind mounts: {done.stderr.decode().strip()}")
    subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_data_dir_stops_the_agent_with_exit_2_and_touches_nothing(
    tmp_path: Path, read_only_data: Path
) -> None:
    config = write_config(
        tmp_path / "agent.toml",
        url="http://127.0.0.1:9/restapi/datasource/insert",
        data_dir=read_only_data,
        sources=[serial_source(tmp_path / "no-such-port")],
    )
    before = fingerprint(read_only_data)
    run = run_cli("run", "--config", str(config), cwd=ROOT)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "The file system is mounted read-only" in run.stderr
    assert "mount it read-write" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert fingerprint(read_only_data) == before


def _chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


def test_writes_refused_while_running_are_retried_logged_once_counted_and_lose_nothing(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr to make a file refuse writes")
    data = tmp_path / "data"
    sensor = PtySensor(tmp_path / "serial-weather", rate_hz=100).start()
    config = write_config(
        tmp_path / "agent.toml",
        url=sandbox.url,
        data_dir=data,
        sources=[serial_source(sensor.link)],
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    wal = data / "buffer.db-wal"
    try:
        wait_until(lambda: len(sandbox.records(DATASOURCE)) > 20, 20, "the first uploads")
        try:
            _chattr("+i", wal)  # every write to the WAL now fails with EPERM
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"this file system refuses chattr +i: {exc.stderr.decode().strip()}")
        try:
            agent.wait_log("buffer: cannot write to the buffer database", 20)
            time.sleep(3.0)  # several retries, and readings waiting in memory
        finally:
            _chattr("-i", wal)
        agent.wait_log("buffer: writing works again after", 20)
        sensor.stop()
        written = sensor.written
        wait_until(
            lambda: max(r["seq"] for r in sandbox.records(DATASOURCE)) == written - 1,
            30,
            "the readings of the incident to be delivered",
        )
    finally:
        agent.terminate()
        sensor.unplug()
    log_text = agent.log_text()
    assert log_text.count("buffer: cannot write to the buffer database") == 1  # once
    assert "disk I/O error" in log_text and "runs as user root" in log_text
    got = {r["seq"] for r in sandbox.records(DATASOURCE)}
    assert got == set(range(min(got), written)), "a reading read during the incident is lost"
    assert sorted(p.name for p in data.iterdir() if "corrupt" in p.name) == []
    session = BufferSession(data / "buffer.db")
    assert session.stats().counters["buffer.write_failures"] >= 2
    session.close()
