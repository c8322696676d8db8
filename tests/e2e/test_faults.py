"""Faults through the real stack: poison data never stops meterd, leases depend only on
their request's end, and what a request cost is settled even when its data is odd."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from compose.local.cli_runner import run_cli
from compose.local.parts import Stack
from policyd.shared.bounds import INT4_MAX, MAX_PROMPT_RETENTION_DAYS, MAX_TOKENS
from tests.e2e.conftest import make_key
from tests.e2e.test_admission import _usage, set_limits
from tests.e2e.test_metering import _rows, audit_rows

CHAT = [{"role": "user", "content": "Tell me about rivers."}]


def _chat(gateway: str, key: str, *, stream: bool = False, content: str | None = None) -> str:
    """One chat request read to its end; returns its request id (asserting 200)."""
    messages = CHAT if content is None else [{"role": "user", "content": content}]
    body = {"model": "llama3.2", "messages": messages, "stream": stream}
    reply = httpx.post(
        f"{gateway}/api/chat", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    return reply.headers["x-request-id"]


def _sql(stack: Stack, sql: str, **params: Any) -> list[dict[str, Any]]:
    return asyncio.run(_rows(stack, sql, **params))


def _execute(stack: Stack, sql: str, **params: Any) -> None:
    async def run() -> None:
        engine = create_async_engine(stack.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text(sql), params)
        finally:
            await engine.dispose()

    asyncio.run(run())


def _meterd_pid(stack: Stack) -> int:
    return stack.meterd.handle.pid


# --- 1. poison data ---------------------------------------------------------------------------


def test_a_retention_no_column_can_hold_does_not_stop_metering(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """A retention written behind the CLI's back (int4 max days) is bounded to the stated
    maximum; the prompt is stored, and the next tenant's request settles as usual."""
    pid = _meterd_pid(stack)
    set_limits(stack, key=api_key[:11], prompt_logging=True)
    _execute(
        stack,
        "UPDATE api_keys SET prompt_retention_days = 2147483647 WHERE prefix = :prefix",
        prefix=api_key[:11],
    )
    poisoned = _chat(gateway, api_key)
    other = _chat(gateway, make_key(stack, tenant="beta", name="other"))
    rows = audit_rows(stack, [poisoned, other])
    assert rows[poisoned]["refusal"] is None
    assert rows[other]["usage_source"] == "exact"
    kept = _sql(stack, "SELECT expires_at - stored_at AS keep FROM prompt_log")
    assert len(kept) == 1
    assert abs(kept[0]["keep"].days - 3650) <= 1
    assert _meterd_pid(stack) == pid, "meterd restarted"


def test_rows_postgres_refuses_are_quarantined_and_the_rest_settles(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """A request whose prompt row Postgres refuses (a constraint) is audited as
    quarantined and charged its reservation; requests around it settle normally; meterd
    stays up and counts it as a bad line."""
    pid = _meterd_pid(stack)
    key = api_key[:11]
    set_limits(stack, key=key, prompt_logging=True, concurrency=1)
    _execute(
        stack,
        "ALTER TABLE prompt_log ADD CONSTRAINT test_poison CHECK (body NOT LIKE '%POISON%')",
    )
    try:
        before = _chat(gateway, api_key)
        poisoned = _chat(gateway, api_key, content="POISON " * 20)
        after = _chat(gateway, api_key)
        rows = audit_rows(stack, [before, poisoned, after])
    finally:
        _execute(stack, "ALTER TABLE prompt_log DROP CONSTRAINT test_poison")
    assert rows[poisoned]["refusal"] == "meter_quarantined"
    assert rows[poisoned]["usage_source"] == "reserved"
    assert rows[poisoned]["completion_tokens"] == rows[poisoned]["reserved_tokens"]
    for good in (before, after):
        assert rows[good]["refusal"] is None
    stored = {r["id"] for r in _sql(stack, "SELECT request_id::text AS id FROM prompt_log")}
    assert stored == {before, after}
    bad = _sql(stack, "SELECT sum(bad_lines) AS n FROM meter_checkpoints")
    assert bad[0]["n"] >= 1
    assert asyncio.run(_usage(stack, key))["concurrency"] == 0
    assert _meterd_pid(stack) == pid, "meterd restarted"


def test_poison_lines_are_skipped_and_the_next_request_settles(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """Lines with malformed or out-of-range values (appended to Caddy's own log) are
    counted and skipped; meterd settles the request that follows them."""
    pid = _meterd_pid(stack)
    grant = f"log=-- key={uuid.uuid4()} prefix=nz_aaaaaaaa tenant={uuid.uuid4()} surface=ollama"
    base: dict[str, Any] = {
        "ts": time.time(),
        "status": 200,
        "request": {"method": "POST", "uri": "/api/chat", "client_ip": "fe80::1%eth0"},
        "nz_grant": grant + " stream=0 usage=0 reserved=999999999999999999 prompt=9" * 3,
    }
    poison = [
        b"not json at all",
        b"{" + b'"a":[' * 10_000,
        json.dumps({**base, "uuid": str(uuid.uuid4()), "ts": 1e300}).encode(),
        json.dumps({**base, "uuid": str(uuid.uuid4()), "status": 10**30}).encode(),
        json.dumps(
            {**base, "uuid": str(uuid.uuid4()), "size": -(10**40), "duration": float("1e308")}
        ).encode(),
        json.dumps({**base, "uuid": str(uuid.uuid4()), "resp_body": "\udcff\x00"}).encode(),
    ]
    fd = os.open(stack.access_log, os.O_WRONLY | os.O_APPEND)
    try:
        for line in poison:
            os.write(fd, line + b"\n")
    finally:
        os.close(fd)
    good = _chat(gateway, api_key)
    assert audit_rows(stack, [good])[good]["usage_source"] == "exact"
    assert _meterd_pid(stack) == pid, "meterd restarted"


# --- 3. leases --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_sequential_requests_on_a_concurrency_1_key_are_never_refused(
    stack: Stack, gateway: str, api_key: str, stream: bool
) -> None:
    """Each request starts only after the previous one ended: none is refused, however
    soon after the end it comes (the lease is released on its line, admission waits
    briefly for a lease about to free)."""
    set_limits(stack, key=api_key[:11], concurrency=1)
    statuses = []
    with httpx.Client(base_url=gateway, timeout=30) as client:
        for _ in range(20):
            body = {"model": "llama3.2", "messages": CHAT, "stream": stream}
            with client.stream(
                "POST", "/api/chat", json=body, headers={"Authorization": f"Bearer {api_key}"}
            ) as reply:
                reply.read()
                statuses.append(reply.status_code)
    assert statuses == [200] * 20


def test_a_postgres_outage_holds_no_lease(stack: Stack, gateway: str, api_key: str) -> None:
    """With Postgres down, a cached key limited to one request in flight keeps working
    request after request (meterd's Redis step does not wait for Postgres); when Postgres
    is back every request is audited once."""
    key = api_key[:11]
    set_limits(stack, key=key, concurrency=1)
    ids = [_chat(gateway, api_key)]  # the key's record is cached now
    audit_rows(stack, ids)
    stack.postgres.stop()
    try:
        ids += [_chat(gateway, api_key, stream=n % 2 == 0) for n in range(8)]
    finally:
        stack.postgres.start()
    rows = audit_rows(stack, ids, timeout=60)
    assert sorted(rows) == sorted(ids)
    assert asyncio.run(_usage(stack, key))["concurrency"] == 0


def test_the_largest_values_the_cli_accepts_keep_the_gateway_working(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """Every limit at the largest value the CLI accepts, set by the CLI itself: requests
    are admitted, settled and their prompts kept for the longest retention."""
    tokens = str(MAX_TOKENS)
    run_cli(
        "set-limits",
        "--key",
        api_key[:11],
        "--rpm",
        str(INT4_MAX),
        "--concurrency",
        str(INT4_MAX),
        "--max-output-tokens",
        str(INT4_MAX),
        "--tpm",
        tokens,
        "--daily-tokens",
        tokens,
        "--monthly-tokens",
        tokens,
        "--total-tokens",
        tokens,
        "--prompt-logging",
        "on",
        "--prompt-retention-days",
        str(MAX_PROMPT_RETENTION_DAYS),
        env=stack.env,
    )
    long_lived = run_cli(
        "create-key", "--tenant", "acme", "--name", "forever", "--expires", "36500d", env=stack.env
    ).stdout.strip()
    ids = [_chat(gateway, api_key), _chat(gateway, api_key, stream=True)]
    ids.append(_chat(gateway, long_lived))
    rows = audit_rows(stack, ids)
    assert sorted(rows) == sorted(ids)
    kept = _sql(stack, "SELECT expires_at - stored_at AS keep FROM prompt_log")
    assert len(kept) == 2
    assert all(abs(k["keep"].days - MAX_PROMPT_RETENTION_DAYS) <= 1 for k in kept)
    listed = run_cli("list-keys", env=stack.env)
    assert listed.returncode == 0
