"""What `edge-agent status` calls to read a running agent's /status.json."""

from __future__ import annotations

import urllib.parse

import httpx

from edge_agent.errors import EdgeAgentError
from edge_agent.status.snapshot import SnapshotFormatError, Status


def status_json_url(url: str) -> str:
    """Where a running agent's /status.json is, from its status URL or listen address."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
    path = parts.path.rstrip("/")
    if not path.endswith("/status.json"):
        path += "/status.json"
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))


def fetch_status(url: str, timeout: float = 3.0) -> Status | None:
    """A running agent's status document, or None if nothing listens at `url`.

    Other failures (a timeout, a 500, not a status document) raise EdgeAgentError saying
    what happened.
    """
    target = status_json_url(url)
    try:
        # trust_env=False: the agent is local, a proxy from the environment must not relay it.
        response = httpx.get(target, timeout=timeout, trust_env=False)
    except httpx.ConnectError:
        return None
    except httpx.TimeoutException:
        raise EdgeAgentError(
            f"the status page {target} did not answer within {timeout:g} s"
        ) from None
    except httpx.HTTPError as exc:
        raise EdgeAgentError(f"cannot read the status page {target}: {exc}") from exc
    if response.status_code != 200:
        raise EdgeAgentError(
            f"the status page {target} answered {response.status_code}: {response.text[:300]}"
        )
    try:
        doc = response.json()
    except ValueError:
        raise EdgeAgentError(f"the status page {target} did not answer JSON") from None
    if not isinstance(doc, dict):
        raise EdgeAgentError(f"the status page {target} answered {type(doc).__name__}, not a dict")
    try:
        return Status.from_json(doc)
    except SnapshotFormatError as exc:
        raise EdgeAgentError(
            f"the status page {target} answered a document this edge-agent cannot read: {exc}"
        ) from None
