"""Limits hold under concurrency, across processes, and when Redis fails."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from compose.local.parts import Stack
from compose.local.services import PolicydServer, Service
from policyd.admin import limits as limits_admin
from tests.e2e.conftest import make_key

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


async def _set_limits(stack: Stack, values: dict[str, Any], *, key: str | None = None) -> None:
    engine = create_async_engine(stack.database_url)
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        target = await limits_admin.resolve_target(engine, tenant=None if key else "acme", key=key)
        await limits_admin.set_limits(engine, redis, target, values)
    finally:
        await redis.aclose()
        await engine.dispose()


def set_limits(stack: Stack, *, key: str | None = None, **values: Any) -> None:
    """Set limits in-process with the CLI's code (key: a key prefix, else tenant acme)."""
    asyncio.run(_set_limits(stack, values, key=key))


async def authz(socket_path: Path, key: str, body: dict[str, Any]) -> int:
    """Ask one policyd directly, exactly as Caddy's forward_auth does; return the status."""
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    request = (
        "GET /authz HTTP/1.1\r\nHost: policyd\r\nConnection: close\r\n"
        "X-Forwarded-Method: POST\r\nX-Forwarded-Uri: /api/chat\r\n"
        f"X-Nz-Body: {encoded}\r\nAuthorization: Bearer {key}\r\n"
        f"X-Request-Id: {uuid.uuid4()}\r\n\r\n"
    )
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        writer.write(request.encode())
        await writer.drain()
        status_line = await reader.readline()
        await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


@pytest.fixture
def second_policyd(stack: Stack) -> Iterator[Path]:
    """Another policyd process on its own socket, sharing the stack's Redis and Postgres."""
    socket_path = stack.config.base_dir / "policyd-2.sock"
    settings = {
        name: stack.env[name]
        for name in ("NZ_DATABASE_URL", "NZ_REDIS_URL", "NZ_OLLAMA_URL", "NZ_KEY_HMAC_SECRET")
    }
    service = Service(
        PolicydServer(
            socket_path=socket_path,
            log_dir=stack.config.log_dir,
            settings=settings,
            name="policyd-2",
        )
    )
    service.start()
    try:
        yield socket_path
    finally:
        service.stop()


def test_rpm_holds_across_two_policyd_processes(
    stack: Stack, tenant: str, second_policyd: Path
) -> None:
    """K parallel requests split over two policyds against an RPM of N: exactly N pass."""
    key = make_key(stack)
    set_limits(stack, key=key[:11], rpm=9)
    sockets = [stack.policyd_socket, second_policyd]

    async def burst() -> list[int]:
        return list(await asyncio.gather(*(authz(sockets[i % 2], key, CHAT) for i in range(40))))

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 9
    assert statuses.count(429) == 31


async def _hold_streams(gateway: str, key: str, count: int, *, read_all: bool) -> list[int]:
    """Open `count` streams at once and keep the admitted ones open until all have answered.

    Then either read every stream to its end or drop them mid-stream (a client disconnect).
    Returns the statuses.
    """
    body = {**CHAT, "options": {"num_predict": 100}}  # 5 s at the slow stand-in's pace
    answered = asyncio.Event()
    statuses: list[int] = []

    async def one(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{gateway}/api/chat", json=body) as reply:
            statuses.append(reply.status_code)
            if len(statuses) == count:
                answered.set()
            await answered.wait()
            if read_all:
                async for _ in reply.aiter_lines():
                    pass

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(count))), 60)
    return statuses


def _wait_for_free_slots(stack: Stack, prefix: str, *, timeout: float = 15.0) -> None:
    """Wait until meterd has settled every stream of the key (no lease left)."""
    deadline = time.monotonic() + timeout
    while True:
        views = asyncio.run(_usage(stack, prefix))
        if views["concurrency"] == 0:
            return
        assert time.monotonic() < deadline, f"leases still held: {views}"
        time.sleep(0.1)


async def _usage(stack: Stack, prefix: str) -> dict[str, int | None]:
    engine = create_async_engine(stack.database_url)
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        target = await limits_admin.resolve_target(engine, tenant=None, key=prefix)
        views = await limits_admin.usage(engine, redis, target)
    finally:
        await redis.aclose()
        await engine.dispose()
    return {v.name: v.used for v in views}


@pytest.mark.parametrize("read_all", [True, False], ids=["finished", "disconnected"])
def test_concurrency_limit_through_caddy(slow_stack: Stack, tenant: str, read_all: bool) -> None:
    """M simultaneous streams against a concurrency of N: exactly N stream while they run;
    when they finish or the clients disconnect, meterd releases the slots."""
    stack, gateway = slow_stack, slow_stack.gateway_url
    key = make_key(stack)
    set_limits(stack, key=key[:11], concurrency=3)
    statuses = asyncio.run(_hold_streams(gateway, key, 12, read_all=read_all))
    assert sorted(statuses) == [200] * 3 + [429] * 9
    _wait_for_free_slots(stack, key[:11])
    again = asyncio.run(_hold_streams(gateway, key, 3, read_all=False))
    assert again == [200, 200, 200]


async def _seed_ledger(stack: Stack, key: str, tokens: int) -> None:
    """Write settled usage into the ledger, as meterd does."""
    engine = create_async_engine(stack.database_url)
    try:
        async with engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.text("SELECT id, tenant_id FROM api_keys WHERE prefix = :p"),
                    {"p": key[:11]},
                )
            ).one()
            await conn.execute(
                sa.text(
                    "INSERT INTO usage_ledger (key_id, tenant_id, day, requests,"
                    " prompt_tokens, completion_tokens) VALUES (:k, :t, :d, 1, :p, :c)"
                ),
                {
                    "k": row.id,
                    "t": row.tenant_id,
                    "d": dt.datetime.now(dt.UTC).date(),
                    "p": tokens // 2,
                    "c": tokens - tokens // 2,
                },
            )
    finally:
        await engine.dispose()


async def _day_used(stack: Stack, prefix: str) -> int:
    used = (await _usage(stack, prefix))["daily_tokens"]
    assert used is not None  # budgets are always counted
    return used


async def _ledger_today(stack: Stack, prefix: str) -> int:
    engine = create_async_engine(stack.database_url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                sa.text(
                    "SELECT coalesce(sum(l.prompt_tokens + l.completion_tokens), 0)"
                    " FROM usage_ledger l JOIN api_keys k ON k.id = l.key_id"
                    " WHERE k.prefix = :p AND l.day = :d"
                ),
                {"p": prefix, "d": dt.datetime.now(dt.UTC).date()},
            )
            return int(found.scalar_one())
    finally:
        await engine.dispose()


def _settled(stack: Stack, prefix: str, *, timeout: float = 15.0) -> int:
    """Wait until Redis' day counter equals the durable ledger (meterd caught up)."""
    deadline = time.monotonic() + timeout
    while True:
        redis_view = asyncio.run(_day_used(stack, prefix))
        ledger = asyncio.run(_ledger_today(stack, prefix))
        if redis_view == ledger:
            return ledger
        assert time.monotonic() < deadline, f"redis {redis_view} != ledger {ledger}"
        time.sleep(0.1)


def test_redis_outage_fails_closed_and_budgets_are_rebuilt(
    stack: Stack, gateway: str, tenant: str
) -> None:
    """Redis down: only 503s. Redis back empty: budgets come back from the Postgres ledger."""
    key = make_key(stack)
    prefix = key[:11]
    asyncio.run(_seed_ledger(stack, key, 4000))
    set_limits(stack, daily_tokens=5000)
    headers = {"Authorization": f"Bearer {key}"}
    body = {**CHAT, "stream": False, "options": {"num_predict": 100}}
    first = httpx.post(f"{gateway}/api/chat", json=body, headers=headers, timeout=10)
    assert first.status_code == 200
    before = _settled(stack, prefix)
    assert before > 4000  # the seeded ledger plus the first request's actual usage

    stack.redis.stop()
    try:
        for _ in range(5):
            reply = httpx.post(f"{gateway}/api/chat", json=body, headers=headers, timeout=10)
            assert reply.status_code == 503
            assert reply.headers["retry-after"] == "1"
    finally:
        stack.redis.start()

    # Redis came back empty: the next request first rebuilds the tenant from the ledger,
    # so once meterd settled it, Redis holds the ledger's figure again, nothing lost.
    again = httpx.post(f"{gateway}/api/chat", json=body, headers=headers, timeout=10)
    assert again.status_code == 200
    after = _settled(stack, prefix)
    assert after > before
    big = {**CHAT, "stream": False, "options": {"num_predict": 900}}
    refused = httpx.post(f"{gateway}/api/chat", json=big, headers=headers, timeout=10)
    assert refused.status_code == 429
    assert "daily token budget" in refused.json()["error"]
