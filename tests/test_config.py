"""Config files: the issue's example is accepted as written; every mistake gets a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_agent.config import Secret, load_config
from edge_agent.errors import ConfigError
from edge_agent.sources.serial.config import SerialConfig
from edge_agent.testing.harness import run_cli

ROOT = Path(__file__).resolve().parent.parent

ISSUE_EXAMPLE = """\
[agent]
data_dir = "/var/lib/edge-agent"      # buffer.db lives here; created if missing
device_id = "gw-001"                  # optional; added to every record as "device_id"

[endpoint]
url = "https://api.example.com/restapi/datasource/insert"
token_env = "MADEVO_TOKEN"            # or: token_file = "/etc/edge-agent/token"
max_batch_records = 500
max_batch_bytes = 1_000_000
flush_interval_s = 2.0                # send a partial batch after this long
timeout_s = 10.0

[buffer]
max_bytes = 268_435_456
when_full = "drop_oldest"             # or "drop_newest"
commit_interval_ms = 200

[[sources]]
name = "weather"
type = "serial"
port = "/dev/ttyUSB0"
baudrate = 9600
format = "kv"                         # json | kv | csv | regex | number
datasource_id = "67890"
"""
ENV = {"MADEVO_TOKEN": "s3cret-token-value"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=ENV if env is None else env)
    return str(info.value)


def test_issue_example_is_accepted_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE_EXAMPLE), environ=ENV)
    assert config.agent.device_id == "gw-001"
    assert config.endpoint.max_batch_bytes == 1_000_000
    assert config.buffer.when_full == "drop_oldest"
    (source,) = config.sources
    assert isinstance(source, SerialConfig)
    assert (source.name, source.type, source.port, source.format) == (
        "weather",
        "serial",
        "/dev/ttyUSB0",
        "kv",
    )
    assert config.token.reveal() == "s3cret-token-value"
    assert config.buffer_path == Path("/var/lib/edge-agent/buffer.db")


def test_token_never_in_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE_EXAMPLE), environ=ENV)
    assert "s3cret" not in repr(config)
    assert "s3cret" not in str(config.token)
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("max_batch_records = 500", "max_batch_record = 500"),
         r"\[endpoint\]: unknown key 'max_batch_record'; did you mean 'max_batch_records'\?"),
        (("baudrate = 9600", "baud_rate = 9600"),
         r"\[\[sources\]\] #1 \(weather\): unknown key 'baud_rate'; did you mean 'baudrate'\?"),
        (("timeout_s = 10.0", 'timeout_s = "ten"'),
         r"\[endpoint\] timeout_s: expected a number, got 'ten'"),
        (('when_full = "drop_oldest"', 'when_full = "drop_all"'),
         r"when_full: expected one of 'drop_oldest' \| 'drop_newest' \| 'block', got 'drop_all'"),
        (('format = "kv"', 'format = "xml"'), r"format: expected one of 'json'"),
        (("max_batch_records = 500", "max_batch_records = 0"),
         r"max_batch_records: expected a value from 1 to 100000, got 0"),
        (("timeout_s = 10.0", "timeout_s = 10.0\npoison_attempts = 1"),
         r"\[endpoint\] poison_attempts: expected a value from 2 to 10000, got 1"),
        (("timeout_s = 10.0", "timeout_s = 10.0\npoison_min_age_s = -1"),
         r"\[endpoint\] poison_min_age_s: expected a value from 0 to"),
        (('type = "serial"', 'type = "canbus"'), r"type: expected one of 'serial' \| 'mqtt'"),
        (('port = "/dev/ttyUSB0"\n', ""), r"port: missing"),
        (('url = "https://api.example.com/restapi/datasource/insert"', 'url = "ftp://x"'),
         r"url: expected an http:// or https:// URL"),
        (("[buffer]", "[bufer]"), r"top level: unknown key 'bufer'; did you mean 'buffer'\?"),
        (('token_env = "MADEVO_TOKEN"', 'token_env = "OTHER_TOKEN"'),
         r"environment variable OTHER_TOKEN is not set"),
        (("commit_interval_ms = 200", "commit_interval_ms = 200\ncommit_interval_ms = 300"),
         r"not valid TOML"),
    ],
)  # fmt: skip
def test_bad_files_name_file_key_and_fix(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    text = ISSUE_EXAMPLE.replace(*change)
    assert text != ISSUE_EXAMPLE
    message = error_of(tmp_path, text)
    assert str(tmp_path / "agent.toml") in message
    assert re.search(expected, message), message


def test_both_or_no_token_settings(tmp_path: Path) -> None:
    both = ISSUE_EXAMPLE.replace("timeout_s = 10.0", 'timeout_s = 10.0\ntoken_file = "/x"')
    assert "exactly one of token_env" in error_of(tmp_path, both)
    none = ISSUE_EXAMPLE.replace('token_env = "MADEVO_TOKEN"', "")
    assert "exactly one of token_env" in error_of(tmp_path, none)


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    text = ISSUE_EXAMPLE.replace('token_env = "MADEVO_TOKEN"', f'token_file = "{token}"')
    assert "cannot read" in error_of(tmp_path, text)
    token.write_text("\n")
    assert "is empty" in error_of(tmp_path, text)
    token.write_text("from-file\n")
    assert load_config(write(tmp_path, text), environ={}).token.reveal() == "from-file"


def test_source_mistakes(tmp_path: Path) -> None:
    csv = ISSUE_EXAMPLE.replace('format = "kv"', 'format = "csv"')
    assert 'format "csv" needs columns' in error_of(tmp_path, csv)
    regex = ISSUE_EXAMPLE.replace('format = "kv"', 'format = "regex"\npattern = "(unclosed"')
    assert "pattern" in error_of(tmp_path, regex)
    no_group = ISSUE_EXAMPLE.replace('format = "kv"', 'format = "regex"\npattern = "[0-9]+"')
    assert "named group" in error_of(tmp_path, no_group)
    twice = ISSUE_EXAMPLE + ISSUE_EXAMPLE[ISSUE_EXAMPLE.index("[[sources]]") :]
    assert "used twice" in error_of(tmp_path, twice)
    no_sources = ISSUE_EXAMPLE[: ISSUE_EXAMPLE.index("[[sources]]")]
    assert "no [[sources]]" in error_of(tmp_path, no_sources)
    tags = ISSUE_EXAMPLE.replace('format = "kv"', 'format = "kv"\ntags = { site = "north" }')
    assert dict(load_config(write(tmp_path, tags), environ=ENV).sources[0].tags) == {
        "site": "north"
    }


def test_cli_exit_status_2_with_one_clear_line(tmp_path: Path) -> None:
    path = write(tmp_path, ISSUE_EXAMPLE.replace("baudrate", "baudrat"))
    for command in ("run", "check"):
        proc = run_cli(
            command, "--config", str(path), env={"MADEVO_TOKEN": "x", "PATH": "/usr/bin:/bin"}
        )
        assert proc.returncode == 2, proc.stderr
        assert "unknown key 'baudrat'; did you mean 'baudrate'?" in proc.stderr
        assert proc.stderr.count("\n") == 1


def test_check_describes_without_the_token(tmp_path: Path) -> None:
    path = write(tmp_path, ISSUE_EXAMPLE)
    env = {"MADEVO_TOKEN": "s3cret-token-value", "PATH": "/usr/bin:/bin"}
    proc = run_cli("check", "--config", str(path), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "source weather: serial /dev/ttyUSB0 at 9600 baud" in proc.stdout
    assert "POST https://api.example.com/restapi/datasource/insert" in proc.stdout
    assert "s3cret" not in proc.stdout + proc.stderr


def test_example_configs_load(tmp_path: Path) -> None:
    examples = sorted((ROOT / "configs").glob("*.toml"))
    assert examples, "configs/ has no examples"
    token = tmp_path / "token"
    token.write_text("t\n")
    for example in examples:
        text = example.read_text().replace("/etc/edge-agent/token", str(token))
        path = tmp_path / example.name
        path.write_text(text)
        config = load_config(path, environ={"MADEVO_TOKEN": "t", "MQTT_PASSWORD": "p"})
        assert config.sources, example.name


# -- ${VAR} templating ---------------------------------------------------------------------

TEMPLATED = """\
# a fleet template: ${NOT_EXPANDED_IN_COMMENTS}
[agent]
data_dir = "${DATA_ROOT:-/var/lib}/edge-agent"
device_id = "${GATEWAY_ID}"

[endpoint]
url = "https://${MADEVO_HOST:-api.example.com}/restapi/datasource/insert"
token_env = "MADEVO_TOKEN"

[[sources]]
name = "weather"
type = "serial"
port = "${PORT}"
format = "regex"
pattern = "T=(?P<t>[-0-9.]+) cost=$${PRICE}"
datasource_id = "67890"
tags = { site = "${SITE:-north}", "${KEY_NOT_EXPANDED}" = "x" }
"""


def test_variables_are_expanded_in_string_values(tmp_path: Path) -> None:
    env = {**ENV, "GATEWAY_ID": "gw-042", "PORT": "/dev/ttyAMA0", "MADEVO_HOST": ""}
    config = load_config(write(tmp_path, TEMPLATED), environ=env)
    assert config.agent.device_id == "gw-042"
    assert config.agent.data_dir == "/var/lib/edge-agent"  # unset: the default
    assert config.endpoint.url.startswith("https://api.example.com/")  # empty: the default
    source = config.sources[0]
    assert isinstance(source, SerialConfig)
    assert source.port == "/dev/ttyAMA0"
    assert source.pattern == "T=(?P<t>[-0-9.]+) cost=${PRICE}"
    # Keys are never expanded, values in inline tables are.
    assert dict(source.tags) == {"site": "north", "${KEY_NOT_EXPANDED}": "x"}


def test_a_value_cannot_break_the_toml_around_it(tmp_path: Path) -> None:
    env = {**ENV, "GATEWAY_ID": 'gw"\n[endpoint]\nurl = "http://evil', "PORT": "/dev/x"}
    config = load_config(write(tmp_path, TEMPLATED), environ=env)
    assert config.agent.device_id == 'gw"\n[endpoint]\nurl = "http://evil'
    assert config.endpoint.url.startswith("https://api.example.com/")


def test_an_unset_variable_names_the_file_line_and_variable(tmp_path: Path) -> None:
    message = error_of(tmp_path, TEMPLATED, {**ENV, "PORT": "/dev/x"})
    path = tmp_path / "agent.toml"
    assert message.startswith(f"{path}: line 4: the environment variable GATEWAY_ID is not set")
    assert "${GATEWAY_ID:-value}" in message


def test_comments_are_not_expanded_and_a_malformed_reference_is_named(tmp_path: Path) -> None:
    env = {**ENV, "GATEWAY_ID": "g", "PORT": "/dev/x"}
    load_config(write(tmp_path, TEMPLATED), environ=env)  # the comment's ${...} is left alone
    broken = TEMPLATED.replace('"${PORT}"', '"${PORT"')
    message = error_of(tmp_path, broken, env)
    assert f"{tmp_path / 'agent.toml'}: line 13: '${{PORT'" in message
    assert "is not a variable reference" in message


def test_the_cli_reports_an_unset_variable_as_a_configuration_error(tmp_path: Path) -> None:
    path = write(tmp_path, TEMPLATED)
    env = {"MADEVO_TOKEN": "x", "GATEWAY_ID": "g", "PATH": "/usr/bin:/bin"}
    proc = run_cli("check", "--config", str(path), env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"edge-agent: configuration error: {path}: line 13: the environment variable PORT is "
        "not set (in ${PORT}); set it in the agent's environment (for the service: `systemctl "
        "edit edge-agent`, Environment=PORT=...), or give a default: ${PORT:-value}\n"
    )
