"""Upstream and log hygiene: only policyd's X-Nz-* values count, one request id, no secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, Final

import attrs
import httpx
from sqlalchemy.ext.asyncio import create_async_engine

from compose.local.cli_runner import run_cli
from compose.local.parts import Stack
from policyd.admin import accounts as admin
from policyd.shared.contract import (
    H_BODY,
    H_GRANT,
    LOG_GRANT,
    RATE_LIMIT_HEADERS,
    parse_grant,
)
from tests.e2e.conftest import StandinLog

__all__: list[str] = []

_LOG_WAIT_S: Final = 5.0
_CLIENT_REQUEST_ID: Final = "client-chosen-request-id"
#: What a client might send hoping to look like policyd; none of it may count.
_SPOOFED: Final = {
    "X-Nz-Key-Id": "spoofed-key-id",
    "X-Nz-Key-Prefix": "nz_spoofed0",
    "X-Nz-Tenant-Id": "spoofed-tenant-id",
    "X-Nz-Surface": "spoofed-surface",
    "X-Nz-Model": "spoofed-model",
    "X-Nz-Prompt-Log": "1",
    "X-Nz-Reserved": "0",
    "X-Nz-Refusal": "spoofed",
    "X-Nz-Foo": "spoofed-foo",
    "X-Nz-Grant": "log=cp key=spoofed-key-id tenant=spoofed-tenant-id model=spoofed-model",
    "X-Nz-Rate-Requests": "999999 999999 1",
    "X-Nz-Rate-Tokens": "888888 888888 1",
    H_BODY: base64.b64encode(b'{"model":"spoofed"}').decode(),
    "X-Request-Id": _CLIENT_REQUEST_ID,
    "X-Ratelimit-Limit-Requests": "999999",
    "X-Ratelimit-Limit-Tokens": "888888",
}


@attrs.frozen
class Surface:
    """One chat endpoint, the surface name policyd reports for it, and its output cap."""

    path: str
    name: str

    def body(self, *, stream: bool) -> bytes:
        chat: dict[str, Any] = {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
        }
        if self.name == "openai":
            chat["max_tokens"] = 5
        else:
            chat["options"] = {"num_predict": 5}
        return json.dumps(chat).encode()


SURFACES: Final = (Surface("/api/chat", "ollama"), Surface("/v1/chat/completions", "openai"))


@attrs.frozen
class Ids:
    """The key's and tenant's ids as Postgres has them (what policyd must send)."""

    key_id: str
    tenant_id: str


async def _read_ids(database_url: str) -> Ids:
    engine = create_async_engine(database_url)
    try:
        (key,) = await admin.list_keys(engine, tenant=None)
        (tenant,) = await admin.list_tenants(engine)
    finally:
        await engine.dispose()
    return Ids(key_id=key.id, tenant_id=tenant.id)


def ids_of_only_key(stack: Stack) -> Ids:
    """Ids of the single key (and tenant) in the database."""
    return asyncio.run(_read_ids(stack.database_url))


def log_line(stack: Stack, request_id: str, *, timeout: float = _LOG_WAIT_S) -> dict[str, Any]:
    """The access-log line whose `uuid` is `request_id`, waiting (bounded) for Caddy to write it."""
    deadline = time.monotonic() + timeout
    while True:
        if stack.access_log.exists():
            for text in stack.access_log.read_text(encoding="utf-8").splitlines():
                if request_id in text:
                    line: dict[str, Any] = json.loads(text)
                    if line.get("uuid") == request_id:
                        return line
        if time.monotonic() >= deadline:
            raise AssertionError(f"no access-log line with uuid {request_id} after {timeout:g}s")
        time.sleep(0.05)


def upstream_record(standin_log: StandinLog, request_id: str) -> dict[str, Any]:
    """The stand-in's record of the request carrying `request_id`."""
    found = [r for r in standin_log.requests() if r["request_id"] == request_id]
    assert len(found) == 1, (request_id, [r["request_id"] for r in standin_log.requests()])
    return found[0]


def nz_names(headers: dict[str, Any]) -> set[str]:
    """Header names in the X-Nz-* family, lower-cased."""
    return {name.lower() for name in headers if name.lower().startswith("x-nz-")}


def chat(
    gateway: str, surface: Surface, *, key: str, stream: bool, extra: dict[str, str]
) -> httpx.Response:
    """One chat request, read to the end (streams included)."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **extra}
    with httpx.Client(timeout=30) as client:
        reply = client.post(
            f"{gateway}{surface.path}", content=surface.body(stream=stream), headers=headers
        )
    assert reply.status_code == 200, (surface.path, reply.status_code, reply.text)
    return reply


def test_client_nz_headers_never_reach_upstream_or_log_fields(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Spoofed X-Nz-* and X-Request-Id are replaced by policyd's or dropped; no client-sent
    rate header reaches the client's response (only Caddy's from policyd's figures do)."""
    ids = ids_of_only_key(stack)
    for surface in SURFACES:
        for stream in (False, True):
            # Claim the opposite of the truth, so a leak would change what Caddy does.
            spoof = {
                **_SPOOFED,
                "X-Nz-Stream": "0" if stream else "1",
                "X-Nz-Capture": "1" if stream else "0",
            }
            reply = chat(gateway, surface, key=api_key, stream=stream, extra=spoof)
            request_id = reply.headers["x-request-id"]
            where = (surface.path, stream)
            assert request_id != _CLIENT_REQUEST_ID, where
            assert _rate_headers(reply) == {}, where

            seen = upstream_record(standin_log, request_id)["headers"]
            # The grant Ollama gets and the one the log holds are policyd's, whole.
            line = log_line(stack, request_id)
            assert line["status"] == 200, where
            assert line[LOG_GRANT] == seen[H_GRANT.lower()], where
            grant = parse_grant(seen[H_GRANT.lower()])
            assert grant["key"] == ids.key_id, where
            assert grant["prefix"] == api_key[:11], where
            assert grant["tenant"] == ids.tenant_id, where
            assert grant["stream"] == ("1" if stream else "0"), where
            assert grant["model"] == "llama3.2", where
            assert grant["surface"] == surface.name, where
            assert grant["log"] == ("--" if stream else "c-"), where
            assert int(grant["reserved"]) > 0, where
            assert seen["x-request-id"] == request_id, where
            assert {name for name in seen if name.startswith("x-nz-")} == {H_GRANT.lower()}, where
            assert [f for f in line if f.startswith("nz_")] == [LOG_GRANT], where
            assert "headers" not in line["request"], where


def test_unknown_client_nz_header_is_not_logged(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """A client-sent X-Nz-Foo (a name not in the contract) reaches neither Ollama nor the log."""
    reply = chat(gateway, SURFACES[0], key=api_key, stream=False, extra={"X-Nz-Foo": "spoofed-foo"})
    request_id = reply.headers["x-request-id"]
    assert "x-nz-foo" not in upstream_record(standin_log, request_id)["headers"]
    line = log_line(stack, request_id)
    assert "headers" not in line["request"]
    assert "spoofed-foo" not in json.dumps(line)


def test_secrets_never_reach_upstream_and_are_redacted_in_the_log(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Authorization and X-Nz-Body never reach Ollama; the log has Authorization REDACTED."""
    for surface in SURFACES:
        reply = chat(gateway, surface, key=api_key, stream=False, extra={})
        request_id = reply.headers["x-request-id"]
        record = upstream_record(standin_log, request_id)
        assert "authorization" not in record["headers"], surface
        assert "x-nz-body" not in record["headers"], surface
        # Ollama gets policyd's canonical copy of the body (same content, compact JSON),
        # and no header carrying it.
        assert json.loads(record["body"]) == json.loads(surface.body(stream=False)), surface
        assert record["body_size"] == len(record["body"].encode()), surface
        assert "x-nz-upstream-body" not in record["headers"], surface
        line = log_line(stack, request_id)
        text = json.dumps(line)
        assert api_key not in text, surface
        assert api_key[12:] not in text, surface
        assert "headers" not in line["request"], surface  # no client header is logged


def test_one_request_id_for_client_upstream_policyd_and_log(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """The response's X-Request-Id is the stand-in's request_id and the log line's uuid."""
    for surface in SURFACES:
        for stream in (False, True):
            extra = {"X-Request-Id": _CLIENT_REQUEST_ID}
            reply = chat(gateway, surface, key=api_key, stream=stream, extra=extra)
            request_id = reply.headers["x-request-id"]
            assert request_id
            assert request_id != _CLIENT_REQUEST_ID
            assert upstream_record(standin_log, request_id)["request_id"] == request_id
            assert log_line(stack, request_id)["uuid"] == request_id
    ids = {r["request_id"] for r in standin_log.requests()}
    assert len(ids) == 2 * len(SURFACES), "each request must get its own id"


def test_refused_request_has_one_request_id_and_no_trusted_fields(
    stack: Stack, gateway: str, standin_log: StandinLog
) -> None:
    """A 401 has Caddy's request id (also in policyd's and the access log) and no nz_* values."""
    policyd_log = stack.policyd.launcher.log_path
    for surface in SURFACES:
        headers = {**_SPOOFED, "X-Nz-Stream": "1", "X-Nz-Capture": "1"}
        reply = httpx.post(
            f"{gateway}{surface.path}",
            content=surface.body(stream=False),
            headers=headers,
            timeout=10,
        )
        assert reply.status_code == 401, reply.text
        request_id = reply.headers["x-request-id"]
        assert request_id != _CLIENT_REQUEST_ID
        line = log_line(stack, request_id)
        assert line["status"] == 401
        assert line["resp_headers"]["X-Request-Id"] == [request_id]
        # A refusal is logged without policyd's fields; a spoofed value must not stand in.
        assert all(line[f] == "" for f in line if f.startswith("nz_")), (surface, line)
        assert "resp_body" not in line
        assert "headers" not in line["request"]
        deadline = time.monotonic() + _LOG_WAIT_S
        while request_id not in policyd_log.read_text(encoding="utf-8", errors="replace"):
            assert time.monotonic() < deadline, f"policyd never logged {request_id}"
            time.sleep(0.05)
    assert standin_log.requests() == []


def test_only_non_streamed_responses_are_captured_in_the_log(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Non-streamed chat has resp_body in its log line, reduced to Ollama's counts (no reply
    text); streamed has none."""
    for surface in SURFACES:
        whole = chat(gateway, surface, key=api_key, stream=False, extra={})
        line = log_line(stack, whole.headers["x-request-id"])
        captured = line["resp_body"]
        answer = whole.json()
        if surface.name == "openai":
            usage = json.dumps(answer["usage"], separators=(",", ":"))
            assert captured == f',,,,"usage":{usage}', surface
            assert answer["usage"]["completion_tokens"] == 5
        else:
            counts = f'"prompt_eval_count":{answer["prompt_eval_count"]},"eval_count":5'
            assert captured == f',"done":true,{counts},', surface
        streamed = chat(gateway, surface, key=api_key, stream=True, extra={})
        line = log_line(stack, streamed.headers["x-request-id"])
        assert "resp_body" not in line, surface
        assert parse_grant(line[LOG_GRANT])["stream"] == "1"
        assert line["size"] == len(streamed.content)


def _rate_headers(reply: httpx.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in reply.headers.items() if k.lower().startswith("x-ratelimit-")}


def wait_for_rate_headers(gateway: str, key: str, expected: set[str]) -> None:
    """Wait (bounded) until a limit change is live: policyd caches a key for under a second."""
    deadline = time.monotonic() + 2.0
    while True:
        reply = chat(gateway, SURFACES[1], key=key, stream=False, extra={})
        if set(_rate_headers(reply)) == expected:
            return
        assert time.monotonic() < deadline, f"rate headers {_rate_headers(reply)} != {expected}"
        time.sleep(0.1)


def test_rate_limit_headers_follow_the_keys_limits(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """OpenAI-style x-ratelimit-* headers appear, streamed or not, only when limits are set."""
    for surface in SURFACES:
        for stream in (False, True):
            reply = chat(gateway, surface, key=api_key, stream=stream, extra={})
            assert _rate_headers(reply) == {}, (surface.path, stream)

    run_cli("set-limits", "--key", api_key[:11], "--rpm", "100", "--tpm", "100000", env=stack.env)
    expected = {h.lower() for h in RATE_LIMIT_HEADERS}
    wait_for_rate_headers(gateway, api_key, expected)
    for surface in SURFACES:
        for stream in (False, True):
            reply = chat(gateway, surface, key=api_key, stream=stream, extra={})
            found = _rate_headers(reply)
            assert set(found) == expected, (surface.path, stream, found)
            assert found["x-ratelimit-limit-requests"] == "100"
            assert found["x-ratelimit-limit-tokens"] == "100000"
            assert 0 <= int(found["x-ratelimit-remaining-requests"]) < 100
            assert 0 <= int(found["x-ratelimit-remaining-tokens"]) < 100000

    # With only a request limit, only the request figures are sent.
    run_cli("set-limits", "--key", api_key[:11], "--unset", "tpm", env=stack.env)
    wait_for_rate_headers(gateway, api_key, {h for h in expected if h.endswith("-requests")})
