"""The soak script, short: the real agent through every kind of fault, and a clean ledger.

`scripts/soak.py` runs `edge-agent run` as a real process against a pty sensor, a private
Mosquitto and the sandbox, injects each fault kind once (kill -9, broker restart, unplug,
sandbox outage, 503, 429, dropped answers, token rotation, 413, captive portal, trickled
answers, 50 MB answers) and accounts for every reading. About 2.5 minutes;
EDGE_AGENT_SOAK_MINUTES makes it longer (5 or more: seeded random faults instead of one of
each).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from edge_agent.testing.harness import mosquitto_binary

ROOT = Path(__file__).resolve().parent.parent


def _soak_script() -> ModuleType:
    """scripts/soak.py as a module (scripts/ is not a package; importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("soak_script", ROOT / "scripts" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


MINUTES = float(os.environ.get("EDGE_AGENT_SOAK_MINUTES", "1.5"))
SEED = 7
FAULT_KINDS = _soak_script().FAULT_KINDS  # the soak's own list: one place to add a fault


@pytest.mark.slow
def test_soak_accounts_for_every_reading(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        if os.environ.get("EDGE_AGENT_REQUIRE_BROKER") == "1":
            pytest.fail("mosquitto is not installed and EDGE_AGENT_REQUIRE_BROKER=1")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    workdir = tmp_path / "soak"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--minutes",
            str(MINUTES),
            "--seed",
            str(SEED),
            "--workdir",
            str(workdir),
            "--drain-timeout",
            "180",
        ],
        capture_output=True,
        text=True,
        timeout=MINUTES * 60 + 600,
    )
    out = run.stdout
    tail = f"{out[-6000:]}\n--- stderr ---\n{run.stderr[-3000:]}\nworkdir: {workdir}"
    assert run.returncode == 0, tail
    assert re.search(r"^missing: 0$", out, re.M), tail
    assert "result: PASS" in out, tail
    per_kind = re.search(r"per kind: (.*)$", out, re.M)
    assert per_kind is not None, tail
    for kind in FAULT_KINDS:
        assert re.search(rf"\b{kind} [1-9]", per_kind.group(1)), f"{kind} never injected\n{tail}"
