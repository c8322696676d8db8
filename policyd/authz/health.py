"""Readiness: can the gateway serve a request right now?

Each dependency is probed concurrently with its own timeout, so one hung store cannot
hide the state of the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["probe_all"]


async def _postgres(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))


async def _redis(client: aioredis.Redis) -> None:
    await client.ping()


async def _ollama(client: httpx.AsyncClient, base_url: str) -> None:
    response = await client.get(f"{base_url}/api/version")
    response.raise_for_status()


async def _check(name: str, probe: asyncio.Future[None], timeout_s: float) -> tuple[str, str]:
    try:
        async with asyncio.timeout(timeout_s):
            await probe
    except TimeoutError:
        return name, "timeout"
    except (SQLAlchemyError, RedisError, httpx.HTTPError, OSError) as exc:
        return name, f"down ({type(exc).__name__})"
    return name, "ok"


async def probe_all(
    *,
    engine: AsyncEngine,
    redis: aioredis.Redis,
    http: httpx.AsyncClient,
    ollama_urls: Sequence[str],
    timeout_s: float,
) -> tuple[dict[str, str], dict[str, str]]:
    """('postgres', 'redis', 'ollama') -> 'ok' or what is wrong, and each Ollama host's state.

    'ollama' is ok while at least one host answers; otherwise it is the first host's state.
    """
    probes = {
        "postgres": asyncio.ensure_future(_postgres(engine)),
        "redis": asyncio.ensure_future(_redis(redis)),
    }
    hosts = {url: asyncio.ensure_future(_ollama(http, url)) for url in ollama_urls}
    results = await asyncio.gather(
        *(_check(name, probe, timeout_s) for name, probe in (*probes.items(), *hosts.items()))
    )
    checks = dict(results[: len(probes)])
    host_states = dict(results[len(probes) :])
    states = list(host_states.values())
    checks["ollama"] = "ok" if "ok" in states else (states[0] if states else "no hosts")
    return checks, host_states
