"""Authenticate a bearer key: process cache -> Redis -> Postgres + Argon2id.

The hot path compares a keyed digest in constant time; Argon2id runs only when neither
cache holds the key, and never for a prefix Postgres does not know. Every store failure
becomes `StoreUnavailable`, which the caller turns into a 503: nothing is ever allowed
because a store could not answer.

Secrets that are not a cached valid key go through `failures` (a failed secret is
remembered, a prefix has a failure budget) and `argon2lanes` (failures cannot take the
clean lane; refusals that need no hash are padded to a hash's duration), so a flood of
wrong secrets neither burns Argon2id nor tells which prefixes exist.
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
from policyd.authz.argon2lanes import Argon2Lanes
from policyd.authz.bounded import ExpiringSet
from policyd.authz.failures import FailureMemory
from policyd.authz.records import KeyRecord, Limits, decode_record, encode_record, limits_from_row
from policyd.authz.refusals import Reason
from policyd.authz.settings import Settings
from policyd.shared.errors import redis_failure, sql_failure
from policyd.shared.keys import keyed_digest, parse_key
from policyd.shared.keyspace import key_record
from policyd.shared.resp import RespClient
from policyd.shared.tables import LIMIT_COLUMNS, api_keys, tenants

__all__ = ["AuthResult", "KeyStore", "key_lookup_query"]

_log = logging.getLogger("policyd.authz.keystore")

#: Redis value remembering "no such prefix" for a short while.
_UNKNOWN: Final = b"-"
#: Unknown prefixes a process remembers itself (for `key_cache_ttl_s`) at most.
_UNKNOWN_ENTRIES: Final = 10_000
#: Calls through redis-py's pool at once from key checks (of the 64 connections, app.py).
REDIS_PY_AT_ONCE: Final = 48


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
    #: For a throttled prefix: seconds until verification is tried again.
    retry_after_s: int | None = None
    #: A failure seen before (this secret already failed, or its prefix is over budget):
    #: its answer may be held back (`tarpit.py`).
    repeated: bool = False


def _throttled(retry_after_s: int) -> AuthResult:
    return AuthResult(None, Reason.KEY_THROTTLED, retry_after_s=retry_after_s, repeated=True)


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
        self._unknown: ExpiringSet[str] = ExpiringSet(limit=_UNKNOWN_ENTRIES)
        self.lanes: Final = Argon2Lanes(suspect_per_s=settings.auth_suspect_per_s)
        # redis-py raises (MaxConnectionsError: a 503) when every connection of its pool is
        # busy, and a flood of wrong keys arriving at once (held refusals are released
        # together) used to get there: the calls this class makes through it wait here for
        # a turn instead, within the store deadline, and leave part of the pool to others.
        self._redis_gate = asyncio.Semaphore(REDIS_PY_AT_ONCE)
        self._failures = FailureMemory(
            gate=self._redis_gate,
            redis=redis,
            memory_s=settings.auth_failure_memory_s,
            window_s=settings.auth_failure_window_s,
            budget=settings.auth_failure_budget,
            timeout_s=settings.store_timeout_s,
        )
        self.failures_remembered = 0  # refused: this exact secret already failed
        self.failures_over_budget = 0  # refused: the prefix spent its failure budget

    @property
    def argon2_runs(self) -> int:
        """Argon2id hashes this process ran (exposed for tests and benchmarks)."""
        return self.lanes.runs

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
        # The cached digest is of the one valid key for this prefix (the hot path).
        if record is None or not hmac.compare_digest(record.digest, digest):
            found = await self._unverified(parsed.prefix, parsed.full, digest, record)
            if found.record is None:
                return found
            record = found.record
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
        if self._unknown.left_s(prefix):
            metrics.key_cache("process", hit=True)
            return _UNKNOWN_RECORD
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                if self._hot is not None:
                    raw = await self._hot.get(key_record(prefix))
                else:
                    async with self._redis_gate:
                        raw = cast(bytes | None, await self._redis.get(key_record(prefix)))
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
        metrics.key_cache("redis", hit=raw is not None)
        if raw is None:
            self._local.pop(prefix, None)
            return None
        if raw == _UNKNOWN:
            # Kept in-process like a key (bounded: a spray of prefixes cannot grow it), so
            # repeated probes cost no Redis round trip.
            self._unknown.add(prefix, for_s=self._settings.key_cache_ttl_s)
            return _UNKNOWN_RECORD
        try:
            record = decode_record(raw)
        except msgspec.DecodeError:
            _log.warning("discarding corrupt cache entry for key prefix %s", prefix)
            return None
        self._local[prefix] = (now, record)
        return record

    async def _unverified(
        self, prefix: str, full: str, digest: str, cached: KeyRecord | None
    ) -> AuthResult:
        """A secret that is not the cached valid key: Argon2id at most once, in its lane.

        `cached` is the prefix's cache entry when there is one (another secret's record,
        or the unknown-prefix marker); then no hash can make this secret valid.
        """
        seen = await self._failures.look(prefix, digest)
        if seen.remembered:
            self.failures_remembered += 1
            return AuthResult(None, Reason.INVALID_KEY, repeated=True)
        if seen.failures >= self._settings.auth_failure_budget:
            self.failures_over_budget += 1
            return _throttled(max(seen.window_left_s, 1))
        if seen.failures > 0 and not self.lanes.take_suspect_token():
            return _throttled(1)
        attempt = await self._failures.admit(prefix)
        if attempt > self._settings.auth_failure_budget:
            # Concurrent requests got here first and spent the budget.
            self.failures_over_budget += 1
            return _throttled(1)
        # Only the prefix's first check in a window takes the clean lane.
        suspect = attempt > 1
        if cached is None:
            record = await self._verify_from_postgres(prefix, full, digest, suspect=suspect)
            if record is not None:
                return AuthResult(record)
        else:
            await self.lanes.pad(suspect=suspect)
        await self._failures.remember(prefix, digest)
        return AuthResult(None, Reason.INVALID_KEY)

    async def _verify_from_postgres(
        self, prefix: str, full: str, digest: str, *, suspect: bool
    ) -> KeyRecord | None:
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                async with self._engine.connect() as conn:
                    row = (await conn.execute(key_lookup_query(prefix))).one_or_none()
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise sql_failure(exc) from exc
        if row is None:
            await self._remember_unknown(prefix)
            # As long as a wrong secret for a known prefix would take.
            await self.lanes.pad(suspect=suspect)
            return None
        if not await self.lanes.verify(row.secret_hash, full, suspect=suspect):
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
            async with asyncio.timeout(self._settings.store_timeout_s), self._redis_gate:
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
            async with asyncio.timeout(self._settings.store_timeout_s), self._redis_gate:
                await self._redis.set(
                    key_record(prefix),
                    _UNKNOWN,
                    ex=self._settings.negative_cache_ttl_s,
                    nx=True,
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
