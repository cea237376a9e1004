"""Shared test plumbing: config files, waiting, running the agent as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.agent import Agent

TOKEN = "test-token"
DATASOURCE = "67890"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll until `predicate()` is truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_config(
    path: Path,
    *,
    url: str,
    data_dir: Path,
    sources: list[dict[str, Any]],
    token_file: Path | None = None,
    endpoint: dict[str, Any] | None = None,
    buffer: dict[str, Any] | None = None,
    agent: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
) -> Path:
    """A config file with fast test timings; `token_file` defaults to one holding TOKEN.

    The status endpoint is off unless `status` gives a listen address: its built-in default
    (127.0.0.1:9108) is one port for every agent, and the tests run many agents at once.
    """
    if token_file is None:
        token_file = path.parent / "token"
        if not token_file.exists():
            token_file.write_text(TOKEN + "\n")
            token_file.chmod(0o600)  # as installed; a token others can read earns a warning
    ep = {
        "url": url,
        "token_file": str(token_file),
        "flush_interval_s": 0.2,
        "timeout_s": 5.0,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.5,
        "reconnect_probe_s": 0.5,
        **(endpoint or {}),
    }
    sections = {
        "agent": {"data_dir": str(data_dir), "device_id": "gw-test", **(agent or {})},
        "endpoint": ep,
        "buffer": {"commit_interval_ms": 50, **(buffer or {})},
        "status": {"listen": "off", **(status or {})},
    }
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    for source in sources:
        lines.append("[[sources]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in source.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def serial_source(port: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "weather",
        "type": "serial",
        "port": str(port),
        "format": "kv",
        "shape": "wide",
        "datasource_id": DATASOURCE,
        **extra,
    }


class AgentProcess:
    """`edge-agent run` as a child process, the way systemd runs it."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """`env`: variables added to this process's environment (NOTIFY_SOCKET...);
        `prefix`: a command that runs the agent and then is it (exec: faketime, unshare)."""
        self.config = config
        self.log_path = log_path
        self.extra = extra
        self.env = env or {}
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                *(sys.executable, "-m", "edge_agent", "run", "--config", str(self.config)),
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        wait_until(lambda: text in self.log_text(), timeout, f"{text!r} in the agent log")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def serial_connected(agent: Agent, name: str = "weather") -> bool:
    """Whether the agent's serial source `name` has its port open."""
    return agent.sources[name].stats.connected
