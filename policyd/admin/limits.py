"""Operator view of limits: set and unset them, show effective values, read live usage.

A change is committed to Postgres, then the cached records of every affected key are
deleted from Redis; policyd processes hold their copy for under a second, so a change
takes effect within a second.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

import attrs
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from policyd.admin.accounts import AdminError, InvalidInput, invalidate_keys
from policyd.shared.bounds import LIMIT_MAXIMA
from policyd.shared.contract import calendar_day, calendar_month
from policyd.shared.keys import is_prefix
from policyd.shared.keyspace import DIMENSIONS, scope_keys
from policyd.shared.tables import LIMIT_COLUMNS, api_keys, tenants

__all__ = [
    "MAX_MODELS",
    "LimitView",
    "Target",
    "UsageView",
    "resolve_target",
    "set_limits",
    "show_limits",
    "usage",
]

#: Columns whose value must be a positive whole number (others may be zero = "none").
_POSITIVE: Final = frozenset(
    {"max_output_tokens", "max_keep_alive_seconds", "max_num_ctx", "prompt_retention_days"}
)
_WINDOW_S: Final = 60
#: Most entries in `allowed_models`, and the longest one (Ollama's names are far shorter).
MAX_MODELS: Final = 100
_MAX_MODEL_LEN: Final = 256
_MODEL_ENTRY: Final = re.compile(rf"^[\x21-\x2b\x2d-\x7e]{{1,{_MAX_MODEL_LEN}}}$")


@attrs.frozen(kw_only=True)
class Target:
    """A tenant, or one key of a tenant."""

    tenant_id: uuid.UUID
    tenant_name: str
    key_id: uuid.UUID | None = None
    key_prefix: str | None = None

    @property
    def label(self) -> str:
        return f"key {self.key_prefix}" if self.key_prefix else f"tenant {self.tenant_name}"


@attrs.frozen(kw_only=True)
class LimitView:
    """One limit as it applies: the value and where it comes from."""

    name: str
    value: Any
    source: str  # "key", "tenant", or "unset"
    tenant_cap: Any = None


@attrs.frozen(kw_only=True)
class UsageView:
    """Live figures of one limit dimension from Redis.

    `used` is None for a rate or concurrency dimension without a limit: admission keeps
    those windows and leases only while a limit applies (budgets are always counted).
    """

    name: str
    used: int | None
    limit: int | None


async def resolve_target(engine: AsyncEngine, *, tenant: str | None, key: str | None) -> Target:
    """Exactly one of `tenant` (name) or `key` (prefix) must be given."""
    if (tenant is None) == (key is None):
        raise InvalidInput("give exactly one of --tenant or --key")
    async with engine.connect() as conn:
        if key is not None:
            if not is_prefix(key):
                raise InvalidInput(f"invalid key prefix {key!r}: expected the form nz_xxxxxxxx")
            row = (
                await conn.execute(
                    sa.select(api_keys.c.id, api_keys.c.prefix, tenants.c.id, tenants.c.name)
                    .join(tenants, tenants.c.id == api_keys.c.tenant_id)
                    .where(api_keys.c.prefix == key)
                )
            ).one_or_none()
            if row is None:
                raise AdminError(f"no key with prefix {key!r}")
            return Target(tenant_id=row[2], tenant_name=row[3], key_id=row[0], key_prefix=row[1])
        found = (
            await conn.execute(
                sa.select(tenants.c.id, tenants.c.name).where(tenants.c.name == tenant)
            )
        ).one_or_none()
        if found is None:
            raise AdminError(f"unknown tenant {tenant!r}")
        return Target(tenant_id=found[0], tenant_name=found[1])


def _validate(values: Mapping[str, Any]) -> None:
    """Every value within what its column holds and the gateway accepts (`bounds`)."""
    for name, value in values.items():
        if name not in LIMIT_COLUMNS:
            raise InvalidInput(f"unknown limit {name!r}; known: {', '.join(LIMIT_COLUMNS)}")
        if value is None or isinstance(value, bool):
            continue
        if name == "allowed_models":
            _check_models(value)
            continue
        if not isinstance(value, int) or value < 0:
            raise InvalidInput(f"{name} must be a whole number of at least 0")
        if name in _POSITIVE and value == 0:
            raise InvalidInput(f"{name} must be at least 1")
        if value > LIMIT_MAXIMA[name]:
            raise InvalidInput(f"{name} must be at most {LIMIT_MAXIMA[name]}")


def _check_models(models: object) -> None:
    if not isinstance(models, tuple) or not 1 <= len(models) <= MAX_MODELS:
        raise InvalidInput(f"allowed models: give 1-{MAX_MODELS} names")
    for model in models:
        if not isinstance(model, str) or not _MODEL_ENTRY.fullmatch(model):
            raise InvalidInput(
                f"invalid model name {model!r}: use 1-{_MAX_MODEL_LEN} printable characters "
                "without spaces or commas"
            )


async def set_limits(
    engine: AsyncEngine, redis: aioredis.Redis, target: Target, values: Mapping[str, Any]
) -> None:
    """Store new values (None = unset) and make every affected policyd reload them."""
    if not values:
        raise InvalidInput("nothing to change: give at least one limit option or --unset")
    _validate(values)
    stored = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    async with engine.begin() as conn:
        if target.key_id is not None:
            await conn.execute(
                sa.update(api_keys).where(api_keys.c.id == target.key_id).values(**stored)
            )
            prefixes = [target.key_prefix or ""]
        else:
            await conn.execute(
                sa.update(tenants).where(tenants.c.id == target.tenant_id).values(**stored)
            )
            rows = await conn.execute(
                sa.select(api_keys.c.prefix).where(api_keys.c.tenant_id == target.tenant_id)
            )
            prefixes = [r[0] for r in rows]
    await invalidate_keys(redis, prefixes)


async def _rows(engine: AsyncEngine, target: Target) -> tuple[Any, Any | None]:
    async with engine.connect() as conn:
        tenant_row = (
            await conn.execute(sa.select(tenants).where(tenants.c.id == target.tenant_id))
        ).one()
        key_row = None
        if target.key_id is not None:
            key_row = (
                await conn.execute(sa.select(api_keys).where(api_keys.c.id == target.key_id))
            ).one()
    return tenant_row, key_row


async def show_limits(engine: AsyncEngine, target: Target) -> list[LimitView]:
    """Effective values; for a key, with the tenant's own value that also caps the sum."""
    tenant_row, key_row = await _rows(engine, target)
    views = []
    for name in LIMIT_COLUMNS:
        tenant_value = getattr(tenant_row, name)
        if key_row is None:
            source = "tenant" if tenant_value is not None else "unset"
            views.append(LimitView(name=name, value=tenant_value, source=source))
            continue
        own = getattr(key_row, name)
        if own is not None:
            views.append(LimitView(name=name, value=own, source="key", tenant_cap=tenant_value))
        elif tenant_value is not None:
            views.append(
                LimitView(name=name, value=tenant_value, source="tenant", tenant_cap=tenant_value)
            )
        else:
            views.append(LimitView(name=name, value=None, source="unset"))
    return views


#: Dimensions the admission script tracks only while a limit applies (see admit.lua).
_COUNTED_ONLY_WHEN_LIMITED: Final = frozenset({"rpm", "tpm", "concurrency"})


def _window_sum(buckets: Mapping[bytes, bytes], now_s: int) -> int:
    # Bucket fields are seconds; "sum" and "lo" are admit.lua's bookkeeping, and may
    # still include buckets that left the window since the last admission.
    return sum(int(v) for k, v in buckets.items() if k.isdigit() and int(k) > now_s - _WINDOW_S)


async def usage(
    engine: AsyncEngine, redis: aioredis.Redis, target: Target, *, now: float | None = None
) -> list[UsageView]:
    """Current figures of every limit dimension for the target, with its effective limit."""
    moment = now if now is not None else time.time()
    now_s, now_ms = int(moment), int(moment * 1000)
    at = dt.datetime.fromtimestamp(moment, dt.UTC)
    key_id = str(target.key_id) if target.key_id is not None else None
    rpm_key, tpm_key, conc_key, day_key, month_key, total_key = scope_keys(
        str(target.tenant_id), key_id, day=calendar_day(at), month=calendar_month(at)
    )
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(rpm_key)
        pipe.hgetall(tpm_key)
        pipe.zcount(conc_key, now_ms, "+inf")
        pipe.get(day_key)
        pipe.get(month_key)
        pipe.get(total_key)
        rpm, tpm, conc, day, month, total = await pipe.execute()
    used = [
        _window_sum(rpm, now_s),
        _window_sum(tpm, now_s),
        int(conc),
        int(day or 0),
        int(month or 0),
        int(total or 0),
    ]
    limits = {v.name: v.value for v in await show_limits(engine, target)}
    return [
        UsageView(
            name=name,
            used=None if name in _COUNTED_ONLY_WHEN_LIMITED and limits[name] is None else value,
            limit=limits[name],
        )
        for name, value in zip(DIMENSIONS, used, strict=True)
    ]
