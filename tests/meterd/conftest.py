"""Fixtures for meterd's tests: Postgres and Redis clients, tenants and keys, admission."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg  # type: ignore[import-untyped]
import attrs
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from meterd.db import create_pool
from meterd.settle import Store
from meterd.settle_script import SettleScript
from policyd.authz.limits import Limiter
from policyd.authz.records import KeyRecord, Limits
from policyd.shared.contract import load_script, settle_script
from policyd.shared.keyspace import tenant_base
from policyd.shared.tables import api_keys, tenants
from tests.meterd import records

__all__: list[str] = []


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the migrated session database (tables emptied for this test)."""
    built = create_async_engine(database_url, pool_size=2)
    yield built
    await built.dispose()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """meterd's asyncpg pool on the session database."""
    built = await create_pool(database_url)
    yield built
    await built.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the session Redis (flushed for this test)."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def settler(redis: aioredis.Redis, redis_url: str, *, timeout_s: float = 5.0) -> SettleScript:
    """meterd's settle-script runner for the Redis at `redis_url`."""
    return SettleScript(
        source=settle_script(), redis_url=redis_url, redis=redis, timeout_s=timeout_s
    )


@pytest.fixture
async def script(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[SettleScript]:
    """The settle script on the session Redis, as meterd runs it."""
    built = settler(redis, redis_url)
    yield built
    await built.aclose()


@attrs.frozen(kw_only=True)
class Stores:
    """Postgres and Redis for one test, with the clients both meterd and the test use."""

    #: The test's own view of the tables.
    engine: AsyncEngine
    #: meterd's pool on the same database.
    pool: asyncpg.Pool
    redis: aioredis.Redis
    script: SettleScript

    def store(self, *, node: str = "node-a", script: SettleScript | None = None) -> Store:
        """meterd's settlement store for one node, settling through `script` (or ours)."""
        return records.store(self.pool, script or self.script, node=node)


@pytest.fixture
def stores(
    engine: AsyncEngine, pool: asyncpg.Pool, redis: aioredis.Redis, script: SettleScript
) -> Stores:
    """Empty tables and an empty Redis, with every client a settlement test needs."""
    return Stores(engine=engine, pool=pool, redis=redis, script=script)


@pytest.fixture
async def key(engine: AsyncEngine) -> KeyRecord:
    """A fresh tenant and key (no prompt logging) in policyd's tables."""
    return await create_key(engine)


async def create_key(
    engine: AsyncEngine,
    *,
    prompt_logging: bool | None = None,
    tenant_prompt_logging: bool | None = None,
    retention_days: int | None = None,
) -> KeyRecord:
    """A tenant and key in policyd's tables, as the record policyd would cache."""
    tenant_id, key_id = uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(tenants).values(
                id=tenant_id, name=f"t-{tenant_id.hex[:8]}", prompt_logging=tenant_prompt_logging
            )
        )
        await conn.execute(
            sa.insert(api_keys).values(
                id=key_id,
                tenant_id=tenant_id,
                name="k",
                prefix=f"nz_{key_id.hex[:8]}",
                secret_hash="x",
                prompt_logging=prompt_logging,
                prompt_retention_days=retention_days,
            )
        )
    return KeyRecord(
        key_id=str(key_id),
        prefix=f"nz_{key_id.hex[:8]}",
        tenant_id=str(tenant_id),
        tenant_name="t",
        digest="d",
        expires_at=None,
        revoked=False,
        key_limits=Limits(concurrency=1000),
        tenant_limits=Limits(),
    )


#: Concurrency lease of the requests these tests admit.
LEASE_S = 600


def limiter(redis: aioredis.Redis, *, clock: Callable[[], float] = time.time) -> Limiter:
    """policyd's admission against this Redis; tenants load empty (nothing spent yet)."""
    source = load_script()

    async def load_empty(rec: KeyRecord) -> None:
        await redis.eval(source, 1, f"{tenant_base(rec.tenant_id)}loaded", 0)

    return Limiter(
        redis=redis, load_tenant=load_empty, lease_ttl_s=LEASE_S, timeout_s=5, clock=clock
    )


async def admit(
    redis: aioredis.Redis, key: KeyRecord, *, reserve: int, at: float | None = None
) -> uuid.UUID:
    """Admit one request through policyd's real admission script (at unix time `at`, or now).

    Returns its request id; fails the test if admission refuses it.
    """
    clock = time.time if at is None else lambda: at
    request_id = uuid.uuid4()
    admission = await limiter(redis, clock=clock).admit(
        key, request_id=str(request_id), reserve=reserve
    )
    assert admission.refusal is None
    return request_id


async def spent(redis: aioredis.Redis, record: KeyRecord) -> int:
    """The key's total-budget counter in Redis."""
    value = await redis.get(f"{tenant_base(record.tenant_id)}tot:k:{record.key_id}")
    return int(value or 0)


async def leases(redis: aioredis.Redis, record: KeyRecord) -> int:
    """Concurrency leases the key holds in Redis."""
    return int(await redis.zcard(f"{tenant_base(record.tenant_id)}conc:k:{record.key_id}"))
