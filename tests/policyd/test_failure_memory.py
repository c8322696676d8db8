"""redis-py under a burst: failure lookups and policyd's client wait for a connection."""

from __future__ import annotations

import asyncio
import secrets

import redis.asyncio as aioredis
from redis.exceptions import MaxConnectionsError

from policyd.authz.failures import FailureMemory
from policyd.shared.errors import StoreUnavailable
from policyd.shared.sentinel import redis_client

POOL = 4


async def _burst(redis_url: str, *, gate: asyncio.Semaphore | None, lookups: int) -> list[object]:
    client = aioredis.Redis.from_url(redis_url, max_connections=POOL)
    memory = FailureMemory(
        redis=client,
        memory_s=60,
        window_s=60,
        budget=10,
        timeout_s=5.0,
        gate=gate or asyncio.Semaphore(lookups),  # no gate: everyone at once
    )
    try:
        prefixes = [f"nz_{secrets.token_hex(4)}" for _ in range(lookups)]
        return await asyncio.gather(
            *(memory.look(prefix, "digest") for prefix in prefixes), return_exceptions=True
        )
    finally:
        await client.aclose()


def test_a_burst_of_lookups_waits_for_the_pool_instead_of_failing(redis_url: str) -> None:
    """200 lookups at once through a pool of 4 connections, 3 at a time: all answered."""
    results = asyncio.run(_burst(redis_url, gate=asyncio.Semaphore(POOL - 1), lookups=200))
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(not r.remembered for r in results)  # type: ignore[attr-defined]


def test_without_the_gate_redis_py_refuses_the_burst(redis_url: str) -> None:
    """Why the gate exists: redis-py raises once its pool is exhausted (a 503 upstream)."""
    results = asyncio.run(_burst(redis_url, gate=None, lookups=200))
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures
    assert all(isinstance(f, StoreUnavailable) for f in failures)
    assert isinstance(failures[0].__cause__, MaxConnectionsError)


def test_policyd_redis_client_waits_for_a_connection_in_a_burst(redis_url: str) -> None:
    """The client policyd opens (app.py) queues a burst beyond its pool; redis-py's
    default pool would raise MaxConnectionsError (a 503) for each call beyond it."""

    async def burst() -> list[object]:
        client = redis_client(redis_url, None, max_connections=POOL, wait_for_connection_s=5.0)
        try:
            return await asyncio.gather(
                *(client.get(f"nz:test:{n}") for n in range(200)), return_exceptions=True
            )
        finally:
            await client.aclose()

    results = asyncio.run(burst())
    assert [r for r in results if isinstance(r, BaseException)] == []
