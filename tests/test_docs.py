"""The README's commands run, in the spirit of sqlite-utils' tests/test_docs.py.

Every ```sh block in README.md is preceded by a marker: `<!-- test: run -->` (each command in it
runs here and must exit 0, or with the status its comment names: `# exit status 3`), or
`<!-- test: skip (why) -->` for what cannot run here (root, systemd, Docker, minutes of work).
A new block without a marker fails, so the docs cannot drift from the code unnoticed.

Every key table of the README (`| key | default | meaning |`) lists exactly the keys of the
config section or class it is under, and every accepted key is in one of them.

The commands run in a scratch directory holding copies of the files they name (configs/,
docker/, Dockerfile, compose.yaml), with the test environment's `edge-agent` and `hadolint`
first on PATH and no token in the environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.config import all_keys
from edge_agent.sources.base import SourceConfig
from edge_agent.sources.registry import source_types
from edge_agent.tables import file_keys

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- test: (run|skip \([^)]+\)) -->")
EXIT = re.compile(r"#.*\bexit status (\d+)")


KEY_TABLE = "| key | default | meaning |"
KEY_ROW = re.compile(r"^\| `([a-z_0-9]+)` \|")


@dataclass(frozen=True)
class Command:
    line: int  # in README.md
    text: str
    expected: int


def blocks(text: str) -> list[tuple[int, str | None, list[tuple[int, str]]]]:
    """(line of the fence, its marker or None, [(line, text)...]) of every ```sh block."""
    lines = text.splitlines()
    found = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            body = []
            j = i + 1
            while lines[j].strip() != "```":
                body.append((j + 1, lines[j]))
                j += 1
            found.append((i + 1, marker[1] if marker else None, body))
            i = j
        i += 1
    return found


def commands(text: str) -> list[Command]:
    out = []
    for _, marker, body in blocks(text):
        if marker != "run":
            continue
        pending: list[str] = []
        start = 0
        for number, line in body:
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending.append(line.rstrip()[:-1])
                continue
            full = " ".join([*pending, line]).strip()
            pending = []
            if full and not full.startswith("#"):
                match = EXIT.search(full)
                out.append(Command(start, full, int(match[1]) if match else 0))
    return out


def test_every_shell_block_says_whether_it_runs() -> None:
    unmarked = [line for line, marker, _ in blocks(README.read_text()) if marker is None]
    assert unmarked == [], f"README.md ```sh blocks without <!-- test: ... --> at {unmarked}"
    assert len(commands(README.read_text())) >= 5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    for name in ("configs", "docker"):
        shutil.copytree(ROOT / name, work / name)
    for name in ("Dockerfile", "compose.yaml"):
        shutil.copy(ROOT / name, work / name)
    return work


@pytest.mark.parametrize(
    "command", commands(README.read_text()), ids=lambda c: f"README line {c.line}"
)
def test_readme_command_runs(command: Command, workdir: Path) -> None:
    tools = str(Path(sys.executable).parent)  # edge-agent and hadolint of this environment
    env = {
        "PATH": tools + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
    }
    proc = subprocess.run(
        ["sh", "-c", command.text],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = f"$ {command.text}\n{proc.stdout}{proc.stderr}"
    assert proc.returncode == command.expected, said
    assert "Traceback" not in proc.stderr, said


def key_tables(text: str) -> dict[tuple[str, int], list[str]]:
    """(heading above it, its number under that heading) -> the keys of each key table."""
    tables: dict[tuple[str, int], list[str]] = {}
    heading, lines = "", text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.strip() == KEY_TABLE:
            n = sum(1 for h, _ in tables if h == heading)
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                key = KEY_ROW.match(row)
                assert key, f"README.md line {row!r}: a key table row starts with | `key` |"
                rows.append(key[1])
            tables[(heading, n)] = rows
    return tables


def documented_keys() -> dict[tuple[str, int], set[str]]:
    """What each key table must list: a section's keys, or a source type's own keys (the
    keys every source takes are in the first `[[sources]]` table, with the serial ones)."""
    keys = all_keys()
    common = set(file_keys(SourceConfig))
    own = {name: set(file_keys(t.config)) - common for name, t in source_types().items()}
    return {
        ("`[agent]`", 0): set(keys["agent"]),
        ("`[endpoint]`", 0): set(keys["endpoint"]),
        ("`[buffer]`", 0): set(keys["buffer"]),
        ("`[status]`", 0): set(keys["status"]),
        ("`[[sources]]` (one table per sensor)", 0): common | own["serial"],
        ("`[[sources]]` (one table per sensor)", 1): own["mqtt"] - own["serial"],
        ("Keys of a Modbus source", 0): own["modbus"],
        ("Keys of a register (`[[sources.registers]]`)", 0): set(keys["sources.registers"]),
        ("Keys of a processor (`[[sources.processors]]`)", 0): set(keys["sources.processors"]),
    }


def test_each_key_table_lists_exactly_the_keys_of_its_section() -> None:
    found = key_tables(README.read_text())
    expected = documented_keys()
    assert set(found) == set(expected), "README key tables moved, or a new one needs a section"
    for where, keys in expected.items():
        listed = found[where]
        assert len(listed) == len(set(listed)), f"{where[0]}: a key is listed twice"
        assert set(listed) - keys == set(), f"{where[0]}: documented keys that do not exist"
        assert keys - set(listed) == set(), f"{where[0]}: keys not documented"


def test_every_accepted_key_is_in_a_key_table() -> None:
    documented = set().union(*key_tables(README.read_text()).values())
    accepted = {key for keys in all_keys().values() for key in keys}
    assert accepted - documented == set(), "keys in no README key table"
