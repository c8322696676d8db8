"""Reservations whose access-log line never arrived: settle them fail-closed, flagged.

Admission (policyd/shared/lua/admit.lua) leaves a hash `nz:{t:<tenant>}:res:<request id>` per
admitted request, and the budgets already hold the reserved tokens. Normally the log
line arrives and settle.py replaces the reservation by the actual usage. When Caddy was
killed mid-request, or a rolled file was deleted before meterd read it, the line never
comes: the budgets stay charged at the reserved amount, but nobody sees it and the
ledger (which budgets are rebuilt from) never gets it.

The sweep finds such reservations (SCAN, never KEYS) once their lease expired more than
the grace ago, and per page of the scan:

1. one Postgres transaction: an audit row (`usage_source` 'reserved', completion =
   the reservation, refusal 'log_line_missing', `ON CONFLICT (request_id) DO NOTHING`)
   and, for exactly the rows it inserted, the reserved tokens in the ledger;
2. the limits layer's settle script with the same usage, which removes the reservation
   and sets its done marker while leaving the budgets as they are.

A request that already has an audit row (its line arrived meanwhile, another node swept
it, or a crash came between 1 and 2) is settled in Redis with the usage it was audited
with, so the budgets agree with the ledger. Several nodes may sweep at once: the audit
row's primary key and the script's done marker make a second sweep a no-op, and a line
arriving after the sweep finds its audit row and changes nothing.

A node that is behind in its log must not sweep requests whose lines it has not read
yet: the daemon sweeps only after it caught up once, and `hold_off_s()` widens the grace
by the largest lag any live meterd reports in its heartbeat.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import asyncpg  # type: ignore[import-untyped]
import attrs
import msgspec
import redis.asyncio as aioredis

from meterd import writes
from meterd.parse import Event
from meterd.records import Record
from meterd.settle import RedisSettlement, settle_in_redis
from meterd.settle_script import SettleScript
from meterd.usage import Source, Usage
from policyd.shared import keyspace

__all__ = [
    "MISSING_LINE",
    "Reservation",
    "Sweeper",
    "hold_off_s",
    "parse_reservation",
]

_log: Final = logging.getLogger(__name__)

#: The audit row's `refusal` for a request charged at its reservation by the sweep.
MISSING_LINE: Final = "log_line_missing"

_SCAN_COUNT: Final = 500
_MAX_TOKENS: Final = 2**62

# The key's public prefix, for the audit row and the warning; the key may be gone.
_PREFIXES: Final = "SELECT id, prefix FROM api_keys WHERE id = ANY($1::uuid[])"


@attrs.frozen(kw_only=True)
class Reservation:
    """What admission reserved for one request, read back from its Redis hash."""

    request_id: uuid.UUID
    tenant_id: uuid.UUID
    key_id: uuid.UUID
    tokens: int
    #: Admission time (whole seconds, UTC): the audit row's `ts` and the ledger's day.
    admitted_at: dt.datetime
    #: When the concurrency lease expired (unix ms).
    lease_ms: int


def _text(fields: Mapping[bytes, bytes], name: bytes) -> str:
    return fields.get(name, b"").decode("ascii", "replace")


def parse_reservation(redis_key: bytes | str, fields: Mapping[bytes, bytes]) -> Reservation | None:
    """The reservation in one hash; None when it is gone or not what admission writes."""
    name = redis_key.decode("ascii", "replace") if isinstance(redis_key, bytes) else redis_key
    request_part = keyspace.reservation_request_id(name)
    if request_part is None or not fields:
        return None
    try:
        tokens = int(_text(fields, b"tok"))
        admitted_s = int(_text(fields, b"sec"))
        return Reservation(
            request_id=uuid.UUID(request_part),
            tenant_id=uuid.UUID(_text(fields, b"t")),
            key_id=uuid.UUID(_text(fields, b"k")),
            tokens=min(max(tokens, 0), _MAX_TOKENS),
            admitted_at=dt.datetime.fromtimestamp(admitted_s, dt.UTC),
            lease_ms=int(_text(fields, b"lease")),
        )
    except (ValueError, OverflowError, OSError):
        return None


async def hold_off_s(redis: aioredis.Redis) -> float | None:
    """The largest lag live meterd nodes report, or None while one has not caught up yet.

    A node that has settled nothing since it started reports lag bytes without a lag in
    seconds: how far behind it is is unknown, so nothing is swept until it knows.
    """
    keys = [k async for k in redis.scan_iter(match=keyspace.HEARTBEAT_PATTERN, count=_SCAN_COUNT)]
    if not keys:
        return 0.0
    worst = 0.0
    for raw in await redis.mget(keys):
        if raw is None:
            continue  # expired between SCAN and MGET: that node is gone
        try:
            beat = msgspec.json.decode(raw)
            lag_bytes, lag_seconds = int(beat["lag_bytes"]), float(beat["lag_seconds"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            continue
        if lag_bytes > 0 and lag_seconds <= 0:
            return None
        worst = max(worst, lag_seconds)
    return worst


def _record(reservation: Reservation, usage: Usage, key_prefix: str | None) -> Record:
    """The reservation as a settled request, in the shape settle.py writes and settles."""
    event = Event(
        request_id=reservation.request_id,
        started=reservation.admitted_at,
        method="-",
        path="-",
        status=0,
        bytes_in=0,
        bytes_out=0,
        duration_ms=0,
        refusal=MISSING_LINE,
        key_id=reservation.key_id,
        key_prefix=key_prefix,
        tenant_id=reservation.tenant_id,
        reserved=reservation.tokens,
    )
    return Record(event=event, usage=usage)


class Sweeper:
    """Finds overdue reservations and settles them at the reserved amount."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        script: SettleScript,
        *,
        node: str,
        grace_s: float,
        scan_count: int = _SCAN_COUNT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._script = script
        self._node = node
        self._grace_s = grace_s
        self._scan_count = scan_count
        self._clock = clock

    async def sweep(self, *, hold_off: float = 0.0) -> int:
        """One pass over every reservation; returns how many were newly charged and flagged.

        `hold_off` (seconds) widens the grace, e.g. by how far behind the logs are.
        """
        cutoff_ms = int((self._clock() - self._grace_s - max(hold_off, 0.0)) * 1000)
        swept = 0
        cursor: int = 0
        while True:
            cursor, keys = await self._redis.scan(
                cursor, match=keyspace.RESERVATION_PATTERN, count=self._scan_count
            )
            if keys:
                overdue = await self._overdue(keys, cutoff_ms)
                if overdue:
                    swept += await self._settle(overdue)
            if cursor == 0:
                return swept

    async def _overdue(self, keys: Sequence[bytes | str], cutoff_ms: int) -> list[Reservation]:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        found = []
        for key, fields in zip(keys, await pipe.execute(), strict=True):
            reservation = parse_reservation(key, fields)
            if reservation is None:
                if fields:
                    _log.warning("ignoring a reservation hash admission did not write: %r", key)
                continue  # settled between SCAN and HGETALL
            if reservation.lease_ms < cutoff_ms:
                found.append(reservation)
        return found

    async def _settle(self, overdue: list[Reservation]) -> int:
        charged = Usage(prompt_tokens=0, completion_tokens=0, source=Source.RESERVED)
        async with self._pool.acquire() as conn, conn.transaction():
            key_ids = list({r.key_id for r in overdue})
            prefixes = {row[0]: row[1] for row in await conn.fetch(_PREFIXES, key_ids)}
            records = [
                _record(
                    r,
                    attrs.evolve(charged, completion_tokens=r.tokens),
                    prefixes.get(r.key_id),
                )
                for r in overdue
            ]
            inserted = await writes.insert_audit(conn, records, node=self._node)
            new = [r for r in records if r.event.request_id in inserted]
            await writes.add_to_ledger(conn, new)
            # Audited already (the line arrived, another node swept, or we crashed before
            # Redis last time): settle with what the audit row says, not the reservation.
            by_id = {r.event.request_id: r for r in records if r.event.request_id not in inserted}
            audited = await writes.audited(conn, list(by_id))
        durable_ms = int(time.time() * 1000)
        items = [RedisSettlement(record=r, ledger_ms=durable_ms) for r in new]
        items += [
            RedisSettlement(
                record=attrs.evolve(by_id[request_id], usage=done.usage),
                ledger_ms=int(done.at.timestamp() * 1000),
            )
            for request_id, done in audited.items()
        ]
        await settle_in_redis(self._script, items)
        for record in new:
            _log.warning(
                "log line never arrived: request %s of key %s charged its reservation of %d tokens",
                record.event.request_id,
                record.event.key_prefix or record.event.key_id,
                record.usage.completion_tokens,
            )
        return len(new)
