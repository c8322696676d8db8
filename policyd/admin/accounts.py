"""Operator actions on tenants and keys; the CLI is a thin shell around these.

Each action is one transaction. After a change that affects admission, the key's cached
record in Redis is deleted so every policyd reloads it from Postgres (policyd keeps its
own copy for under a second).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import uuid
from typing import Any, Final

import attrs
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from policyd.shared.bounds import MAX_EXPIRY_DAYS
from policyd.shared.errors import GatewayError
from policyd.shared.keys import generate_key, is_prefix
from policyd.shared.keyspace import key_record
from policyd.shared.tables import api_keys, tenants

__all__ = [
    "AdminError",
    "CacheInvalidationError",
    "CreatedKey",
    "InvalidInput",
    "KeyInfo",
    "TenantInfo",
    "check_expiry",
    "create_key",
    "create_tenant",
    "find_tenant_id",
    "invalidate_keys",
    "list_keys",
    "list_tenants",
    "revoke_key",
]

_TENANT_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_MAX_KEY_NAME: Final = 100
_PREFIX_ATTEMPTS: Final = 5


class AdminError(GatewayError):
    """An operator request that cannot be carried out; the message says why."""


class InvalidInput(AdminError):
    """An operator value the stores cannot hold or the gateway does not accept (exit 2)."""


class CacheInvalidationError(AdminError):
    """Postgres was changed, but Redis could not be told; the change is not yet live."""


@attrs.frozen(kw_only=True)
class TenantInfo:
    id: str
    name: str
    created_at: dt.datetime
    keys: int


@attrs.frozen(kw_only=True)
class KeyInfo:
    """A key as listed: never its secret or hash."""

    id: str
    prefix: str
    name: str
    tenant: str
    status: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


@attrs.frozen(kw_only=True)
class CreatedKey:
    """A new key; `key` is the only copy of the secret there will ever be."""

    key: str = attrs.field(repr=False)
    prefix: str
    name: str
    tenant: str
    id: str
    expires_at: dt.datetime | None


def _check_tenant_name(name: str) -> None:
    if not _TENANT_NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid tenant name {name!r}: use 1-63 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )


def _check_key_name(name: str) -> None:
    if not name.strip() or len(name) > _MAX_KEY_NAME or not name.isprintable():
        raise InvalidInput(f"invalid key name: use 1-{_MAX_KEY_NAME} printable characters")


def check_expiry(expires_at: dt.datetime, *, now: dt.datetime | None = None) -> None:
    """An expiry must lie ahead, and at most `MAX_EXPIRY_DAYS` ahead (finite, storable)."""
    current = now or dt.datetime.now(dt.UTC)
    if expires_at.tzinfo is None:
        raise InvalidInput("the expiry needs a time zone")
    if expires_at <= current:
        raise InvalidInput("the expiry must be in the future")
    if expires_at > current + dt.timedelta(days=MAX_EXPIRY_DAYS):
        raise InvalidInput(f"the expiry may lie at most {MAX_EXPIRY_DAYS} days ahead")


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """A stored time as an aware datetime: `infinity`, written by older versions, comes
    back from asyncpg as a naive datetime.max."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


async def create_tenant(engine: AsyncEngine, *, name: str) -> TenantInfo:
    _check_tenant_name(name)
    stmt = (
        sa.insert(tenants)
        .values(name=name)
        .returning(tenants.c.id, tenants.c.name, tenants.c.created_at)
    )
    try:
        async with engine.begin() as conn:
            row = (await conn.execute(stmt)).one()
    except IntegrityError:
        raise AdminError(f"tenant {name!r} already exists") from None
    return TenantInfo(id=str(row.id), name=row.name, created_at=row.created_at, keys=0)


async def list_tenants(engine: AsyncEngine) -> list[TenantInfo]:
    counts = (
        sa.select(api_keys.c.tenant_id, sa.func.count().label("n"))
        .group_by(api_keys.c.tenant_id)
        .subquery()
    )
    stmt = (
        sa.select(tenants.c.id, tenants.c.name, tenants.c.created_at, counts.c.n)
        .outerjoin(counts, counts.c.tenant_id == tenants.c.id)
        .order_by(tenants.c.name)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [
        TenantInfo(id=str(r.id), name=r.name, created_at=r.created_at, keys=r.n or 0) for r in rows
    ]


async def find_tenant_id(conn: Any, name: str) -> uuid.UUID:
    """The id of the tenant called `name`; AdminError if there is none."""
    row = (await conn.execute(sa.select(tenants.c.id).where(tenants.c.name == name))).one_or_none()
    if row is None:
        raise AdminError(f"unknown tenant {name!r}")
    tenant_id: uuid.UUID = row.id
    return tenant_id


async def create_key(
    engine: AsyncEngine,
    redis: aioredis.Redis | None,
    *,
    tenant: str,
    name: str,
    expires_at: dt.datetime | None,
) -> CreatedKey:
    _check_key_name(name)
    if expires_at is not None:
        check_expiry(expires_at)
    for _ in range(_PREFIX_ATTEMPTS):
        generated = generate_key()
        try:
            async with engine.begin() as conn:
                tenant_id = await find_tenant_id(conn, tenant)
                duplicate = await conn.execute(
                    sa.select(api_keys.c.id).where(
                        api_keys.c.tenant_id == tenant_id, api_keys.c.name == name
                    )
                )
                if duplicate.first() is not None:
                    raise AdminError(f"tenant {tenant!r} already has a key named {name!r}")
                row = (
                    await conn.execute(
                        sa.insert(api_keys)
                        .values(
                            tenant_id=tenant_id,
                            name=name,
                            prefix=generated.prefix,
                            secret_hash=generated.secret_hash,
                            expires_at=expires_at,
                        )
                        .returning(api_keys.c.id)
                    )
                ).one()
        except IntegrityError as exc:
            if "uq_api_keys_prefix" in str(exc.orig):
                continue  # a prefix collision: draw another key
            raise AdminError(f"tenant {tenant!r} already has a key named {name!r}") from None
        # A client may have probed this prefix before it existed; forget that answer.
        # Best effort: the negative entry expires within seconds anyway.
        if redis is not None:
            with contextlib.suppress(CacheInvalidationError):
                await invalidate_keys(redis, [generated.prefix])
        return CreatedKey(
            key=generated.full,
            prefix=generated.prefix,
            name=name,
            tenant=tenant,
            id=str(row.id),
            expires_at=expires_at,
        )
    raise AdminError("could not draw an unused key prefix; try again")


def _status(row: Any, now: dt.datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    expires_at = _aware(row.expires_at)
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"


async def list_keys(
    engine: AsyncEngine, *, tenant: str | None, prefix: str | None = None
) -> list[KeyInfo]:
    stmt = (
        sa.select(
            api_keys.c.id,
            api_keys.c.prefix,
            api_keys.c.name,
            tenants.c.name.label("tenant"),
            api_keys.c.created_at,
            api_keys.c.expires_at,
            api_keys.c.revoked_at,
            api_keys.c.last_used_at,
        )
        .join(tenants, tenants.c.id == api_keys.c.tenant_id)
        .order_by(tenants.c.name, api_keys.c.created_at)
    )
    async with engine.connect() as conn:
        if tenant is not None:
            await find_tenant_id(conn, tenant)
            stmt = stmt.where(tenants.c.name == tenant)
        if prefix is not None:
            stmt = stmt.where(api_keys.c.prefix == prefix)
        rows = (await conn.execute(stmt)).all()
    now = dt.datetime.now(dt.UTC)
    return [
        KeyInfo(
            id=str(r.id),
            prefix=r.prefix,
            name=r.name,
            tenant=r.tenant,
            status=_status(r, now),
            created_at=r.created_at,
            expires_at=_aware(r.expires_at),
            revoked_at=_aware(r.revoked_at),
            last_used_at=_aware(r.last_used_at),
        )
        for r in rows
    ]


async def invalidate_keys(redis: aioredis.Redis, prefixes: list[str]) -> None:
    """Delete cached records so every policyd reloads these keys from Postgres."""
    if not prefixes:
        return
    try:
        await redis.delete(*(key_record(p) for p in prefixes))
    except (RedisError, OSError) as exc:
        raise CacheInvalidationError(
            f"the change is saved, but Redis could not be updated ({type(exc).__name__}); "
            "run the command again once Redis is reachable"
        ) from exc


async def revoke_key(engine: AsyncEngine, redis: aioredis.Redis, *, prefix: str) -> KeyInfo:
    """Mark the key revoked (idempotent) and evict it from the caches."""
    if not is_prefix(prefix):
        raise InvalidInput(f"invalid key prefix {prefix!r}: expected the form nz_xxxxxxxx")
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(api_keys)
            .where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=sa.func.now())
        )
    keys = await list_keys(engine, tenant=None, prefix=prefix)
    if not keys:
        raise AdminError(f"no key with prefix {prefix!r}")
    await invalidate_keys(redis, [prefix])
    return keys[0]
