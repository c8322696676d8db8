"""Authenticate a bearer key: process cache -> Redis -> Postgres + Argon2id.

The hot path compares a keyed digest in constant time; Argon2id runs only when neither
cache holds the key, and never for a prefix Postgres does not know. Every store failure
becomes `StoreUnavailable`, which the caller turns into a 503: nothing is ever allowed
because a store could not answer.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Final, cast

import attrs
import msgspec
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from policyd.authz import metrics
from policyd.authz.records import KeyRecord, Limits, decode_record, encode_record, limits_from_row
from policyd.authz.refusals import Reason
from policyd.authz.settings import Settings
from policyd.shared.errors import redis_failure, sql_failure
from policyd.shared.keys import keyed_digest, parse_key, verify_key_hash
from policyd.shared.keyspace import key_record
from policyd.shared.resp import RespClient
from policyd.shared.tables import LIMIT_COLUMNS, api_keys, tenants

__all__ = ["AuthResult", "KeyStore", "key_lookup_query"]

_log = logging.getLogger("policyd.authz.keystore")

#: Redis value remembering "no such prefix" for a short while.
_UNKNOWN: Final = b"-"
#: Argon2id is CPU-bound; bound how many run at once so misses cannot starve the loop.
_ARGON2_SLOTS: Final = 2


# Stand-in for "Redis knows this prefix does not exist": its digest matches nothing.
_UNKNOWN_RECORD: Final = KeyRecord(
    key_id="",
    prefix="",
    tenant_id="",
    tenant_name="",
    digest="!unknown",
    expires_at=None,
    revoked=True,
    key_limits=Limits(),
    tenant_limits=Limits(),
)


@attrs.frozen
class AuthResult:
    """The verified key, or why it was refused."""

    record: KeyRecord | None
    refusal: Reason | None = None


def key_lookup_query(prefix: str) -> sa.Select[tuple[object, ...]]:
    """The key row by prefix with its tenant, limit columns labelled `k_*` and `t_*`."""
    return (
        sa.select(
            api_keys.c.id,
            api_keys.c.prefix,
            api_keys.c.secret_hash,
            api_keys.c.expires_at,
            api_keys.c.revoked_at,
            tenants.c.id.label("tenant_id"),
            tenants.c.name.label("tenant_name"),
            tenants.c.budget_timezone,
            *(api_keys.c[name].label(f"k_{name}") for name in LIMIT_COLUMNS),
            *(tenants.c[name].label(f"t_{name}") for name in LIMIT_COLUMNS),
        )
        .join(tenants, tenants.c.id == api_keys.c.tenant_id)
        .where(api_keys.c.prefix == prefix)
    )


class KeyStore:
    """Key verification with two cache levels; one instance per policyd process."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis,
        engine: AsyncEngine,
        hot: RespClient | None = None,
    ) -> None:
        self._settings = settings
        self._redis = redis
        # The lean client for the per-request GET, when the Redis URL allows one.
        self._hot = hot
        self._engine = engine
        self._local: dict[str, tuple[float, KeyRecord]] = {}
        self._argon2 = asyncio.Semaphore(_ARGON2_SLOTS)
        self.argon2_runs = 0  # exposed for tests and benchmarks

    async def authenticate(self, authorization: str | None) -> AuthResult:
        """Verify an `Authorization` header value; raises StoreUnavailable on store failure."""
        if not authorization:
            return AuthResult(None, Reason.MISSING_KEY)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthResult(None, Reason.MISSING_KEY)
        parsed = parse_key(token.strip())
        if parsed is None:
            return AuthResult(None, Reason.MALFORMED_KEY)
        digest = keyed_digest(self._settings.key_hmac_secret, parsed.full)
        record = await self._cached(parsed.prefix)
        if record is None:
            record = await self._verify_from_postgres(parsed.prefix, parsed.full, digest)
            if record is None:
                return AuthResult(None, Reason.INVALID_KEY)
        # The cached digest is of the one valid key for this prefix: any other key
        # with the same prefix is wrong, and needs no Argon2 to tell.
        if not hmac.compare_digest(record.digest, digest):
            return AuthResult(None, Reason.INVALID_KEY)
        if record.revoked:
            return AuthResult(None, Reason.REVOKED_KEY)
        if record.expires_at is not None and time.time() >= record.expires_at:
            return AuthResult(None, Reason.EXPIRED_KEY)
        return AuthResult(record)

    async def _cached(self, prefix: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._local.get(prefix)
        if hit is not None and now - hit[0] < self._settings.key_cache_ttl_s:
            metrics.key_cache("process", hit=True)
            return hit[1]
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                if self._hot is not None:
                    raw = await self._hot.get(key_record(prefix))
                else:
                    raw = cast(bytes | None, await self._redis.get(key_record(prefix)))
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
        metrics.key_cache("redis", hit=raw is not None)
        if raw is None:
            self._local.pop(prefix, None)
            return None
        if raw == _UNKNOWN:
            return _UNKNOWN_RECORD
        try:
            record = decode_record(raw)
        except msgspec.DecodeError:
            _log.warning("discarding corrupt cache entry for key prefix %s", prefix)
            return None
        self._local[prefix] = (now, record)
        return record

    async def _verify_from_postgres(self, prefix: str, full: str, digest: str) -> KeyRecord | None:
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                async with self._engine.connect() as conn:
                    row = (await conn.execute(key_lookup_query(prefix))).one_or_none()
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise sql_failure(exc) from exc
        if row is None:
            await self._remember_unknown(prefix)
            return None
        async with self._argon2:
            self.argon2_runs += 1
            metrics.argon2_run()
            valid = await asyncio.to_thread(verify_key_hash, row.secret_hash, full)
        if not valid:
            return None
        record = KeyRecord(
            key_id=str(row.id),
            prefix=row.prefix,
            tenant_id=str(row.tenant_id),
            tenant_name=row.tenant_name,
            digest=digest,
            expires_at=row.expires_at.timestamp() if row.expires_at else None,
            revoked=row.revoked_at is not None,
            key_limits=limits_from_row(row, prefix="k_"),
            tenant_limits=limits_from_row(row, prefix="t_"),
            budget_timezone=row.budget_timezone,
        )
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                await self._redis.set(
                    key_record(prefix),
                    encode_record(record),
                    ex=self._settings.redis_key_ttl_s,
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
        self._local[prefix] = (time.monotonic(), record)
        return record

    async def _remember_unknown(self, prefix: str) -> None:
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                await self._redis.set(
                    key_record(prefix),
                    _UNKNOWN,
                    ex=self._settings.negative_cache_ttl_s,
                    nx=True,
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
