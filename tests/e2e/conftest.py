"""Fixtures for end-to-end tests: the whole stack, a tenant and a key made by the CLI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import create_async_engine

from compose.local.cli_runner import run_cli, run_cli_json
from compose.local.parts import Stack, StackConfig
from compose.local.services import PostgresServer, RedisServer, Service
from policyd.admin import accounts as admin

__all__: list[str] = []


def _is_probe(request: dict[str, Any]) -> bool:
    """Caddy's active health check, or policyd's model listing refresh (several hosts)."""
    return "x-nz-health-check" in request["headers"]


class StandinLog:
    """What reached the Ollama stand-in, read through its introspection endpoints."""

    def __init__(self, url: str) -> None:
        self._url = url

    def clear(self) -> None:
        httpx.delete(f"{self._url}/__standin/requests", timeout=5).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        """What clients sent through the gateway (not Caddy's or policyd's own probes)."""
        reply = httpx.get(f"{self._url}/__standin/requests", timeout=5)
        reply.raise_for_status()
        found: list[dict[str, Any]] = reply.json()
        return [r for r in found if not _is_probe(r)]

    def raw_paths(self) -> list[str]:
        return [r["raw_path"] for r in self.requests()]


async def _create(database_url: str, redis_url: str, *, tenant: str, key: str | None) -> str:
    engine = create_async_engine(database_url)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        with contextlib.suppress(admin.AdminError):
            await admin.create_tenant(engine, name=tenant)
        if key is None:
            return tenant
        created = await admin.create_key(engine, redis, tenant=tenant, name=key, expires_at=None)
        return created.key
    finally:
        await redis.aclose()
        await engine.dispose()


def make_key(stack: Stack, *, tenant: str = "acme", name: str = "e2e") -> str:
    """A key made in-process with the same code the CLI runs (faster than a subprocess)."""
    return asyncio.run(_create(stack.database_url, stack.redis_url, tenant=tenant, key=name))


@pytest.fixture
def tenant(stack: Stack) -> str:
    """A tenant named `acme`."""
    asyncio.run(_create(stack.database_url, stack.redis_url, tenant="acme", key=None))
    return "acme"


@pytest.fixture
def api_key(stack: Stack, tenant: str) -> str:
    """A fresh key of tenant `acme`."""
    return make_key(stack, tenant=tenant)


@pytest.fixture
def cli_key(stack: Stack) -> str:
    """A fresh key of tenant `acme`, made by running the CLI as an operator would."""
    run_cli("create-tenant", "--name", "acme", env=stack.env)
    created: dict[str, str] = run_cli_json(
        "create-key", "--tenant", "acme", "--name", "e2e", env=stack.env
    )
    return created["key"]


@pytest.fixture
def standin_log(stack: Stack) -> StandinLog:
    """The stand-in's request log, emptied for this test."""
    assert stack.standin_url is not None
    log = StandinLog(stack.standin_url)
    log.clear()
    return log


@pytest.fixture(scope="session")
def slow_stack(
    run_dir: Path,
    postgres: Service[PostgresServer],
    database_url: str,
    redis_server: Service[RedisServer],
) -> Iterator[Stack]:
    """A second gateway (own stand-in, policyd, Caddy, meterd) whose stand-in streams at
    a human pace, so streams stay open for seconds; it shares Postgres and Redis."""
    built = Stack(
        StackConfig(
            base_dir=run_dir / "slow-stack", standin_tokens_per_s=20, standin_first_token_ms=50
        ),
        postgres=postgres,
        redis=redis_server,
    )
    with built:
        yield built


@pytest.fixture
def gateway(stack: Stack) -> str:
    """Base URL of the gateway (Caddy)."""
    return stack.gateway_url
