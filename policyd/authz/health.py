"""Readiness: can the gateway serve a request right now?

Each dependency is probed concurrently with its own timeout, so one hung store cannot
hide the state of the others.
"""

from __future__ import annotations

import asyncio

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
    ollama_url: str,
    timeout_s: float,
) -> dict[str, str]:
    """Map each dependency ('postgres', 'redis', 'ollama') to 'ok' or what is wrong."""
    probes = {
        "postgres": asyncio.ensure_future(_postgres(engine)),
        "redis": asyncio.ensure_future(_redis(redis)),
        "ollama": asyncio.ensure_future(_ollama(http, ollama_url)),
    }
    results = await asyncio.gather(
        *(_check(name, probe, timeout_s) for name, probe in probes.items())
    )
    return dict(results)
