"""What `edge-agent status` calls to read a running agent's /status.json."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import httpx

from edge_agent.errors import EdgeAgentError, ForeignStatusError
from edge_agent.status.snapshot import SnapshotFormatError, Status

SERVER_NAME = "edge-agent"  # the start of the status server's Server header
MAX_STATUS_BYTES = 4 * 1024 * 1024  # what `fetch_status` reads of an answer at most


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

    Another program answering there (not the agent's `Server` header and not its document)
    raises ForeignStatusError; other failures (a timeout, a 500, a document this version
    cannot read) raise EdgeAgentError saying what happened. At most MAX_STATUS_BYTES of the
    answer are read.
    """
    target = status_json_url(url)
    try:
        # trust_env=False: the agent is local, a proxy from the environment must not relay it.
        with httpx.stream("GET", target, timeout=timeout, trust_env=False) as response:
            body = _read_capped(response, MAX_STATUS_BYTES)
    except httpx.ConnectError:
        return None
    except httpx.TimeoutException:
        raise EdgeAgentError(
            f"the status page {target} did not answer within {timeout:g} s"
        ) from None
    except httpx.HTTPError as exc:
        raise EdgeAgentError(f"cannot read the status page {target}: {exc}") from exc
    ours = response.headers.get("Server", "").startswith(SERVER_NAME)
    doc = _json_dict(body)
    if response.status_code == 200 and doc is not None and _is_agent_status(doc):
        try:
            return Status.from_json(doc)
        except SnapshotFormatError as exc:
            raise EdgeAgentError(
                f"the status page {target} answered a document this edge-agent cannot read: {exc}"
            ) from None
    if ours and response.status_code != 200:
        text = body[:300].decode("utf-8", "replace")
        raise EdgeAgentError(f"the status page {target} answered {response.status_code}: {text}")
    kind = response.headers.get("Content-Type") or "no content type"
    first = json.dumps(body[:60].decode("utf-8", "replace"))
    raise ForeignStatusError(
        f"another program answers on {target} ({response.status_code}, {kind}, first bytes "
        f"{first}): it is not the agent's status endpoint"
    )


def _read_capped(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            break  # not a status document of ours; closing drops the rest
    return bytes(body)


def _json_dict(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_agent_status(doc: dict[str, Any]) -> bool:
    """Shaped like the document the status server makes (also an agent too old to send its
    Server header): the renderers can read it."""
    agent, health_part = doc.get("agent"), doc.get("health")
    return (
        isinstance(agent, dict)
        and isinstance(health_part, dict)
        and isinstance(health_part.get("healthy"), bool)
        and isinstance(health_part.get("reasons", []), list)
    )
