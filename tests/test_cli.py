"""The command line: --help documents every option and the exit codes; `check` on the shipped
example configurations, with and without their secrets."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import __version__
from edge_agent.cli import EXIT_CODES, _parser
from edge_agent.testing.harness import run_cli

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(
        *args, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}, cwd=ROOT
    )


def parsers(
    parser: argparse.ArgumentParser, name: str = "edge-agent"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_a_help_line() -> None:
    undocumented = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in parsers(_parser())
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and not (action.help or "").strip()
    ]
    assert undocumented == []


def test_help_lists_the_exit_codes_for_every_command() -> None:
    for name, parser in parsers(_parser()):
        assert EXIT_CODES in parser.format_help(), name
    proc = cli("status", "--help")
    assert proc.returncode == 0
    for code in ("0  success", "1  a runtime failure", "2  a configuration or usage error",
                 "3  status: the agent is not running", "4  status: the agent runs"):  # fmt: skip
        assert code in proc.stdout, code


def test_one_version_string() -> None:
    from importlib.metadata import version

    assert version("edge-agent") == __version__
    assert cli("--version").stdout == f"edge-agent {__version__}\n"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_check_validates_a_shipped_config_without_its_secrets(config: Path) -> None:
    """No token file, no MADEVO_TOKEN: everything else is still checked and described."""
    strict = cli("check", "--config", str(config))
    assert strict.returncode == 2, strict.stdout + strict.stderr
    assert "the agent would not start: 1 secret(s) missing or unreadable" in strict.stdout
    assert "upload: POST " in strict.stdout  # described anyway
    assert strict.stderr.startswith("edge-agent: configuration error: ")
    assert "token" in strict.stderr

    relaxed = cli("check", "--no-secrets", "--config", str(config))
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert relaxed.stderr == ""
    warnings = [line for line in relaxed.stdout.splitlines() if "secret not available" in line]
    assert len(warnings) == 1 and "token" in warnings[0], relaxed.stdout


def test_check_still_refuses_a_mistake_elsewhere_without_secrets(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        (ROOT / "configs" / "serial-sensor.toml").read_text().replace("baudrate", "baud")
    )
    proc = cli("check", "--no-secrets", "--config", str(bad))
    assert proc.returncode == 2
    assert "unknown key 'baud'; did you mean 'baudrate'?" in proc.stderr


def test_check_with_its_secrets_is_ok(tmp_path: Path) -> None:
    config = ROOT / "configs" / "sandbox-rehearsal.toml"
    proc = cli("check", "--config", str(config), env={"MADEVO_TOKEN": "rehearsal-token"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{config}: OK\n")
    assert "status page: http://127.0.0.1:9109/" in proc.stdout
    assert "rehearsal-token" not in proc.stdout + proc.stderr
