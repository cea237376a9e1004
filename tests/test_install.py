"""scripts/install-raspberrypi.sh run into a throwaway root (--root), and the systemd unit.

Every run passes --root: these tests never touch the real /etc, /opt or systemd. One run does a
real pip install of this checkout; the others use --no-pip and find a virtualenv already there
(made without pip, in a tenth of a second), as a second run of the script does.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
SCRIPT = CHECKOUT / "scripts" / "install-raspberrypi.sh"
UNIT = CHECKOUT / "scripts" / "edge-agent.service"
EXAMPLE = CHECKOUT / "configs" / "serial-sensor.toml"


def install(root: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_TOKEN"}
    env["PYTHON"] = sys.executable
    if token is not None:
        env["EDGE_AGENT_TOKEN"] = token
    done = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, f"install failed:\n{done.stdout}\n{done.stderr}"
    return done


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc/edge-agent"
        self.config = self.etc / "config.toml"
        self.token = self.etc / "token"
        self.data = root / "var/lib/edge-agent"
        self.venv = root / "opt/edge-agent/venv"
        self.unit = root / "etc/systemd/system/edge-agent.service"


def with_venv(root: Path) -> Layout:
    paths = Layout(root)
    venv.create(paths.venv, with_pip=False)
    return paths


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Layout]:
    """A full install with a real pip install of this checkout, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("root")
    install(root, "--source", str(CHECKOUT))
    yield Layout(root)


def test_install_lays_out_files_with_their_modes(installed: Layout) -> None:
    assert installed.config.read_text() == EXAMPLE.read_text()
    assert mode(installed.config) == 0o640
    assert mode(installed.etc) == 0o755
    assert installed.token.read_text() == "", "no token given: an empty file to fill in"
    assert mode(installed.token) == 0o600
    assert installed.data.is_dir()
    assert mode(installed.data) == 0o750
    assert installed.unit.read_text() == UNIT.read_text()
    assert mode(installed.unit) == 0o644
    modules = installed.root / "etc/modules-load.d/edge-agent.conf"
    assert [m for m in modules.read_text().split("\n") if m and not m.startswith("#")] == [
        "usbserial",
        "cdc_acm",
    ]


def test_the_venv_runs_the_installed_agent(installed: Layout) -> None:
    agent = installed.venv / "bin" / "edge-agent"
    done = subprocess.run([str(agent), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("edge-agent ")


def test_systemd_accepts_the_unit(installed: Layout, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # The unit names /opt/edge-agent/venv/bin/edge-agent, which verify requires to exist:
    # point it at the agent installed in the throwaway root, and change nothing else.
    agent = installed.venv / "bin" / "edge-agent"
    text = UNIT.read_text().replace("/opt/edge-agent/venv/bin/edge-agent", str(agent))
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "edge-agent.service" not in done.stderr, done.stderr


def test_unit_settings_the_agent_relies_on() -> None:
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    for setting in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/config.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=60",
        "Restart=on-failure",
        "StartLimitIntervalSec=0",
        "User=edge-agent",
        "SupplementaryGroups=dialout",
        "StateDirectory=edge-agent",
        "DevicePolicy=closed",
        "DeviceAllow=char-ttyUSB rw",
        "DeviceAllow=char-ttyACM rw",
        "TimeoutStopSec=60",
    ]:
        assert setting in lines, setting
    assert not any(line.startswith("PrivateDevices=") for line in lines), (
        "PrivateDevices hides /dev/serial/by-id and hot-plugged adapters"
    )


def test_second_run_is_idempotent_and_keeps_an_edited_config(tmp_path: Path) -> None:
    paths = with_venv(tmp_path / "root")
    install(paths.root, "--no-pip")
    edited = EXAMPLE.read_text().replace('device_id = "gw-001"', 'device_id = "gw-042"')
    paths.config.write_text(edited)
    paths.token.write_text("secret-1\n")
    python = (paths.venv / "bin" / "python").resolve()

    second = install(paths.root, "--no-pip")
    assert "kept the existing" in second.stdout
    assert "virtualenv" in second.stdout and "exists" in second.stdout
    assert paths.config.read_text() == edited
    assert paths.token.read_text() == "secret-1\n"
    assert (paths.venv / "bin" / "python").resolve() == python
    assert mode(paths.config) == 0o640
    assert mode(paths.token) == 0o600


def test_a_given_token_replaces_the_old_one_and_never_shows(tmp_path: Path) -> None:
    paths = with_venv(tmp_path / "root")
    token_file = tmp_path / "token.txt"
    token_file.write_text("  from-file-token\n\n")
    first = install(paths.root, "--no-pip", "--token-file", str(token_file))
    assert paths.token.read_text() == "from-file-token\n"
    assert mode(paths.token) == 0o600
    second = install(paths.root, "--no-pip", token="from-env-token")
    assert paths.token.read_text() == "from-env-token\n"
    assert mode(paths.token) == 0o600
    for done in (first, second):
        assert "token" in done.stdout
        assert "from-file-token" not in done.stdout + done.stderr
        assert "from-env-token" not in done.stdout + done.stderr
    assert [p.name for p in paths.etc.iterdir() if p.name.startswith(".")] == []


def test_uninstall_keeps_config_and_data_and_purge_removes_them(tmp_path: Path) -> None:
    paths = with_venv(tmp_path / "root")
    install(paths.root, "--no-pip")
    (paths.data / "buffer.db").write_bytes(b"unsent readings")

    install(paths.root, "--uninstall")
    assert not paths.unit.exists()
    assert not (paths.root / "etc/modules-load.d/edge-agent.conf").exists()
    assert not paths.venv.exists()
    assert not (paths.root / "opt/edge-agent").exists()
    assert paths.config.exists() and paths.token.exists()
    assert (paths.data / "buffer.db").read_bytes() == b"unsent readings"

    with_venv(paths.root)
    install(paths.root, "--no-pip")  # a reinstall picks the kept files up again
    assert (paths.data / "buffer.db").exists()

    alone = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(paths.root), "--purge"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert alone.returncode != 0 and "only goes with --uninstall" in alone.stderr
    assert paths.config.exists() and paths.data.exists()  # --purge alone touched nothing

    done = install(paths.root, "--uninstall", "--purge")
    assert "purging" in done.stdout
    assert not paths.etc.exists()
    assert not paths.data.exists()
    assert not paths.venv.exists()


def test_unknown_option_fails_with_usage(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(tmp_path), "--frobnicate"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "unknown option: --frobnicate" in done.stderr
    assert "Usage:" in done.stderr


def test_the_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
