"""Credentials never leak: a malformed token or password, a URL with a password, a file others
can read, a config file that is not UTF-8.

Real `edge-agent run` and `check` processes against the sandbox, real files and modes; the
uploader's own error text is checked against a real HTTP server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.buffer import Batch, BatchRow
from edge_agent.config import EndpointConfig, Secret, load_config
from edge_agent.credentials import redact
from edge_agent.errors import ConfigError
from edge_agent.logs import RecentErrors
from edge_agent.sandbox import Sandbox
from edge_agent.simulator import PtySensor
from edge_agent.sources.mqtt.config import MqttConfig
from edge_agent.testing.harness import free_port, run_cli
from edge_agent.uploader import Uploader
from tests.helpers import DATASOURCE, TOKEN, AgentProcess, serial_source, wait_until, write_config
from tests.test_service import edge_agent_status, received_seqs, with_status

# A token whose second line must never be seen anywhere.
SECRET_TAIL = "s3cret-second-line"


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`edge-agent ARGS`; an agent that keeps running instead of exiting fails the test."""
    try:
        return run_cli(*args, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"edge-agent {' '.join(args)} did not exit: {exc.stderr!r}") from None


def config_for(tmp_path: Path, url: str, **kw: Any) -> Path:
    return write_config(
        tmp_path / "agent.toml",
        url=url,
        data_dir=tmp_path / "data",
        sources=[serial_source(tmp_path / "no-such-port")],
        **kw,
    )


def assert_config_error(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("edge-agent: configuration error: "), proc.stderr
    assert proc.stderr.count("\n") == 1, "one line, no traceback"
    for text in expected:
        assert text in proc.stderr, proc.stderr


# -- item 9: the token is one line of printable ASCII -------------------------------------


def test_a_token_file_with_a_line_break_stops_the_agent_naming_the_file_not_the_token(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    token = tmp_path / "token"
    token.write_text(f"{TOKEN}\n{SECRET_TAIL}\n")
    token.chmod(0o600)
    config = config_for(tmp_path, sandbox.url, token_file=token)
    for command in ("run", "check"):
        proc = cli(command, "--config", str(config))
        assert_config_error(proc, f"token_file: {token} holds 2 lines", "alone on one line")
        assert SECRET_TAIL not in proc.stdout + proc.stderr
        assert TOKEN not in proc.stdout + proc.stderr
    assert sandbox.stats()["by_status"] == {}, "no request went out"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"Zx9 Qv\n", "has a space or tab at character 4"),
        (b"Zx9Qv\n\n", "holds 2 lines"),
        (b"Zx9\rQv", "holds 2 lines"),
        (b"Zx9\x1b[2JQv", "has a character that is not printable ASCII at character 4"),
        ("Zx9éQv".encode(), "has a character that is not printable ASCII at character 4"),
        (b"Zx9\xe9Qv", "is not UTF-8 text (byte 4 of the file)"),
    ],
)
def test_a_token_file_that_cannot_be_a_header_is_refused_at_load(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    token = tmp_path / "token"
    token.write_bytes(content)
    config = config_for(tmp_path, "https://api.example.com/restapi/datasource/insert")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert f"[endpoint] token_file: {token} {expected}" in str(info.value)
    assert "Zx9" not in str(info.value) and "Qv" not in str(info.value)


def special_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A path that must never be read whole, and what the error says about it."""
    path = tmp_path / f"secret-{kind}"
    if kind == "zero":
        path.symlink_to("/dev/zero")  # links are followed: what counts is where they lead
        return path, "is a character device, not a regular file"
    if kind == "urandom":
        return Path("/dev/urandom"), "is a character device, not a regular file"
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: opening it for reading would wait for ever
        return path, "is a FIFO (named pipe), not a regular file"
    if kind == "huge":
        with path.open("wb") as f:
            f.truncate(1 << 30)  # 1 GB, sparse: takes no disk
        return path, "is 1,073,741,824 bytes, more than the 64 KiB allowed"
    assert kind == "directory"
    path.mkdir()
    return path, "is a directory, not a regular file"


@pytest.mark.parametrize("kind", ["zero", "urandom", "fifo", "huge", "directory"])
def test_a_token_file_that_is_a_device_a_fifo_or_huge_stops_run_and_check_at_once(
    tmp_path: Path, kind: str
) -> None:
    token, what = special_file(tmp_path, kind)
    config = config_for(tmp_path, "https://api.example.com/restapi/datasource/insert",
                        token_file=token)  # fmt: skip
    for command in ("run", "check"):
        proc = cli(command, "--config", str(config))
        assert_config_error(
            proc, f"[endpoint] token_file: {token} {what}", "holds the token on one line"
        )


def mqtt_config(tmp_path: Path, password: Path) -> Path:
    """A config with one MQTT source whose password is read from `password`."""
    mqtt = {
        "name": "plant",
        "type": "mqtt",
        "broker": "mqtt://127.0.0.1:1883",
        "topics": ["sensors/#"],
        "datasource_id": DATASOURCE,
        "username": "agent",
        "password_file": str(password),
    }
    return write_config(
        tmp_path / "agent.toml",
        url="https://api.example.com/restapi/datasource/insert",
        data_dir=tmp_path / "data",
        sources=[mqtt],
    )


@pytest.mark.parametrize("kind", ["urandom", "fifo", "huge"])
def test_an_mqtt_password_file_that_is_a_device_a_fifo_or_huge_is_refused(
    tmp_path: Path, kind: str
) -> None:
    password, what = special_file(tmp_path, kind)
    config = mqtt_config(tmp_path, password)
    proc = cli("check", "--config", str(config))
    assert_config_error(proc, f"password_file: {password} {what}", "holds the password on one line")


@pytest.mark.parametrize("kind", ["zero", "fifo", "directory", "big"])
def test_a_config_path_that_is_a_device_a_fifo_or_too_big_is_a_configuration_error(
    tmp_path: Path, kind: str
) -> None:
    if kind == "big":
        config = config_for(tmp_path, "https://api.example.com/restapi/datasource/insert")
        with config.open("a") as f:
            f.write(("# " + "x" * 1000 + "\n") * 5000)  # 5 MB of comments
        what = f"is {config.stat().st_size:,} bytes, more than the 4 MiB allowed"
    else:
        config, what = special_file(tmp_path, kind)
    for command in ("run", "check", "status"):
        proc = cli(command, "--config", str(config))
        assert_config_error(proc, f"{config}: {what}", "the agent's TOML configuration file")


def test_a_token_variable_with_a_line_break_is_refused_naming_the_variable(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, "https://api.example.com/restapi/datasource/insert")
    text = config.read_text().replace(f'token_file = "{tmp_path / "token"}"', 'token_env = "TOK"')
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(config, environ={"TOK": f"{TOKEN}\n{SECRET_TAIL}"})
    assert "token_env: the environment variable TOK holds 2 lines" in str(info.value)
    assert SECRET_TAIL not in str(info.value)
    # One final line break, as `$(cat file)` or an editor leaves it, is not part of it.
    assert load_config(config, environ={"TOK": TOKEN + "\n"}).token.reveal() == TOKEN


def test_an_mqtt_password_file_with_a_line_break_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    password = tmp_path / "mqtt-password"
    password.write_text(f"pass word\n{SECRET_TAIL}\n")
    config = mqtt_config(tmp_path, password)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert f"password_file: {password} holds 2 lines" in str(info.value)
    assert SECRET_TAIL not in str(info.value)
    password.write_text("pass wörd\n")  # spaces and any script are fine in a password
    (source,) = load_config(config).sources
    assert isinstance(source, MqttConfig)
    assert source.password is not None and source.password.reveal() == "pass wörd"


def test_a_bad_token_written_while_running_keeps_the_previous_one_and_never_shows(
    tmp_path: Path, sandbox: Sandbox, pty_sensor: PtySensor
) -> None:
    port = free_port()
    config = with_status(
        write_config(
            tmp_path / "agent.toml",
            url=sandbox.url,
            data_dir=tmp_path / "data",
            sources=[serial_source(pty_sensor.link, reopen_backoff_max_s=1.0)],
        ),
        port,
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        agent.wait_log("serial weather: reading")
        pty_sensor.start()
        wait_until(lambda: len(received_seqs(sandbox)) >= 20, what="the first readings")

        # The server moves to a new token; the operator writes it with a second line.
        sandbox.set_tokens(["token-2"])
        wait_until(lambda: sandbox.stats()["by_status"].get("401"), what="a 401")
        (tmp_path / "token").write_text(f"token-2\n{SECRET_TAIL}\n")
        agent.wait_log("the token was not re-read, keeping the previous one")
        # The file is read again every second while paused: the problem is said once.
        agent.wait_log("agent: status page on")
        status_doc = httpx.get(f"http://127.0.0.1:{port}/status.json", timeout=5).text
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
        cli_status = edge_agent_status(config, "--json").stdout
        log_text = agent.log_text()
        assert log_text.count("the token was not re-read") == 1, log_text
        assert f"token_file: {tmp_path / 'token'} holds 2 lines" in log_text
        assert sandbox.stats()["by_status"]["401"] == 1, "the bad token was never sent"
        for shown in (log_text, status_doc, page, cli_status):
            assert SECRET_TAIL not in shown
            assert "Bearer token" not in shown

        # Fixed: the new token is taken and everything read meanwhile arrives.
        (tmp_path / "token").write_text("token-2\n")
        agent.wait_log("uploader: the token changed; retrying now")
        pty_sensor.stop()
        last = pty_sensor.written - 1
        wait_until(lambda: last in received_seqs(sandbox), what=f"the last line, seq {last}")
        assert not set(range(pty_sensor.written)) - received_seqs(sandbox)
        assert SECRET_TAIL not in agent.log_text()
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


def test_an_unsendable_token_never_reaches_the_answer_text(tmp_path: Path) -> None:
    """Defence in depth, should a bad token get past the checks: httpx's error quotes the
    header it refused, and that text must not become the uploader's error."""
    sandbox = Sandbox(tokens=[TOKEN], datasources=[DATASOURCE], db_path=tmp_path / "sbx.db")
    sandbox.start()
    try:
        endpoint = EndpointConfig(url=sandbox.url, token_file="unused", timeout_s=5.0)
        # No buffer: this test only sends one batch by hand.
        uploader = Uploader(endpoint, Secret(f"{TOKEN}\n{SECRET_TAIL}"), buffer=None)  # type: ignore[arg-type]
        record = json.dumps({"timestamp": "2024-01-01T00:00:00Z", "value": 1})
        batch = Batch(DATASOURCE, 1, (BatchRow(1, record),), time.time())
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            answer = uploader.send_batch(client, batch)
        assert answer.status is None
        assert SECRET_TAIL not in answer.message and "Bearer" not in answer.message
        assert "check the token" in answer.message
    finally:
        sandbox.stop()


def test_log_lines_and_recent_errors_never_show_what_follows_bearer() -> None:
    errors = RecentErrors()
    logger = logging.getLogger("edge_agent.test_credentials")
    logger.addHandler(errors)
    try:
        logger.error("uploader: failed: Illegal header value b'Bearer abc\\ndef'")
    finally:
        logger.removeHandler(errors)
    (line,) = errors.lines()
    assert line["message"] == "failed: Illegal header value b'Bearer [redacted]"
    assert redact("see https://user:pw@host/x") == "see https://[redacted]@host/x"
    assert redact("expected: Bearer <token>)") == "expected: Bearer <token>)"


# -- item 10: no credentials in the endpoint URL ------------------------------------------


def test_credentials_in_the_endpoint_url_stop_run_and_check(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    url = sandbox.url.replace("http://", "http://admin:hunter2pw@")
    config = config_for(tmp_path, url)
    for command in ("run", "check"):
        proc = cli(command, "--config", str(config))
        assert_config_error(proc, "[endpoint] url: holds a user name or password", "token_file")
        assert "hunter2pw" not in proc.stdout + proc.stderr
    assert sandbox.stats()["by_status"] == {}


# -- item 11: warnings about how a credential travels and is stored -----------------------


def mqtt_source(password_file: Path) -> dict[str, Any]:
    return {
        "name": "plant",
        "type": "mqtt",
        "broker": "mqtt://192.0.2.20:1883",
        "topics": ["sensors/#"],
        "datasource_id": DATASOURCE,
        "username": "agent",
        "password_file": str(password_file),
    }


def check_warnings(config: Path) -> list[str]:
    out = cli("check", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert TOKEN not in out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith("warning: ")]


def test_check_warns_of_a_plain_text_token_unchecked_tls_and_readable_secret_files(
    tmp_path: Path,
) -> None:
    token, password = tmp_path / "token", tmp_path / "mqtt-password"
    token.write_text(TOKEN + "\n")
    password.write_text("pw\n")
    token.chmod(0o644)
    password.chmod(0o640)

    def config(url: str, broker: str, **endpoint: Any) -> Path:
        source = {**mqtt_source(password), "broker": broker}
        return write_config(
            tmp_path / "agent.toml",
            url=url + "/restapi/datasource/insert",
            data_dir=tmp_path / "data",
            sources=[source],
            token_file=token,
            endpoint=endpoint,
        )

    exposed = "\n".join(check_warnings(config("http://192.0.2.10", "mqtt://192.0.2.20")))
    assert "[endpoint] url: http:// to 192.0.2.10 sends the token in plain text" in exposed
    assert f"token_file: {token} can be read or changed by other users (mode 0644)" in exposed
    assert f"password_file: {password} can be read or changed by other users (mode 0640)" in (
        exposed
    )
    assert "mqtt:// to 192.0.2.20 sends the password in plain text" in exposed
    assert "chmod 600" in exposed

    unchecked = check_warnings(config("https://192.0.2.10", "mqtts://h", verify_tls=False))
    assert any("verify_tls = false: the server's certificate is not checked" in w
               for w in unchecked)  # fmt: skip
    assert not any("plain text" in w for w in unchecked)

    # As installed (0600 files, https with its certificate checked, a local broker): quiet.
    token.chmod(0o600)
    password.chmod(0o600)
    for broker in ("mqtt://127.0.0.1", "mqtt://localhost", "mqtts://broker.example"):
        assert check_warnings(config("https://192.0.2.10", broker)) == []
    assert check_warnings(config("http://127.0.0.1:8080", "mqtt://[::1]:1883")) == []


def test_the_agent_warns_once_at_start_of_a_token_file_others_can_read(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o644)
    config = config_for(tmp_path, sandbox.url, token_file=token)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        agent.wait_log("agent: started")
        agent.signal(signal.SIGHUP)
        agent.wait_log("configuration reloaded")
        warning = f"token_file: {token} can be read or changed by other users (mode 0644)"
        assert agent.log_text().count(warning) == 1, agent.log_text()
        assert "chmod 600" in agent.log_text()
        assert "plain text" not in agent.log_text(), "the sandbox is on this machine"
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


# -- item 12: a config file that is not UTF-8 ---------------------------------------------


def test_a_config_file_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    config = config_for(tmp_path, "https://api.example.com/restapi/datasource/insert")
    text = config.read_bytes()
    latin1 = text.replace(b"[agent]\n", b"[agent]\n# Station M\xfcnchen\n", 1)
    config.write_bytes(latin1)
    offset = latin1.index(b"\xfc")
    for command in ("run", "check", "status"):
        proc = cli(command, "--config", str(config))
        assert_config_error(
            proc,
            f"{config}: not UTF-8 text: byte 0xfc at offset {offset} (line 2, column 12)",
            "save the file as UTF-8",
        )
        assert "Traceback" not in proc.stderr


def test_a_config_file_with_a_utf8_byte_order_mark_loads(tmp_path: Path) -> None:
    config = config_for(tmp_path, "https://api.example.com/restapi/datasource/insert")
    (tmp_path / "token").write_text(TOKEN + "\n")
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())  # Notepad's "UTF-8 with BOM"
    assert load_config(config).endpoint.url.startswith("https://api.example.com/")
    proc = cli("check", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_utf16_config_file_says_save_it_as_utf8(tmp_path: Path, encoding: str) -> None:
    config = config_for(tmp_path, "https://api.example.com/restapi/datasource/insert")
    config.write_bytes(config.read_text().encode(encoding))  # Windows Notepad's "Unicode"
    name = "UTF-32" if encoding == "utf-32" else "UTF-16"
    for command in ("run", "check", "status"):
        proc = cli(command, "--config", str(config))
        assert_config_error(proc, f"{config}: is {name} text", "save it as UTF-8")
        assert "not valid TOML" not in proc.stderr and "not UTF-8 text: byte" not in proc.stderr
