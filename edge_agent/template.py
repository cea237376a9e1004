"""`${VAR}` in the configuration file: environment variables in string values, for fleets.

One config file, templated per gateway by its environment, as Telegraf and Vector allow:

    device_id = "${GATEWAY_ID}"
    url = "https://${MADEVO_HOST:-api.madevo.example}/restapi/datasource/insert"

`${NAME}` is the variable's value; `${NAME:-default}` is the default when the variable is unset
or empty; `$${` is a literal `${`. Expansion happens after the TOML is parsed, in string values
only (in arrays and inline tables too), never in keys or comments, and a value cannot break the
TOML around it (a quote in a variable stays a quote in the string). Numbers and booleans cannot
be templated: TOML would not parse `baudrate = ${BAUD}`. An unset variable without a default is
a configuration error naming the file, the line and the variable, never a silent empty string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError

# `$${` (escape), `${NAME}` or `${NAME:-default}`; a default holds no `}`.
_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MALFORMED = re.compile(r"(?<!\$)\$\{(?![A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})")


def expand(
    raw: dict[str, Any], text: str, path: Path, environ: Mapping[str, str]
) -> dict[str, Any]:
    """The parsed file with every `${...}` in its string values replaced."""
    expanded: dict[str, Any] = _walk(raw, text, path, environ)
    return expanded


def _walk(value: Any, text: str, path: Path, environ: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _expand_string(value, text, path, environ) if "${" in value else value
    if isinstance(value, list):
        return [_walk(v, text, path, environ) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, text, path, environ) for k, v in value.items()}
    return value


def _expand_string(value: str, text: str, path: Path, environ: Mapping[str, str]) -> str:
    bad = _MALFORMED.search(value.replace("$${", "\0\0\0"))
    if bad is not None:
        snippet = value[bad.start() : bad.start() + 20]
        raise ConfigError(
            f"{_where(path, text, snippet)}: {snippet!r} is not a variable reference; write "
            "${NAME} or ${NAME:-default} (letters, digits and _), or $${ for a literal ${"
        )

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:
            return "${"
        found = environ.get(name, "")
        if found:
            return found
        if default is not None:
            return default
        raise ConfigError(
            f"{_where(path, text, '${' + name)}: the environment variable {name} is not set "
            f"(in ${{{name}}}); set it in the agent's environment (for the service: "
            f"`systemctl edit edge-agent`, Environment={name}=...), or give a default: "
            f"${{{name}:-value}}"
        )

    return _REFERENCE.sub(replace, value)


def _where(path: Path, text: str, needle: str) -> str:
    """`FILE: line N` of the first line holding `needle` that is not a comment line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line and not line.lstrip().startswith("#"):
            return f"{path}: line {number}"
    return str(path)
