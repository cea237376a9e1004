#!/usr/bin/env python3
"""Registers per second and CPU per poll of the Modbus source, against a bare pymodbus loop.

    .venv/bin/python scripts/bench_modbus.py [--polls 500] [--rounds 2] [--json out.json]

Starts the test slave (edge_agent.testing.modbus_slave) on a pseudo-terminal, fills 100
holding registers, then alternates, for --rounds rounds:

- bare: pymodbus's ModbusSerialClient reading the same 100 holding registers in a loop,
  `--polls` times: the ceiling for this library on this machine;
- agent: the ModbusSource polling the same 100 registers (100 uint16 values, long shape, one
  reading each) back to back (poll_interval_s 1e-9, below what a config may set: every
  poll overruns the grid and the next starts at once), into an in-memory intake that only
  counts, until it has made `--polls` polls.

Both in this process, one after the other, against the same slave. CPU is this process's
(time.process_time: every thread; the slave is another process). The table compares the
best round of each (the highest rate, the lowest CPU per poll), so that load from elsewhere
on a shared machine during one round does not decide the ratio. Targets: agent/bare rate
>= 0.8, CPU per poll within 1.5x.

`measure()` is the importable entry (scripts/bench.py's hook); stdout holds one markdown
table and the figures; --json also writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pymodbus.client import ModbusSerialClient

from edge_agent.sources.modbus.config import ModbusConfig
from edge_agent.sources.modbus.link import LinkPool
from edge_agent.sources.modbus.source import ModbusSource
from edge_agent.testing.intake import MemoryIntake
from edge_agent.testing.modbus_slave import SlaveProcess

REGISTERS = 100
BAUDRATE = 115_200  # a pty ignores it; pymodbus derives its polling interval from it


def bare_round(link: Path, polls: int) -> dict[str, float]:
    client = ModbusSerialClient(str(link), baudrate=BAUDRATE, timeout=1.0, retries=0)
    if not client.connect():
        raise RuntimeError(f"bare client cannot open {link}")
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(polls):
            response = client.read_holding_registers(0, count=REGISTERS, device_id=1)
            if response.isError() or len(response.registers) != REGISTERS:
                raise RuntimeError(f"bare read failed: {response}")
        return _figures(polls, time.perf_counter() - wall, time.process_time() - cpu)
    finally:
        client.close()  # type: ignore[no-untyped-call]


def agent_round(link: Path, polls: int) -> dict[str, float]:
    table = {
        "name": "bench",
        "type": "modbus",
        "datasource_id": "1",
        "transport": "rtu",
        "port": str(link),
        "baudrate": BAUDRATE,
        "timeout_s": 1.0,
        "registers": [{"name": f"r{i}", "address": i, "type": "uint16"} for i in range(REGISTERS)],
    }
    # Below the config's minimum, so that the grid adds no wait between polls: back to back.
    config = ModbusConfig.from_table(table, "bench", "[[sources]] #1")
    config = replace(config, poll_interval_s=1e-9)
    intake = MemoryIntake(keep=False)
    source = ModbusSource(config, "gw-bench", intake, links=LinkPool())
    wall, cpu = time.perf_counter(), time.process_time()
    source.start()
    try:
        while source.modbus.polls < polls:
            if not source.alive:
                raise RuntimeError(f"the source stopped: {source.stats.last_error}")
            time.sleep(0.02)
        elapsed, used, done = time.perf_counter() - wall, time.process_time() - cpu, source.modbus
    finally:
        source.stop()
    faults = source.stats.timeouts + done.garbled + done.exceptions + done.disconnects
    if faults or intake.received < done.polls * REGISTERS:
        raise RuntimeError(f"the source had faults or lost values: {done}, {intake.received}")
    return _figures(done.polls, elapsed, used)


def _figures(polls: int, wall: float, cpu: float) -> dict[str, float]:
    return {
        "polls": polls,
        "registers_per_s": polls * REGISTERS / wall,
        "cpu_ms_per_poll": 1000 * cpu / polls,
    }


def measure(polls: int = 500, rounds: int = 3) -> dict[str, Any]:
    """Both loops, alternating, for `rounds` rounds; the best round of each and the ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-modbus-") as tmp:
        slave = SlaveProcess(rtu=Path(tmp) / "modbus-pty").start()
        try:
            for address in range(REGISTERS):
                slave.command(f"set holding {address} uint16 big {address * 7}")
            link = slave.link
            assert link is not None
            bare_round(link, 20)  # warm up the slave and the imports
            runs: dict[str, list[dict[str, float]]] = {"bare": [], "agent": []}
            for _ in range(rounds):
                runs["bare"].append(bare_round(link, polls))
                runs["agent"].append(agent_round(link, polls))
        finally:
            slave.stop()
    bare, agent = _best(runs["bare"]), _best(runs["agent"])
    return {
        "bare": bare,
        "agent": agent,
        "rate_ratio": agent["registers_per_s"] / bare["registers_per_s"],
        "cpu_ratio": agent["cpu_ms_per_poll"] / bare["cpu_ms_per_poll"],
        "runs": runs,
    }


def _best(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The highest rate and the lowest CPU per poll of the rounds: noise only adds."""
    return {
        "registers_per_s": max(r["registers_per_s"] for r in rounds),
        "cpu_ms_per_poll": min(r["cpu_ms_per_poll"] for r in rounds),
    }


def table(result: dict[str, Any]) -> str:
    bare, agent = result["bare"], result["agent"]
    return "\n".join(
        [
            "| row | agent | bare pymodbus loop | agent / bare (target) |",
            "| --- | --- | --- | --- |",
            f"| Modbus RTU, {REGISTERS} holding registers a poll over a pty "
            f"| {agent['registers_per_s']:,.0f} registers/s, {agent['cpu_ms_per_poll']:.2f} ms "
            f"CPU/poll | {bare['registers_per_s']:,.0f} registers/s, "
            f"{bare['cpu_ms_per_poll']:.2f} ms CPU/poll "
            f"| rate {result['rate_ratio']:.2f} (>= 0.8), CPU {result['cpu_ratio']:.2f}x "
            "(<= 1.5x) |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--polls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.polls, args.rounds)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
