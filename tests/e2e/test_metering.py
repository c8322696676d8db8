"""meterd through the whole gateway: one audit row per request, exact usage, settled budgets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from compose.local.parts import Stack
from tests.e2e.conftest import StandinLog, make_key
from tests.e2e.test_admission import _usage, _wait_for_free_slots, set_limits
from tests.e2e.wire import raw_request

CHAT = [{"role": "user", "content": "Tell me about rivers."}]


async def _rows(stack: Stack, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_async_engine(stack.database_url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(sa.text(sql), params)
            return [dict(row._mapping) for row in result]
    finally:
        await engine.dispose()


def audit_rows(stack: Stack, request_ids: list[str], *, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until meterd has audited every request id; return the rows by id."""
    deadline = time.monotonic() + timeout
    while True:
        rows = asyncio.run(
            _rows(
                stack,
                "SELECT * FROM audit_log WHERE request_id::text = ANY(:ids)",
                ids=request_ids,
            )
        )
        found = {str(r["request_id"]): r for r in rows}
        if len(found) == len(set(request_ids)) or time.monotonic() > deadline:
            assert len(rows) == len(found), "a request was audited twice"
            return found
        time.sleep(0.1)


def test_every_request_yields_exactly_one_audit_row(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """Streamed and not, both surfaces, refusals included: one row each, right identity."""
    auth = {"Authorization": f"Bearer {api_key}"}
    sent: list[tuple[str, int, str | None]] = []  # (request id, status, expected key prefix)

    def record(reply: httpx.Response | Any, prefix: str | None) -> None:
        headers = reply.headers
        sent.append((headers["x-request-id"], reply.status_code, prefix))

    with httpx.Client(base_url=gateway, timeout=30) as client:
        for stream in (False, True):
            body = {"model": "llama3.2", "messages": CHAT, "stream": stream}
            record(client.post("/api/chat", json=body, headers=auth), api_key[:11])
            record(client.post("/v1/chat/completions", json=body, headers=auth), api_key[:11])
            generate = {"model": "llama3.2", "prompt": "Hello", "stream": stream}
            record(client.post("/api/generate", json=generate, headers=auth), api_key[:11])
        embed = {"model": "all-minilm", "input": "hello"}
        record(client.post("/api/embed", json=embed, headers=auth), api_key[:11])
        record(client.post("/v1/embeddings", json=embed, headers=auth), api_key[:11])
        record(client.get("/api/tags", headers=auth), api_key[:11])
        record(client.get("/v1/models", headers=auth), api_key[:11])
        # Refusals: no key, bad body, unknown endpoint, cloud model. A body refusal names
        # the key that sent it; a path refusal comes before the key is looked at.
        record(client.post("/api/chat", json=body), None)
        record(client.post("/api/chat", content=b"{not json", headers=auth), api_key[:11])
        record(client.post("/v1/responses", json={}, headers=auth), None)
        record(client.post("/api/chat", json={"model": "x:cloud"}, headers=auth), api_key[:11])
    blocked = raw_request(gateway, "POST", "/api/pull", body=b"{}")
    sent.append((blocked.headers["x-request-id"], blocked.status, None))

    rows = audit_rows(stack, [request_id for request_id, _, _ in sent])
    assert set(rows) == {request_id for request_id, _, _ in sent}
    for request_id, status, prefix in sent:
        row = rows[request_id]
        assert row["status"] == status, (request_id, row)
        assert row["key_prefix"] == prefix, row
        if status >= 400:
            assert row["prompt_tokens"] == 0
            assert row["completion_tokens"] == 0
    refusals = {rows[r]["refusal"] for r, status, _ in sent if status in (400, 401, 404)}
    assert {"missing_api_key", "invalid_request_body", "unknown_endpoint"} <= refusals


def test_non_streamed_usage_is_exact_and_settles_the_budget(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """Ollama's own counts land in the audit (exact) and replace the reservation."""
    body = {"model": "llama3.2", "messages": CHAT, "stream": False}
    reply = httpx.post(
        f"{gateway}/api/chat",
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    )
    answer = reply.json()
    request_id = reply.headers["x-request-id"]
    row = audit_rows(stack, [request_id])[request_id]
    assert row["usage_source"] == "exact"
    assert row["prompt_tokens"] == answer["prompt_eval_count"]
    assert row["completion_tokens"] == answer["eval_count"]
    assert row["model"] == "llama3.2"
    assert row["stream"] is False
    total = answer["prompt_eval_count"] + answer["eval_count"]
    deadline = time.monotonic() + 10
    while asyncio.run(_usage(stack, api_key[:11]))["daily_tokens"] != total:
        assert time.monotonic() < deadline, "the reservation was never replaced by usage"
        time.sleep(0.1)


def test_streamed_usage_is_estimated(stack: Stack, gateway: str, api_key: str) -> None:
    """A streamed reply is not captured; its audit row says `estimated`, close to the truth."""
    body = {"model": "llama3.2", "messages": CHAT, "stream": True}
    with httpx.stream(
        "POST",
        f"{gateway}/api/chat",
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    ) as reply:
        request_id = reply.headers["x-request-id"]
        lines = list(reply.iter_lines())
    final = httpx.Response(200, content=lines[-1]).json()
    row = audit_rows(stack, [request_id])[request_id]
    assert row["usage_source"] == "estimated"
    assert abs(row["completion_tokens"] - final["eval_count"]) <= max(3, final["eval_count"] // 10)


def test_upstream_failure_mid_stream_releases_the_lease(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """A stream that dies upstream still gets its line, its settlement and its slot back."""
    set_limits(stack, key=api_key[:11], concurrency=1)
    assert stack.standin_url is not None
    httpx.post(
        f"{stack.standin_url}/__standin/fail", json={"after_tokens": 3, "times": 1}, timeout=5
    ).raise_for_status()
    body = {"model": "llama3.2", "messages": CHAT, "stream": True}
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.stream(
        "POST", f"{gateway}/api/chat", json=body, headers=headers, timeout=30
    ) as reply:
        lines = list(reply.iter_lines())
    assert "error" in lines[-1]
    _wait_for_free_slots(stack, api_key[:11])
    again = httpx.post(
        f"{gateway}/api/chat", json={**body, "stream": False}, headers=headers, timeout=30
    )
    assert again.status_code == 200


def test_prompts_are_stored_only_for_keys_that_opted_in(stack: Stack, gateway: str) -> None:
    """With prompt logging on, the body is kept with its expiry; otherwise nothing is."""
    logged_key = make_key(stack, name="logged")
    plain_key = make_key(stack, name="plain")
    set_limits(stack, key=logged_key[:11], prompt_logging=True, prompt_retention_days=2)
    ids = []
    for key in (logged_key, plain_key):
        reply = httpx.post(
            f"{gateway}/api/chat",
            json={"model": "llama3.2", "messages": CHAT, "stream": False},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        ids.append(reply.headers["x-request-id"])
    audit_rows(stack, ids)
    stored = asyncio.run(
        _rows(
            stack,
            "SELECT request_id::text AS id, body, expires_at - stored_at AS keep FROM prompt_log",
        )
    )
    assert [r["id"] for r in stored] == [ids[0]]
    assert "Tell me about rivers." in stored[0]["body"]
    assert abs(stored[0]["keep"].total_seconds() - 2 * 86400) < 60
