"""The sandbox insert API over real HTTP: validation, faults, admin endpoints, lifecycle, CLI."""

from __future__ import annotations

import argparse
import gzip
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.errors import ConfigError
from edge_agent.sandbox import (
    INSERT_PATH,
    SUCCESS_MESSAGE,
    Faults,
    Sandbox,
    add_arguments,
    run,
)
from edge_agent.uploader import request_bytes

TOKEN = "sandbox-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def reading(i: int = 0) -> dict[str, Any]:
    return {"timestamp": f"2025-01-01T12:00:{i % 60:02d}Z", "metric": "t", "value": 20.5 + i}


def batch(*records: dict[str, Any], datasource_id: str = "67890") -> dict[str, Any]:
    return {"datasource_id": datasource_id, "data": list(records) or [reading()]}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    # One client for the module: building its TLS context costs more than most tests here.
    with httpx.Client(timeout=5) as c:
        yield c


def post(
    client: httpx.Client,
    sb: Sandbox,
    body: Any,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(sb.url, content=content, headers=AUTH if headers is None else headers)


def message(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"message"}
    return str(body["message"])


# --------------------------------------------------------------------------- acceptance


def test_accepts_a_batch_and_stores_it_in_order(sandbox: Sandbox, client: httpx.Client) -> None:
    records = [reading(i) for i in range(3)]
    response = post(client, sandbox, batch(*records))
    assert response.status_code == 200
    assert response.json() == {"message": SUCCESS_MESSAGE}
    assert sandbox.records() == records
    assert sandbox.records("67890") == records
    assert sandbox.records("other") == []


def test_int_and_float_are_one_schema_type(sandbox: Sandbox, client: httpx.Client) -> None:
    response = post(client, sandbox, batch({"value": 1}, {"value": 1.5}))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "stamp", ["2025-01-01T12:00:00Z", "2025-01-01T12:00:00.123456Z", "2024-02-29T23:59:59+00:00"]
)
def test_accepts_utc_timestamps(sandbox: Sandbox, client: httpx.Client, stamp: str) -> None:
    response = post(client, sandbox, batch({"timestamp": stamp, "value": 1}))
    assert response.status_code == 200, response.text


def test_gzip_body_is_decoded(sandbox: Sandbox, client: httpx.Client) -> None:
    body = gzip.compress(json.dumps(batch(reading(7))).encode())
    response = post(client, sandbox, body, {**AUTH, "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert sandbox.records() == [reading(7)]


def test_stats_count_requests_statuses_records_and_bytes(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    ok = json.dumps(batch(reading(1), reading(2))).encode()
    wire = [
        request_bytes(client.build_request("POST", sandbox.url, content=b, headers=AUTH))
        for b in (ok, b"{")
    ]
    post(client, sandbox, ok)
    post(client, sandbox, b"{")
    assert sandbox.stats() == {
        "requests": 2,
        "by_status": {"200": 1, "400": 1},
        "records": 2,
        "records_by_datasource": {"67890": 2},
        "bytes": len(ok) + 1,
        "wire_bytes": sum(wire),
    }


def test_no_gzip_answers_415_to_a_gzip_body_and_takes_plain_json(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.set_faults(Faults(no_gzip=True))
    body = gzip.compress(json.dumps(batch(reading(7))).encode())
    refused = post(client, sandbox, body, {**AUTH, "Content-Encoding": "gzip"})
    assert refused.status_code == 415, refused.text
    assert "no_gzip" in refused.json()["message"]
    assert post(client, sandbox, batch(reading(8))).status_code == 200
    assert sandbox.records() == [reading(8)]


def test_gzip_400_answers_400_to_a_gzip_body_and_takes_plain_json(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.set_faults(Faults(gzip_400=True))
    body = gzip.compress(json.dumps(batch(reading(7))).encode())
    refused = post(client, sandbox, body, {**AUTH, "Content-Encoding": "gzip"})
    assert refused.status_code == 400, refused.text
    assert "gzip_400" in refused.json()["message"]
    assert post(client, sandbox, batch(reading(8))).status_code == 200
    assert sandbox.records() == [reading(8)]


# --------------------------------------------------------------------------- validation

NAN_BODY = b'{"datasource_id": "67890", "data": [{"value": 1}, {"value": NaN}]}'

BAD_BODIES: list[tuple[str, Any, str]] = [
    ("not json", b"{not json", "body is not valid JSON"),
    ("not utf-8", b'{"a": "\xff"}', "body is not valid UTF-8 JSON"),
    ("array body", [batch()], "body: expected a JSON object, got array"),
    ("no datasource", {"data": [reading()]}, "datasource_id: required"),
    (
        "numeric datasource",
        {"datasource_id": 67890, "data": [reading()]},
        'datasource_id: expected a string, got number (write "67890")',
    ),
    ("no data", {"datasource_id": "67890"}, "data: required"),
    ("data object", {"datasource_id": "67890", "data": {}}, "data: expected an array"),
    ("empty data", {"datasource_id": "67890", "data": []}, "data: must not be empty"),
    (
        "record not object",
        {"datasource_id": "67890", "data": [reading(), [1]]},
        "data[1]: expected an object, got array",
    ),
    (
        "type differs",
        batch({"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": "1", "b": "z"}),
        "data[2]: schema differs from data[0] (a is string, not number)",
    ),
    (
        "keys differ",
        batch({"a": 1, "b": 2}, {"a": 1, "c": 3}),
        "data[1]: schema differs from data[0] (missing b; extra c)",
    ),
    ("null vs number", batch({"a": 1}, {"a": None}), "data[1]: schema differs"),
    ("NaN", NAN_BODY, "data[1].value: NaN is not a finite number"),
    (
        "Infinity nested",
        b'{"datasource_id": "67890", "data": [{"v": {"x": [1, -Infinity]}}]}',
        "data[0].v.x[1]: -Infinity is not a finite number",
    ),
    ("overflow", b'{"datasource_id": "67890", "data": [{"v": 1e999}]}', "data[0].v: 1e999"),
]


@pytest.mark.parametrize(
    ("body", "expected"), [(b, e) for _, b, e in BAD_BODIES], ids=[i for i, _, _ in BAD_BODIES]
)
def test_bad_payloads_are_400_naming_the_problem(
    sandbox: Sandbox, client: httpx.Client, body: Any, expected: str
) -> None:
    response = post(client, sandbox, body)
    assert response.status_code == 400
    assert expected in message(response)
    assert sandbox.records() == []


def test_bad_timestamp_message_names_index_value_and_format(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    records = [reading(i) for i in range(5)]
    records[3]["timestamp"] = "2025-13-01"
    response = post(client, sandbox, batch(*records))
    assert response.status_code == 400
    assert message(response) == (
        'data[3].timestamp: "2025-13-01" is not ISO 8601 UTC'
        " (expected e.g. 2025-01-01T12:00:00.123Z)"
    )


@pytest.mark.parametrize(
    "stamp",
    [
        "2025-01-01T12:00:00",  # naive
        "2025-01-01T12:00:00+02:00",  # another offset
        "2025-01-01 12:00:00Z",  # no T
        "2025-13-01T12:00:00Z",  # month 13
        "2025-02-30T12:00:00Z",  # no such day
        "2025-01-01T24:00:00Z",
        "2025-01-01T12:00:00.Z",
        "２０２５-01-01T12:00:00Z",  # non-ASCII digits
        1735732800,
        None,
    ],
)
def test_rejects_timestamps_that_are_not_iso_utc(
    sandbox: Sandbox, client: httpx.Client, stamp: object
) -> None:
    response = post(client, sandbox, batch({"timestamp": stamp, "value": 1}))
    assert response.status_code == 400
    assert message(response).startswith(f"data[0].timestamp: {json.dumps(stamp)} is not ISO 8601")


def test_invalid_json_after_gzip_is_400(sandbox: Sandbox, client: httpx.Client) -> None:
    headers = {**AUTH, "Content-Encoding": "gzip"}
    response = post(client, sandbox, gzip.compress(b"[1, 2"), headers)
    assert response.status_code == 400
    assert "body is not valid JSON" in message(response)


@pytest.mark.parametrize("body", [b"plain text", gzip.compress(b"{}")[:-6]])
def test_broken_gzip_is_400(sandbox: Sandbox, client: httpx.Client, body: bytes) -> None:
    response = post(client, sandbox, body, {**AUTH, "Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert "gzip" in message(response)


def test_other_content_encoding_is_415(sandbox: Sandbox, client: httpx.Client) -> None:
    response = post(client, sandbox, batch(), {**AUTH, "Content-Encoding": "br"})
    assert response.status_code == 415
    assert "'br'" in message(response)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, "missing Authorization header"),
        ({"Authorization": f"Basic {TOKEN}"}, "malformed Authorization header"),
        ({"Authorization": "Bearer"}, "malformed Authorization header"),
        ({"Authorization": "Bearer not-the-token"}, "unknown token"),
    ],
)
def test_auth_failures_are_401(
    sandbox: Sandbox, client: httpx.Client, headers: dict[str, str], expected: str
) -> None:
    response = post(client, sandbox, batch(), headers)
    assert response.status_code == 401
    assert expected in message(response)
    assert "not-the-token" not in response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_unknown_datasource_is_403_naming_it(sandbox: Sandbox, client: httpx.Client) -> None:
    response = post(client, sandbox, batch(datasource_id="12345"))
    assert response.status_code == 403
    assert '"12345"' in message(response)


def test_other_paths_are_404_and_other_methods_405(sandbox: Sandbox, client: httpx.Client) -> None:
    base = sandbox.url.removesuffix(INSERT_PATH)
    assert client.post(f"{base}/restapi/datasource/upsert", json=batch()).status_code == 404
    response = client.get(sandbox.url)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_token_rotation(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_tokens(["new-token"])
    assert post(client, sandbox, batch()).status_code == 401
    response = post(client, sandbox, batch(), {"Authorization": "Bearer new-token"})
    assert response.status_code == 200


# --------------------------------------------------------------------------- faults


def test_fail_rate_answers_that_share_503_and_stores_only_the_rest(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.set_faults(Faults(fail_rate=0.3, seed=7))
    statuses = [post(client, sandbox, batch()).status_code for _ in range(100)]
    assert set(statuses) == {200, 503}
    assert 20 <= statuses.count(503) <= 40
    assert len(sandbox.records()) == statuses.count(200)


def test_same_seed_gives_same_failures(client: httpx.Client) -> None:
    runs = []
    for _ in range(2):
        with Sandbox(faults=Faults(fail_rate=0.5, seed=3)) as sb:
            runs.append([post(client, sb, batch()).status_code for _ in range(12)])
    assert runs[0] == runs[1]


def test_status_fault_with_retry_after(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(status=429, retry_after="7"))
    response = post(client, sandbox, batch())
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert "injected" in message(response)
    assert sandbox.records() == []
    sandbox.set_faults(Faults())
    response = post(client, sandbox, batch())
    assert response.status_code == 200
    assert "Retry-After" not in response.headers


def test_latency_delays_the_answer(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(latency_ms=150))
    started = time.monotonic()
    assert post(client, sandbox, batch()).status_code == 200
    assert time.monotonic() - started >= 0.15


def test_max_bytes_is_413_on_the_decoded_size(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(max_bytes=1000))
    assert post(client, sandbox, batch()).status_code == 200
    large = json.dumps(batch(*[reading()] * 200)).encode()
    compressed = gzip.compress(large)
    assert len(compressed) < 1000 < len(large)  # small on the wire, large once decoded
    response = post(client, sandbox, compressed, {**AUTH, "Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert "the limit is 1000" in message(response)
    assert len(sandbox.records()) == 1


def test_drop_after_commit_stores_then_hangs_up(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(drop_after_commit=True))
    with pytest.raises(httpx.RemoteProtocolError):
        post(client, sandbox, batch(reading(5)))
    assert sandbox.records() == [reading(5)]
    assert sandbox.stats()["by_status"] == {"dropped": 1}


def test_drop_after_commit_rate_drops_some(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(drop_after_commit=True, drop_after_commit_rate=0.5, seed=1))
    outcomes = []
    for _ in range(20):
        try:
            outcomes.append(post(client, sandbox, batch()).status_code)
        except httpx.RemoteProtocolError:
            outcomes.append(0)
    assert 0 in outcomes
    assert 200 in outcomes
    assert len(sandbox.records()) == 20


def test_reject_fields_names_the_record(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(reject_fields={"reading_id": "bad", "code": "5"}))
    records = [{"reading_id": f"r{i}", "code": 1} for i in range(20)]
    records[17]["reading_id"] = "bad"
    response = post(client, sandbox, batch(*records))
    assert response.status_code == 400
    assert message(response) == "data[17]: rejected by sandbox rule reading_id=bad"
    records[17]["reading_id"] = "ok"
    records[2]["code"] = 5  # compared as str(value)
    response = post(client, sandbox, batch(*records))
    assert message(response) == "data[2]: rejected by sandbox rule code=5"
    assert sandbox.records() == []


def test_fail_value_answers_500_to_any_insert_holding_it(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.set_faults(Faults(fail_value="boom"))
    records = [{**reading(i), "kind": "ok"} for i in range(10)]
    assert post(client, sandbox, batch(*records)).status_code == 200
    records[6]["kind"] = "boom"
    failed = post(client, sandbox, batch(*records))
    assert failed.status_code == 500
    assert message(failed) == "Internal server error (sandbox fault fail_value=boom)"
    assert post(client, sandbox, batch(*records[7:])).status_code == 200  # the rest is fine
    numeric = Faults(fail_value="25.5")  # compared as text, like reject_fields
    sandbox.set_faults(numeric)
    assert post(client, sandbox, batch(reading(5))).status_code == 500
    assert len(sandbox.records()) == 13
    assert sandbox.stats()["by_status"] == {"200": 2, "500": 2}


def test_set_faults_copies_the_callers_dict(sandbox: Sandbox, client: httpx.Client) -> None:
    rules = {"metric": "t"}
    sandbox.set_faults(Faults(reject_fields=rules))
    rules.clear()
    assert post(client, sandbox, batch()).status_code == 400


def test_a_captive_portal_answers_200_html_and_stores_nothing(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.set_faults(Faults(portal=True))
    response = post(client, sandbox, batch(), headers={})  # not even the token is looked at
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.text.startswith("<!DOCTYPE html>")
    assert sandbox.records() == []
    assert sandbox.stats()["by_status"] == {"portal": 1}


def test_huge_bodies_pad_200_and_400_answers_to_that_many_mb(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.set_faults(Faults(huge_body_mb=3, reject_fields={"value": "99"}))
    stored = post(client, sandbox, batch(reading(1)))
    assert stored.status_code == 200
    assert len(stored.content) >= 3 * 1024 * 1024
    assert stored.json()["message"] == SUCCESS_MESSAGE  # still a JSON object, just huge
    refused = post(client, sandbox, batch({**reading(), "value": 99}))
    assert refused.status_code == 400
    assert len(refused.content) >= 3 * 1024 * 1024
    assert refused.json()["message"] == "data[0]: rejected by sandbox rule value=99"
    assert sandbox.records() == [reading(1)]


def test_trickle_sends_the_headers_then_the_body_a_byte_at_a_time(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.set_faults(Faults(trickle_s=0.01))
    with client.stream("POST", sandbox.url, content=json.dumps(batch()), headers=AUTH) as r:
        assert r.status_code == 200  # the headers came before the body
        chunks = list(r.iter_raw())
    assert len(chunks) > 1
    assert json.loads(b"".join(chunks)) == {"message": SUCCESS_MESSAGE}
    assert len(sandbox.records()) == 1


def test_fault_flags_cover_the_hostile_network_faults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--portal", "--trickle-s", "2", "--huge-body-mb", "50"])
    assert (args.portal, args.trickle_s, args.huge_body_mb) == (True, 2.0, 50)
    args = parser.parse_args(["--fail-on-value", "boom"])
    assert args.fail_value == "boom"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"fail_rate": 1.5}, "fail_rate"),
        ({"status": 200}, "status: 200 must be from 400 to 599"),
        ({"status": True}, "status"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"retry_after": "5\r\nX-Evil: 1"}, "retry_after"),
        ({"reject_fields": {"a": 1}}, "reject_fields"),
        ({"portal": 1}, "portal"),
        ({"trickle_s": -1}, "trickle_s: -1 is not a number of seconds from 0 to 60"),
        ({"huge_body_mb": 2048}, "huge_body_mb: 2048 must be from 0 to 1024"),
        ({"fail_value": ""}, "fail_value: '' is not a non-empty string"),
        ({"fail_value": 5}, "fail_value: 5 is not a non-empty string"),
    ],
)
def test_bad_faults_raise_config_error(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        Faults(**kwargs)


def test_faults_from_mapping_names_unknown_keys_with_a_hint() -> None:
    with pytest.raises(ConfigError, match=r"'fail_rat' \(did you mean 'fail_rate'\?\)"):
        Faults.from_mapping({"fail_rat": 0.5})


# --------------------------------------------------------------------------- admin


def admin(sb: Sandbox, path: str) -> str:
    return sb.url.removesuffix(INSERT_PATH) + path


def test_admin_stats_and_records(sandbox: Sandbox, client: httpx.Client) -> None:
    post(client, sandbox, batch(reading(1), reading(2), reading(3)))
    assert client.get(admin(sandbox, "/_admin/stats")).json() == sandbox.stats()
    records = client.get(admin(sandbox, "/_admin/records?datasource_id=67890&limit=2"))
    assert records.json() == [reading(1), reading(2)]
    other = client.get(admin(sandbox, "/_admin/records?datasource_id=other"))
    assert other.json() == []
    bad = client.get(admin(sandbox, "/_admin/records?limit=two"))
    assert bad.status_code == 400
    assert "limit" in message(bad)


def test_admin_faults_replaces_and_answers_them(sandbox: Sandbox, client: httpx.Client) -> None:
    response = client.post(admin(sandbox, "/_admin/faults"), json={"status": 503})
    assert response.status_code == 200
    assert response.json() == {**Faults().to_dict(), "status": 503}
    assert client.get(admin(sandbox, "/_admin/faults")).json()["status"] == 503
    assert post(client, sandbox, batch()).status_code == 503
    client.post(admin(sandbox, "/_admin/faults"), json={})
    assert post(client, sandbox, batch()).status_code == 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"status": 503, "sttaus": 1, "bogus": 2}, "unknown key(s) 'bogus', 'sttaus'"),
        ({"fail_rate": "half"}, "fail_rate"),
        ([1], "expected a JSON object"),
    ],
)
def test_admin_faults_rejects_bad_bodies(
    sandbox: Sandbox, client: httpx.Client, body: Any, expected: str
) -> None:
    response = client.post(admin(sandbox, "/_admin/faults"), json=body)
    assert response.status_code == 400
    assert expected in message(response)
    assert sandbox.faults() == Faults()


def test_admin_tokens_rotates(sandbox: Sandbox, client: httpx.Client) -> None:
    tokens = {"tokens": ["tok-alpha", "tok-beta"]}
    response = client.post(admin(sandbox, "/_admin/tokens"), json=tokens)
    assert response.status_code == 200
    assert message(response) == "tokens replaced (2 accepted)"
    assert post(client, sandbox, batch()).status_code == 401
    beta = {"Authorization": "Bearer tok-beta"}
    assert post(client, sandbox, batch(), beta).status_code == 200
    bad = client.post(admin(sandbox, "/_admin/tokens"), json={"tokens": "tok-alpha"})
    assert bad.status_code == 400


def test_admin_wrong_method_and_path(sandbox: Sandbox, client: httpx.Client) -> None:
    assert client.post(admin(sandbox, "/_admin/stats")).status_code == 405
    assert client.get(admin(sandbox, "/_admin/nope")).status_code == 404


# --------------------------------------------------------------------------- lifecycle


def test_records_survive_stop_and_a_new_sandbox_on_the_same_file(
    tmp_path: Path, client: httpx.Client
) -> None:
    db = tmp_path / "sandbox.db"
    first = Sandbox(db_path=db).start()
    port = first.port
    assert post(client, first, batch(reading(1))).status_code == 200
    first.stop()
    with pytest.raises(httpx.ConnectError):
        post(client, first, batch(reading(2)))
    with Sandbox(db_path=db, port=port) as second:
        assert second.url == first.url
        assert post(client, second, batch(reading(3))).status_code == 200
        assert second.records() == [reading(1), reading(3)]


def test_lifecycle_is_one_way() -> None:
    sb = Sandbox()
    with pytest.raises(RuntimeError):
        sb.records()
    with pytest.raises(RuntimeError):
        _ = sb.port
    sb.start()
    sb.stop()
    sb.stop()  # idempotent
    with pytest.raises(RuntimeError, match="make a new one"):
        sb.start()


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent sandbox")
    add_arguments(p)
    return p


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--fail-rate", "2"], "--fail-rate: '2' is not a number from 0 to 1"),
        (["--status", "200"], "--status: '200' is not an integer from 400 to 599"),
        (["--port", "70000"], "--port"),
        (["--latency-ms", "-5"], "--latency-ms"),
        (["--max-bytes", "0"], "--max-bytes"),
        (["--reject-field", "reading_id"], "expected NAME=VALUE"),
    ],
)
def test_bad_flag_values_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_bad_faults_file_at_start_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faults_file = tmp_path / "faults.json"
    faults_file.write_text('{"stauts": 503}')
    assert run(parser().parse_args(["--faults-file", str(faults_file), "--port", "0"])) == 2
    assert "did you mean 'status'" in capsys.readouterr().err


RUN_SANDBOX = (
    "import argparse, sys\n"
    "from edge_agent.sandbox import add_arguments, run\n"
    "p = argparse.ArgumentParser()\n"
    "add_arguments(p)\n"
    "sys.exit(run(p.parse_args(sys.argv[1:])))\n"
)


class SandboxProcess:
    """`run` in a child process, its stderr read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUN_SANDBOX, "--port", "0", *args],
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r} in {self.seen}")

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=10)


@pytest.fixture
def faults_file(tmp_path: Path) -> Path:
    return tmp_path / "faults.json"


def test_run_serves_reloads_faults_on_sighup_and_exits_0_on_sigterm(
    faults_file: Path, client: httpx.Client
) -> None:
    faults_file.write_text("{}")
    with SandboxProcess("--token", "s3cret-xyz", "--faults-file", str(faults_file)) as child:
        url = child.wait_for(r"listening on (\S+)").group(1)
        auth = {"Authorization": "Bearer s3cret-xyz"}
        assert client.post(url, json=batch(reading(1)), headers=auth).status_code == 200
        child.wait_for(r"^sandbox: 200 67890 1 records$")
        faults_file.write_text('{"status": 503}')
        child.proc.send_signal(signal.SIGHUP)
        child.wait_for("faults reloaded")
        assert client.post(url, json=batch(), headers=auth).status_code == 503
        faults_file.write_text('{"status": 200}')
        child.proc.send_signal(signal.SIGHUP)
        child.wait_for("faults file not applied, previous faults stay")
        assert client.post(url, json=batch(), headers=auth).status_code == 503
        assert child.stop(signal.SIGTERM) == 0
        child.wait_for("stopped")
    assert all("s3cret-xyz" not in line for line in child.seen)


def test_run_exits_0_on_sigint() -> None:
    with SandboxProcess("--datasource", "a", "--datasource", "b") as child:
        child.wait_for(r"datasources: a, b")
        assert child.stop(signal.SIGINT) == 0
