"""Admission against RPM, TPM, concurrency and token budgets of key and tenant.

The checks and the bookkeeping run in one Lua script (`lua/admit.lua`): one round trip,
atomic across policyd processes, and a request refused for one limit consumes nothing
in any other. This module computes the effective limits, the calendar windows and the
refusal messages around it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from policyd.authz.records import KeyRecord
from policyd.authz.refusals import Reason, Refusal
from policyd.shared.contract import (
    H_RATE_REQUESTS,
    H_RATE_TOKENS,
    admit_script,
    calendar_day,
    calendar_month,
)
from policyd.shared.errors import StoreUnavailable, redis_failure
from policyd.shared.keyspace import DIMENSIONS, admission_keys
from policyd.shared.resp import RespClient

__all__ = [
    "DIMENSIONS",
    "Admission",
    "Limiter",
    "effective_limits",
    "next_day",
    "next_month",
]

_TOKEN_DIMENSIONS: Final = ("tpm", "daily_tokens", "monthly_tokens", "total_tokens")
_LABELS: Final = {
    "rpm": "requests-per-minute limit",
    "tpm": "tokens-per-minute limit",
    "concurrency": "concurrent-request limit",
    "daily_tokens": "daily token budget",
    "monthly_tokens": "monthly token budget",
    "total_tokens": "total token budget",
}
_REASONS: Final = {
    "rpm": Reason.RPM,
    "tpm": Reason.TPM,
    "concurrency": Reason.CONCURRENCY,
    "daily_tokens": Reason.DAILY_BUDGET,
    "monthly_tokens": Reason.MONTHLY_BUDGET,
    "total_tokens": Reason.TOTAL_BUDGET,
}
_NOT_LOADED: Final = 0
_ADMITTED: Final = 1
_REFUSED: Final = 2
_DUPLICATE: Final = 3
#: The script's limit indexes of the key's and the tenant's concurrency.
_CONCURRENCY_INDEXES: Final = (5, 6)
_FIRST_LEASE_WAIT_S: Final = 0.02
_MAX_LEASE_WAIT_S: Final = 0.2


def _concurrency_refused(result: list[int]) -> bool:
    return result[0] == _REFUSED and result[1] in _CONCURRENCY_INDEXES


Loader = Callable[[KeyRecord], Awaitable[None]]


def effective_limits(record: KeyRecord) -> dict[str, tuple[int | None, int | None]]:
    """Per dimension: (limit for the key, limit for the tenant's sum); None = unlimited.

    A key's own value overrides the tenant default for that key; the tenant's value
    also caps the sum over all the tenant's keys.
    """
    own, tenant = record.key_limits, record.tenant_limits
    result: dict[str, tuple[int | None, int | None]] = {}
    for name in DIMENSIONS:
        tenant_value: int | None = getattr(tenant, name)
        own_value: int | None = getattr(own, name)
        result[name] = (own_value if own_value is not None else tenant_value, tenant_value)
    return result


def next_day(now: dt.datetime) -> dt.datetime:
    """Start of the next UTC calendar day: when a daily budget resets."""
    today = now.astimezone(dt.UTC).date()
    return dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def next_month(now: dt.datetime) -> dt.datetime:
    """Start of the next UTC calendar month: when a monthly budget resets."""
    current = now.astimezone(dt.UTC)
    year, month = (
        (current.year + 1, 1) if current.month == 12 else (current.year, current.month + 1)
    )
    return dt.datetime(year, month, 1, tzinfo=dt.UTC)


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_DAY_S: Final = 86400


@attrs.frozen(kw_only=True)
class _Calendar:
    """One UTC day's budget names and the boundaries its TTLs are measured to."""

    day_index: int  # days since the epoch
    day: str
    month: str
    next_day_s: float
    next_month_s: float

    @classmethod
    def of(cls, day_index: int) -> _Calendar:
        start = dt.datetime.fromtimestamp(day_index * _DAY_S, dt.UTC)
        return cls(
            day_index=day_index,
            day=calendar_day(start),
            month=calendar_month(start),
            next_day_s=next_day(start).timestamp(),
            next_month_s=next_month(start).timestamp(),
        )


@attrs.frozen
class Admission:
    """The admission outcome plus the rate-limit headers for the client."""

    refusal: Refusal | None
    headers: tuple[tuple[str, str], ...] = ()


def _rate_headers(figures: list[int]) -> tuple[tuple[str, str], ...]:
    """`H_RATE_*` headers from the script's figures (-1 = no limit): Caddy turns each into
    OpenAI's three `x-ratelimit-*-<unit>` headers on the client's response."""
    headers: list[tuple[str, str]] = []
    for offset, name in ((0, H_RATE_REQUESTS), (3, H_RATE_TOKENS)):
        limit, remaining, reset = figures[offset : offset + 3]
        if limit >= 0:
            headers.append((name, f"{limit} {max(0, remaining)} {max(0, reset)}"))
    return tuple(headers)


class Limiter:
    """Runs the admission script for one request; one instance per policyd process."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        load_tenant: Loader,
        lease_ttl_s: float,
        timeout_s: float,
        concurrency_wait_s: float = 0.0,
        clock: Callable[[], float] = time.time,
        hot: RespClient | None = None,
    ) -> None:
        self._redis = redis
        # The lean client for the per-request script call, when the Redis URL allows one.
        self._hot = hot
        self._load_tenant = load_tenant
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        self._concurrency_wait_s = concurrency_wait_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._source = admit_script()
        self._sha: str | None = None
        self._calendar: _Calendar | None = None

    async def admit(self, record: KeyRecord, *, request_id: str, reserve: int) -> Admission:
        """Check and record one request; raises StoreUnavailable when Redis cannot answer."""
        limits = effective_limits(record)
        static = self._never_fits(record, limits, reserve)
        if static is not None:
            return Admission(static)
        now_ts = self._clock()
        keys, args = self._call(
            record, limits, request_id=request_id, reserve=reserve, now_ts=now_ts
        )
        result = await self._run(keys, args)
        if result[0] == _NOT_LOADED:
            await self._load_tenant(record)
            result = await self._run(keys, args)
        if _concurrency_refused(result) and self._concurrency_wait_s > 0:
            now_ts, result = await self._wait_for_lease(
                record, limits, request_id=request_id, reserve=reserve
            )
        if result[0] == _ADMITTED:
            return Admission(None, _rate_headers([int(v) for v in result[1:7]]))
        if result[0] == _DUPLICATE:
            return Admission(
                Refusal(reason=Reason.BAD_BODY, message="this request id was already admitted")
            )
        if result[0] == _REFUSED:
            now = dt.datetime.fromtimestamp(now_ts, dt.UTC)
            return Admission(self._refusal(record, [int(v) for v in result[1:]], now))
        raise StoreUnavailable("redis: tenant counters could not be loaded")

    async def _wait_for_lease(
        self,
        record: KeyRecord,
        limits: dict[str, tuple[int | None, int | None]],
        *,
        request_id: str,
        reserve: int,
    ) -> tuple[float, list[int]]:
        """Ask again while a concurrency slot is taken, for at most `concurrency_wait_s`.

        A request that has just ended keeps its slot until meterd reads its log line (its
        lease poll, 50 ms by default), so a client sending its next request at once would
        be refused although nothing is in flight. The waits double from 20 ms to 200 ms:
        a handful of script calls per refused request, and a refusal consumes nothing.
        """
        deadline = time.monotonic() + self._concurrency_wait_s
        delay = _FIRST_LEASE_WAIT_S
        while True:
            await asyncio.sleep(max(min(delay, deadline - time.monotonic()), 0.0))
            delay = min(delay * 2, _MAX_LEASE_WAIT_S)
            now_ts = self._clock()
            keys, args = self._call(
                record, limits, request_id=request_id, reserve=reserve, now_ts=now_ts
            )
            result = await self._run(keys, args)
            if not _concurrency_refused(result) or time.monotonic() >= deadline:
                return now_ts, result

    def _never_fits(
        self,
        record: KeyRecord,
        limits: dict[str, tuple[int | None, int | None]],
        reserve: int,
    ) -> Refusal | None:
        for name in _TOKEN_DIMENSIONS:
            for scope, limit in zip(("key", "tenant"), limits[name], strict=True):
                if limit is not None and reserve > limit:
                    who = _who(record, scope)
                    return Refusal(
                        reason=Reason.RESERVATION_TOO_LARGE,
                        message=(
                            f"this request reserves {reserve} tokens (prompt estimate plus "
                            f"maximum output), more than the {_LABELS[name]} of {who} "
                            f"({limit}); lower the maximum output tokens"
                        ),
                    )
        return None

    def _call(
        self,
        record: KeyRecord,
        limits: dict[str, tuple[int | None, int | None]],
        *,
        request_id: str,
        reserve: int,
        now_ts: float,
    ) -> tuple[list[str], list[str | int]]:
        kid = record.key_id
        cal = self._calendar_at(now_ts)
        day, month = cal.day, cal.month
        keys = admission_keys(record.tenant_id, kid, request_id, day=day, month=month)
        # Day and month counters outlive their window by a day, so late settlements
        # of yesterday's requests still find them.
        day_ttl = int(cal.next_day_s - now_ts) + 86400
        month_ttl = int(cal.next_month_s - now_ts) + 86400
        limit_args = [-1 if v is None else v for name in DIMENSIONS for v in limits[name]]
        now_ms = int(now_ts * 1000)
        args: list[str | int] = [
            now_ms,
            request_id,
            reserve,
            self._lease_ttl_ms,
            2 * 86400,
            day_ttl,
            month_ttl,
            *limit_args,
            kid,
            record.tenant_id,
            day,
            month,
        ]
        return keys, args

    def _calendar_at(self, now_ts: float) -> _Calendar:
        # Names and boundaries change once a day; formatting dates per request cost more
        # than the rest of the call's arguments together.
        day_index = int(now_ts // _DAY_S)
        cal = self._calendar
        if cal is None or cal.day_index != day_index:
            cal = self._calendar = _Calendar.of(day_index)
        return cal

    async def _run(self, keys: list[str], args: list[str | int]) -> list[int]:
        runner = self._hot if self._hot is not None else self._redis
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._sha is None:
                    self._sha = await runner.script_load(self._source)
                try:
                    result = await runner.evalsha(self._sha, len(keys), *keys, *args)
                except NoScriptError:
                    # Redis restarted and lost its script cache: load it again, once.
                    self._sha = await runner.script_load(self._source)
                    result = await runner.evalsha(self._sha, len(keys), *keys, *args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
        return [int(v) for v in result]

    def _refusal(self, record: KeyRecord, detail: list[int], now: dt.datetime) -> Refusal:
        index, limit, used, retry = detail[:4]
        name = DIMENSIONS[(index - 1) // 2]
        scope = "key" if index % 2 == 1 else "tenant"
        who = _who(record, scope)
        if scope == "key" and getattr(record.key_limits, name) is None:
            who += f" (the per-key default of tenant {record.tenant_name})"
        label = _LABELS[name]
        headers: list[tuple[str, str]] = []
        if name == "daily_tokens" or name == "monthly_tokens":
            resets = next_day(now) if name == "daily_tokens" else next_month(now)
            retry = max(1, int((resets - now).total_seconds()) + 1)
            message = (
                f"{label} of {who} exhausted ({used} of {limit} tokens used); resets {_iso(resets)}"
            )
        elif name == "total_tokens":
            message = (
                f"{label} of {who} exhausted ({used} of {limit} tokens used); "
                "it does not reset, ask the operator to raise it"
            )
        elif name == "concurrency":
            message = f"{label} of {who} reached ({limit} requests in flight); retry shortly"
        else:
            unit = "requests" if name == "rpm" else "tokens"
            message = f"{label} of {who} reached ({limit} {unit} per minute); retry in {retry}s"
        if name != "total_tokens":
            headers.append(("retry-after", str(retry)))
        if name in ("rpm", "tpm"):
            unit = "requests" if name == "rpm" else "tokens"
            headers += [
                (f"x-ratelimit-limit-{unit}", str(limit)),
                (f"x-ratelimit-remaining-{unit}", "0"),
                (f"x-ratelimit-reset-{unit}", f"{retry}s"),
            ]
        return Refusal(reason=_REASONS[name], message=message, headers=tuple(headers))


def _who(record: KeyRecord, scope: str) -> str:
    return f"key {record.prefix}" if scope == "key" else f"tenant {record.tenant_name}"
