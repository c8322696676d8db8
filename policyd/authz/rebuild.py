"""Rebuild a tenant's budget counters in Redis from Postgres' usage ledger.

Redis is a cache of the budgets, Postgres (meterd's `usage_ledger`) their durable record.
Each tenant carries a `loaded` sentinel in Redis; when it is missing (first use, or Redis
restarted empty) admission waits for this rebuild, and a failed rebuild refuses the
request (503). Nothing is admitted against counters that may be too low.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from policyd.authz.limits import next_day, next_month
from policyd.authz.records import KeyRecord
from policyd.shared.contract import calendar_day, calendar_month
from policyd.shared.errors import redis_failure, sql_failure
from policyd.shared.keyspace import BudgetCounter, load_call, scope_keys
from policyd.shared.tables import usage_ledger

__all__ = ["TenantLoader"]


class TenantLoader:
    """Loads one tenant's day/month/total counters, once per Redis lifetime."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        redis: aioredis.Redis,
        load_script: str,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._redis = redis
        self._script = load_script
        self._timeout_s = timeout_s
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    async def __call__(self, record: KeyRecord) -> None:
        lock = self._locks.setdefault(record.tenant_id, asyncio.Lock())
        async with lock:
            await self._load(record.tenant_id)

    async def _load(self, tenant_id: str) -> None:
        started_ms = int(self._clock() * 1000)
        now = dt.datetime.fromtimestamp(started_ms / 1000, dt.UTC)
        today = now.date()
        month_start = today.replace(day=1)
        tokens = usage_ledger.c.prompt_tokens + usage_ledger.c.completion_tokens
        stmt = (
            sa.select(
                usage_ledger.c.key_id,
                sa.func.coalesce(sa.func.sum(tokens).filter(usage_ledger.c.day == today), 0),
                sa.func.coalesce(sa.func.sum(tokens).filter(usage_ledger.c.day >= month_start), 0),
                sa.func.coalesce(sa.func.sum(tokens), 0),
            )
            .where(usage_ledger.c.tenant_id == uuid.UUID(tenant_id))
            .group_by(usage_ledger.c.key_id)
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._engine.connect() as conn:
                    rows = (await conn.execute(stmt)).all()
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise sql_failure(exc) from exc
        day, month = calendar_day(now), calendar_month(now)
        day_ttl = int((next_day(now) - now).total_seconds()) + 86400
        month_ttl = int((next_month(now) - now).total_seconds()) + 86400
        counters: list[BudgetCounter] = []
        sums = [0, 0, 0]
        ttls = (day_ttl, month_ttl, 0)
        for key_id, *figures in rows:
            values = [int(v) for v in figures]
            budget = scope_keys(tenant_id, str(key_id), day=day, month=month)[3:]
            counters += zip(budget, values, ttls, strict=True)
            sums = [s + v for s, v in zip(sums, values, strict=True)]
        budget = scope_keys(tenant_id, None, day=day, month=month)[3:]
        counters += zip(budget, sums, ttls, strict=True)
        keys, args = load_call(tenant_id, now_ms=started_ms, counters=counters)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.eval(self._script, len(keys), *keys, *args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
