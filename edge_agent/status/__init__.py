"""How the agent is doing, for an operator: health, history, metrics, a page, a terminal.

The agent builds a typed `Snapshot` (`agent.snapshot()`); this package judges its health,
keeps an hour of history, and renders it four ways, served by `StatusServer`:

    snapshot.py   the typed parts, their JSON (/status.json, `status --json`) both ways
    health.py     the rules: which facts make the agent unhealthy, in plain sentences
    history.py    buffer depth and upload rate, one sample per interval over the last hour
    metrics.py    Prometheus text, with the serving process's process_* metrics
    page.py       the HTML page, filled from page.html and page.css (package resources)
    text.py       `edge-agent status` text and the STATUS= line systemd shows
    human.py      figures in words (durations, sizes, plurals) shared by the renderers
    server.py     the HTTP endpoint and its sampler thread; start once, stop once
    client.py     fetch_status: what `edge-agent status` calls to read a running agent
"""

from edge_agent.status.client import fetch_status, status_json_url
from edge_agent.status.health import concerns, health, status_document, verdict
from edge_agent.status.history import History, Sample
from edge_agent.status.metrics import ProcessStats, render_metrics
from edge_agent.status.page import render_page, svg_chart
from edge_agent.status.server import StatusServer, parse_listen
from edge_agent.status.snapshot import (
    AgentPart,
    BudgetPart,
    BufferPart,
    ClockPart,
    DatasourcePart,
    DrainPart,
    ErrorPart,
    Health,
    OfflineStatus,
    Snapshot,
    SourcePart,
    Status,
    UploaderPart,
)
from edge_agent.status.text import render_status_line, render_status_text

__all__ = [
    "AgentPart",
    "BudgetPart",
    "BufferPart",
    "ClockPart",
    "DatasourcePart",
    "DrainPart",
    "ErrorPart",
    "Health",
    "History",
    "OfflineStatus",
    "ProcessStats",
    "Sample",
    "Snapshot",
    "SourcePart",
    "Status",
    "StatusServer",
    "UploaderPart",
    "concerns",
    "fetch_status",
    "health",
    "parse_listen",
    "render_metrics",
    "render_page",
    "render_status_line",
    "render_status_text",
    "status_document",
    "status_json_url",
    "svg_chart",
    "verdict",
]
