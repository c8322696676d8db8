"""The dev Caddyfile, run by the real Caddy against fake policyd and Ollama servers."""

from __future__ import annotations

import base64
import itertools
import json
import time
import uuid

import httpx
import pytest

from policyd.shared import contract
from tests.caddy.fakes import (
    GOOD_KEY,
    STREAM_GAP_S,
    STREAM_LINES,
    grant,
    stream_lines,
    upstream_reply,
)
from tests.caddy.gateway import MAX_BODY_BYTES, Gateway

FORBIDDEN_BODY = (
    b'{"error":"forbidden path: model management endpoints are disabled on this gateway"}'
)
GOOD_AUTH = ("Authorization", f"Bearer {GOOD_KEY}")

#: Request-targets that must be refused by Caddy itself (caddy-facts.md §7 and the other verbs).
MUTATION_TARGETS = [
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs/sha256:0123abcd",
    "/api/blobs",
    "/api//pull",
    "//api/pull",
    "/api/%70ull",
    "/api%2Fpull",
    "/./api/pull",
    "/api/./pull",
    "/api/x/../pull",
    "/api/x/%2e%2e/pull",
    "/api/pull?x=1",
    "http://127.0.0.1/api/pull",
    "/API/PULL",
    "/Api/Blobs/sha256:0123abcd",
    "/api/pull/",
    "/api/pull%2F",
    "/api/pull;x",
    "/api/pull.",
    "/api/pull%00",
    "/api/pull%3Fx",
    "/api//blobs/x",
    "/api/create/../create",
    "/api/%64elete",
]

#: Spoofed headers a client may send; none may reach Ollama as sent.
SPOOFED = (
    (contract.H_GRANT, "log=cp key=spoofed"),
    (contract.H_RATE_REQUESTS, "1 1 1"),
    (contract.H_BODY, "c3Bvb2Y="),
    ("X-Nz-Unknown", "spoofed"),
    ("Origin", "http://evil.example"),
    ("X-Forwarded-Method", "DELETE"),
    ("X-Forwarded-Uri", "/api/pull"),
    ("X-Api-Key", "client-api-key-value"),
    ("X-Request-Id", "client-chosen-id"),
)
STRIPPED_UPSTREAM = {
    "authorization",
    "x-nz-body",
    "x-nz-unknown",
    "origin",
    "x-forwarded-method",
    "x-forwarded-uri",
}


@pytest.mark.parametrize("target", MUTATION_TARGETS)
def test_mutation_paths_refused_before_auth(gateway: Gateway, target: str) -> None:
    """Every spelling of a model-management path gets Caddy's 403; policyd and Ollama see none."""
    response = gateway.raw(target, method="POST", headers=(GOOD_AUTH,), body=b"{}")
    assert response.status == 403
    assert response.body == FORBIDDEN_BODY
    assert response.header("Content-Type") == "application/json; charset=utf-8"
    uuid.UUID(response.header("X-Request-Id") or "")
    assert gateway.auth.recorder.all() == []
    assert gateway.upstream.recorder.all() == []


@pytest.mark.parametrize(
    ("target", "forwarded_uri"),
    [("/api/pull/..", "/api/pull/.."), ("/api\\pull", "/api%5Cpull")],
)
def test_paths_caddy_cannot_block_reach_policyd_raw(
    gateway: Gateway, target: str, forwarded_uri: str
) -> None:
    """Paths that do not normalise to a mutation reach policyd with the raw target to refuse."""
    response = gateway.raw(target)
    assert response.status == 401
    (seen,) = gateway.auth.recorder.all()
    assert seen.header("X-Forwarded-Uri") == forwarded_uri
    assert gateway.upstream.recorder.all() == []


def test_allowed_request_reaches_upstream_without_client_secrets(gateway: Gateway) -> None:
    """Authorization, X-Nz-Body, client X-Nz-*, Origin, forged X-Forwarded-* never reach Ollama."""
    body = json.dumps({"model": "m", "prompt": "hi", "stream": True}).encode()
    response = httpx.post(
        f"{gateway.base_url}/api/generate",
        content=body,
        headers=[GOOD_AUTH, *SPOOFED],
    )
    assert response.status_code == 200
    assert response.content == upstream_reply("/api/generate")
    request_id = response.headers["X-Request-Id"]
    uuid.UUID(request_id)

    upstream = gateway.upstream.recorder.by_request_id(request_id)
    assert upstream.request_line == "POST /api/generate HTTP/1.1"
    assert upstream.body == body
    assert not upstream.names() & STRIPPED_UPSTREAM
    assert upstream.header("Host") == f"127.0.0.1:{gateway.upstream.port}"
    assert upstream.header(contract.H_GRANT) == grant(capture=False).encode()
    assert upstream.header(contract.H_RATE_REQUESTS) is None
    assert upstream.header("X-Api-Key") == "client-api-key-value"


def test_policyd_sees_body_and_key_but_no_client_nz_headers(gateway: Gateway) -> None:
    """policyd gets GET /authz with the key, the body as base64 and none of the client's X-Nz-*."""
    body = json.dumps({"model": "m", "messages": []}).encode()
    response = httpx.post(
        f"{gateway.base_url}/v1/chat/completions?x=1",
        content=body,
        headers=[GOOD_AUTH, *SPOOFED],
    )
    assert response.status_code == 200
    auth = gateway.auth.recorder.by_request_id(response.headers["X-Request-Id"])
    assert auth.request_line == f"GET {contract.AUTHZ_PATH} HTTP/1.1"
    assert auth.header("Authorization") == f"Bearer {GOOD_KEY}"
    assert base64.b64decode(auth.header(contract.H_BODY) or "", validate=True) == body
    assert auth.header("X-Forwarded-Method") == "POST"
    assert auth.header("X-Forwarded-Uri") == "/v1/chat/completions?x=1"
    client_only = {name.lower() for name, _ in SPOOFED if name.lower().startswith("x-nz-")}
    assert not (auth.names() & client_only) - {contract.H_BODY.lower()}


def test_one_request_id_in_auth_upstream_response_and_log(gateway: Gateway) -> None:
    """Caddy's uuid replaces the client's X-Request-Id for policyd, Ollama, client and log."""
    response = httpx.post(
        f"{gateway.base_url}/api/chat",
        content=b"{}",
        headers=[GOOD_AUTH, ("X-Request-Id", "client-chosen-id")],
    )
    request_id = response.headers["X-Request-Id"]
    assert request_id != "client-chosen-id"
    assert gateway.auth.recorder.by_request_id(request_id)
    assert gateway.upstream.recorder.by_request_id(request_id)
    entry, line = gateway.log_entry(request_id)
    assert entry["uuid"] == request_id
    assert line.count('"uuid"') == 1


def test_log_line_carries_nz_fields_and_no_secrets(gateway: Gateway) -> None:
    """The access-log line has policyd's grant and no client header at all."""
    response = httpx.post(
        f"{gateway.base_url}/api/generate",
        content=b'{"model":"m"}',
        headers=[GOOD_AUTH, *SPOOFED],
    )
    entry, line = gateway.log_entry(response.headers["X-Request-Id"])
    assert entry[contract.LOG_GRANT] == grant(capture=False).encode()
    assert "resp_body" not in entry
    assert entry["status"] == 200
    assert "headers" not in entry["request"]
    assert GOOD_KEY not in line
    assert "client-api-key-value" not in line


def test_capture_flag_from_policyd_logs_response_body(gateway: Gateway) -> None:
    """When policyd's grant says capture, the log holds the reply's counts as resp_body."""
    response = httpx.post(f"{gateway.base_url}/api/capture", content=b"{}", headers=[GOOD_AUTH])
    assert response.status_code == 200
    entry, _ = gateway.log_entry(response.headers["X-Request-Id"])
    assert upstream_reply("/api/capture").decode().startswith('{"model": "m", "target"')
    # Only the counts reach the disk (caddy/gateway.caddy's resp_body filter).
    assert entry["resp_body"] == ',,"prompt_eval_count": 3,"eval_count": 5,'
    assert entry[contract.LOG_GRANT] == grant(capture=True).encode()


def test_refusal_from_policyd_reaches_client_verbatim(gateway: Gateway) -> None:
    """A 401 from policyd goes to the client as sent, with a request id, and Ollama sees nothing."""
    response = httpx.post(f"{gateway.base_url}/api/chat", content=b"{}")
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert response.headers["WWW-Authenticate"] == "Bearer"
    request_id = response.headers["X-Request-Id"]
    assert gateway.upstream.recorder.all() == []
    entry, _ = gateway.log_entry(request_id)
    assert entry["status"] == 401


def test_body_over_limit_never_reaches_upstream(gateway: Gateway) -> None:
    """A body over NZ_MAX_BODY_BYTES reaches policyd as non-base64 and is refused."""
    response = httpx.post(
        f"{gateway.base_url}/api/chat", content=b"x" * (2 * MAX_BODY_BYTES), headers=[GOOD_AUTH]
    )
    assert response.status_code == 400
    assert gateway.upstream.recorder.all() == []


def test_probes_skip_auth(gateway: Gateway) -> None:
    """/healthz and /readyz go straight to policyd's socket, without an /authz call."""
    for path in ("/healthz", "/readyz"):
        response = httpx.get(f"{gateway.base_url}{path}")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
    assert [seen.target for seen in gateway.auth.recorder.all()] == ["/healthz", "/readyz"]
    assert gateway.upstream.recorder.all() == []


def test_any_host_header_is_served(gateway: Gateway) -> None:
    """Clients may say localhost or an IP: every Host reaches the same gateway (and its auth)."""
    response = gateway.raw("/api/tags", headers=(GOOD_AUTH,), host="localhost")
    assert response.status == 200
    assert len(gateway.auth.recorder.all()) == 1


def test_one_access_log_line_per_request(gateway: Gateway) -> None:
    """Each request adds exactly one JSON line to NZ_ACCESS_LOG and none to Caddy's stderr."""
    ids = [
        httpx.get(f"{gateway.base_url}/api/tags", headers=[GOOD_AUTH]).headers["X-Request-Id"]
        for _ in range(3)
    ]
    for request_id in ids:
        gateway.log_entry(request_id)
    time.sleep(0.2)
    entries = [json.loads(line) for line in gateway.log_lines()]
    for request_id in ids:
        (entry,) = [e for e in entries if e.get("uuid") == request_id]
        assert entry["msg"] == "handled request"
    assert "handled request" not in gateway.stderr_log.read_text()


@pytest.mark.parametrize("target", ["/api/stream", "/api/stream-length"])
def test_streamed_response_reaches_client_chunk_by_chunk(gateway: Gateway, target: str) -> None:
    """Each upstream chunk reaches the client when written, with or without Content-Length."""
    arrivals: list[float] = []
    received = b""
    start = time.monotonic()
    with httpx.stream(
        "POST", f"{gateway.base_url}{target}", content=b"{}", headers=[GOOD_AUTH]
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            arrivals.append(time.monotonic() - start)
            received += chunk
    assert received == b"".join(stream_lines())
    assert len(arrivals) == STREAM_LINES
    assert arrivals[0] < STREAM_GAP_S
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap > STREAM_GAP_S / 2 for gap in gaps)
    entry, _ = gateway.log_entry(response.headers["X-Request-Id"])
    assert entry["size"] == len(received)
    assert "resp_body" not in entry


def test_caddy_runtime_log_holds_no_request_headers(gateway: Gateway) -> None:
    """An upstream that dies mid-stream makes Caddy log an error about the request: that
    line names the request but none of its headers (no key, no X-Nz-Body prompt copy)."""
    prompt = f"runtime-log-secret-{uuid.uuid4().hex}"
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    before = gateway.stderr_log.read_text()
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream(
            "POST",
            f"{gateway.base_url}/api/cut",
            headers=dict([GOOD_AUTH]),
            content=body,
            timeout=10,
        ) as reply,
    ):
        for _ in reply.iter_bytes():
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        added = gateway.stderr_log.read_text()[len(before) :]
        if '"request"' in added:
            break
        time.sleep(0.05)
    entries = [json.loads(line) for line in added.splitlines() if line.startswith("{")]
    about_requests = [e for e in entries if "request" in e]
    assert about_requests, added[-2000:]
    for entry in about_requests:
        assert "headers" not in entry["request"], entry
    encoded = base64.b64encode(body).decode()
    assert prompt not in added
    assert encoded[:40] not in added
    assert GOOD_KEY not in added
