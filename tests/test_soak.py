"""The soak script, short: the real agent through every kind of fault, and a clean ledger.

`scripts/soak.py` runs `edge-agent run` as a real process against a pty sensor, a private
Mosquitto and the sandbox, injects each fault kind once (kill -9, broker restart, unplug,
sandbox outage, 503, 429, dropped answers, token rotation, 413) and accounts for every
reading. About 2 minutes; EDGE_AGENT_SOAK_MINUTES makes it longer (5 or more: seeded random
faults instead of one of each).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _mosquitto_binary

ROOT = Path(__file__).resolve().parent.parent
MINUTES = float(os.environ.get("EDGE_AGENT_SOAK_MINUTES", "1.5"))
SEED = 7
FAULT_KINDS = (
    "kill9",
    "broker_restart",
    "serial_unplug",
    "sandbox_outage",
    "burst_503",
    "throttle_429",
    "drop_after_commit",
    "token_rotation",
    "limit_413",
)


@pytest.mark.slow
def test_soak_accounts_for_every_reading(tmp_path: Path) -> None:
    if _mosquitto_binary() is None:
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
