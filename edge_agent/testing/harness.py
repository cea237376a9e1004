"""The one harness of the tests, scripts/soak.py and scripts/bench*.py: free ports, config
files, a private Mosquitto, a QoS 1 publisher that counts PUBACKs, and `edge-agent run` as a
child process. Imported by all of them, never copied; the agent itself never imports it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TOKEN = "test-token"
DATASOURCE = "67890"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.1) -> bool:
    """Poll until `predicate()` is truthy; False once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True


class PeakSampler:
    """Inside `with`: calls `measure` every `interval` s in its own thread; keeps the largest."""

    def __init__(self, measure: Callable[[], int], interval: float = 0.2) -> None:
        self.measure = measure
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.measure())
            self.samples += 1


# --- config files -----------------------------------------------------------------------------


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


def toml_tables(tables: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """TOML text of (header, table) pairs, e.g. ("[agent]", {...}), ("[[sources]]", {...})."""
    lines: list[str] = []
    for header, table in tables:
        lines.append(header)
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


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
    Keys whose value is None in the four sections are left out (their defaults apply).
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
    tables = [
        (f"[{name}]", {k: v for k, v in table.items() if v is not None})
        for name, table in sections.items()
    ]
    path.write_text(toml_tables(tables + [("[[sources]]", source) for source in sources]))
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


# --- a private Mosquitto ----------------------------------------------------------------------


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )


class Mosquitto:
    """A private broker on a free port; `restart` keeps the port (and its persistence)."""

    def __init__(
        self,
        workdir: Path,
        binary: str,
        *,
        allow_anonymous: bool = True,
        persistence: bool = True,
        port: int | None = None,
        extra_conf: str = "",
    ) -> None:
        """`extra_conf`: more mosquitto.conf lines (a password file, a plugin, log_type all,
        max_inflight_messages). Without `persistence` sessions live in the broker's memory."""
        self.workdir = workdir
        self.binary = binary
        self.port = free_port() if port is None else port
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        # Started as root, mosquitto switches to the `mosquitto` user, which cannot write its
        # log and persistence file in our directory: stay root instead.
        as_root = "user root\n" if os.geteuid() == 0 else ""
        persist = f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
        self.conf.write_text(
            as_root + f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            + (persist if persistence else "")
            + "max_queued_messages 0\n"
            f"log_dest file {workdir}/mosquitto.log\n" + extra_conf
        )

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_for(lambda: listening(self.port), 10, 0.05):
            self.stop()
            raise RuntimeError(f"mosquitto did not listen on {self.port} (see {self.log_path})")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def restart(self) -> None:
        self.stop()
        self.start()


# --- a QoS 1 publisher ------------------------------------------------------------------------


class Publisher:
    """Publishes at QoS 1 and counts PUBACKs; paho resends what is unacknowledged on reconnect.

    `on_ack(mid)` runs on paho's thread for each PUBACK (a PUBACK can come before `publish`
    returned its mid). `max_inflight` 0: no limit in paho (bound the queue with `wait_room`).
    """

    def __init__(
        self,
        broker: Mosquitto,
        client_id: str = "test-publisher",
        *,
        reconnect_delay: tuple[int, int] = (1, 1),
        max_inflight: int | None = None,
        on_ack: Callable[[int], None] | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._cond = threading.Condition()
        self._sent = 0
        self._acked = 0
        self._on_ack = on_ack
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id)
        self.client.reconnect_delay_set(*reconnect_delay)
        if max_inflight is not None:
            self.client.max_inflight_messages_set(max_inflight)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_publish(self, client: object, userdata: object, mid: int, *rest: object) -> None:
        if self._on_ack is not None:
            self._on_ack(mid)
        with self._cond:
            self._acked += 1
            self._cond.notify_all()

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> int:
        """Hands the message to paho (queued while disconnected); returns its mid."""
        # Not under self._cond: paho calls on_publish holding its own lock.
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        with self._cond:
            self._sent += 1
        return mid

    def acked(self) -> int:
        with self._cond:
            return self._acked

    def unacked(self) -> int:
        with self._cond:
            return self._sent - self._acked

    def wait_room(self, most_unacked: int, timeout: float) -> bool:
        """Waits until at most `most_unacked` messages await their PUBACK."""
        with self._cond:
            return self._cond.wait_for(lambda: self._sent - self._acked <= most_unacked, timeout)

    def wait_acked(self, timeout: float = 30) -> None:
        if not self.wait_room(0, timeout):
            raise TimeoutError(
                f"PUBACK for {self.acked()} of {self._sent} messages after {timeout} s"
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.on_publish = None  # no cycle: paho's sockets close when it is collected


def run_cli(
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`edge-agent ARGS` (this interpreter's) run to its end, its output captured as text;
    `env`: the whole environment (default: this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


# --- the agent as a process -------------------------------------------------------------------


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
        `prefix`: a command that runs the agent and then is it (exec: faketime, unshare,
        a CPU confinement)."""
        self.config = config
        self.log_path = log_path
        self.extra = extra
        self.env = env or {}
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log:
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
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        if not wait_for(lambda: text in self.log_text(), timeout, 0.05):
            raise AssertionError(f"timed out after {timeout} s waiting for {text!r} in the log")

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
