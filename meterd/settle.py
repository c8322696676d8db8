"""Settle a batch of requests: one Postgres transaction, then Redis. Exactly once.

Per batch:

1. Look up which request ids already have an audit row (and when it was written).
2. One transaction: audit rows (`ON CONFLICT (request_id) DO NOTHING`), ledger rows for
   exactly the audit rows inserted, their prompts, the calibration they teach, and the
   checkpoint (file identity + offset).
3. Redis (`settle_in_redis`): release each request's concurrency lease and replace its
   reservation by the actual usage, via the limits layer's settle script, which is
   idempotent by request id and told when the usage became durable (`ledger_ms`), so a
   counter rebuilt from the ledger in between is not charged twice.

The checkpoint written in step 2 is the position *before* the batch (the end of the
previous one, whose Redis step has completed). A crash between the commit and step 3
therefore replays the batch: its audit rows exist, so the ledger is untouched, and the
rows written since the stored checkpoint (`written_at >= checkpoint time`) are settled in
Redis again, which the script ignores if it already saw them. Rows older than the
checkpoint are never sent to Redis again, so rereading old files (after a lost
checkpoint) cannot charge a budget twice once the script's idempotency record expired.
`advance()` moves the checkpoint past the last batch when the log is idle or at shutdown.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from meterd.parse import Event, clean_text
from meterd.schema import audit_log, meter_calibration, meter_checkpoints, prompt_log, usage_ledger
from meterd.tail import Checkpoint, FileId
from meterd.usage import DECAY, SUMS, CalibrationRow, Observation, Source, Usage
from policyd import contract

__all__ = [
    "Batch",
    "Outcome",
    "Record",
    "RedisSettlement",
    "Store",
    "add_to_ledger",
    "audit_row",
    "prune_expired_prompts",
    "settle_in_redis",
]

_log: Final = logging.getLogger(__name__)

_U64: Final = 2**64
_I63: Final = 2**63
_PRUNE_CHUNK: Final = 10_000

# Effective prompt-logging policy of keys, read at settlement so that turning logging
# off stops storing at once, even for lines admitted before the change.
_PROMPT_POLICY: Final = sa.text(
    """
    SELECT k.id AS key_id,
           COALESCE(k.prompt_logging, t.prompt_logging, false) AS enabled,
           COALESCE(k.prompt_retention_days, t.prompt_retention_days) AS days
      FROM api_keys AS k JOIN tenants AS t ON t.id = k.tenant_id
     WHERE k.id = ANY(:ids)
    """
).bindparams(sa.bindparam("ids", type_=sa.ARRAY(sa.Uuid())))


@attrs.frozen(kw_only=True)
class Record:
    """One parsed request and the usage it is settled with."""

    event: Event
    usage: Usage
    observation: Observation | None = None


@attrs.frozen(kw_only=True)
class Batch:
    """Consecutive lines of the log: their records and the position after the last one."""

    records: tuple[Record, ...]
    checkpoint: Checkpoint
    lines: int
    bad_lines: int


@attrs.frozen(kw_only=True)
class Outcome:
    #: Audit rows written by this batch (the others were already there).
    inserted: int
    #: Observations of the inserted rows, in log order, for the in-memory calibration.
    observations: tuple[Observation, ...]


def _signed(value: int) -> int:
    return value - _U64 if value >= _I63 else value


def _unsigned(value: int) -> int:
    return value + _U64 if value < 0 else value


@attrs.frozen(kw_only=True)
class _Audited:
    """An audit row written earlier: when, and the usage it recorded."""

    at: dt.datetime
    usage: Usage


@attrs.frozen(kw_only=True)
class RedisSettlement:
    """One request to settle in Redis, with when its usage became durable."""

    record: Record
    ledger_ms: int


def _settle_script_source() -> str | None:
    """The limits layer's settle script (`policyd.contract.settle_script`), if present."""
    build: Callable[[], str] | None = getattr(contract, "settle_script", None)
    return build() if build is not None else None


async def settle_in_redis(redis: aioredis.Redis, items: Sequence[RedisSettlement]) -> None:
    """Release leases and replace reservations by actual usage: one script call per request.

    Arguments come from `policyd.contract.settle_call` (reservation key; request id,
    tokens, ledger time, key id, the admission's budget day/month/second). Pipelined,
    one round trip per batch. A no-op while the limits layer has no settle script.
    """
    source = _settle_script_source()
    wanted = [i for i in items if i.record.event.admitted]
    if source is None or not wanted:
        return
    script = redis.register_script(source)
    pipe = redis.pipeline(transaction=False)
    for item in wanted:
        event, usage = item.record.event, item.record.usage
        assert event.tenant_id is not None
        assert event.key_id is not None
        keys, args = contract.settle_call(
            tenant_id=str(event.tenant_id),
            key_id=str(event.key_id),
            request_id=str(event.request_id),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            requested_at=event.started,
            ledger_ms=item.ledger_ms,
        )
        await script(keys=keys, args=args, client=pipe)
    results = await pipe.execute()
    unusual = [r for r in results if not (isinstance(r, list) and r and r[0] in (0, 1))]
    if unusual:
        _log.info("settled %d requests without their reservation: %s", len(unusual), unusual[:5])


def audit_row(record: Record, node: str) -> dict[str, Any]:
    """The audit_log row of one settled request."""
    event, usage = record.event, record.usage
    return {
        "request_id": event.request_id,
        "ts": event.started,
        "tenant_id": event.tenant_id,
        "key_id": event.key_id,
        "key_prefix": event.key_prefix,
        "method": event.method,
        "path": event.path,
        "surface": event.surface,
        "model": event.model,
        "stream": event.stream,
        "status": event.status,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "usage_source": usage.source.value,
        "reserved_tokens": event.reserved,
        "bytes_in": event.bytes_in,
        "bytes_out": event.bytes_out,
        "duration_ms": event.duration_ms,
        "ttfb_ms": event.ttfb_ms,
        "client_ip": event.client_ip,
        "user_agent": event.user_agent,
        "refusal": event.refusal,
        "node": node,
    }


def _calibration_updates(observations: Iterable[Observation]) -> list[dict[str, Any]]:
    """Per (model, path): the decay factor for the stored sums and what to add to them.

    Applying k observations one by one (sum = sum * DECAY + x) equals
    sum * DECAY**k + sum_i DECAY**(k-1-i) * x_i, which one UPSERT can do.
    """
    grouped: dict[tuple[str, str], list[Observation]] = defaultdict(list)
    for obs in observations:
        grouped[(obs.model, obs.path)].append(obs)
    updates = []
    for (model, path), items in grouped.items():
        row = CalibrationRow(model=model, path=path)
        for obs in items:
            row = row.learn(obs)
        updates.append({**attrs.asdict(row), "factor": DECAY ** len(items)})
    return updates


async def add_to_ledger(conn: AsyncConnection, records: Sequence[Record]) -> None:
    """Add the usage of newly audited records to the ledger, per key and UTC day."""
    totals: dict[tuple[uuid.UUID, dt.date], dict[str, Any]] = {}
    for record in records:
        event, usage = record.event, record.usage
        if event.key_id is None or event.tenant_id is None:
            continue  # refused before admission: nothing to count against a key
        key = (event.key_id, event.started.date())
        row = totals.setdefault(
            key,
            {
                "key_id": event.key_id,
                "tenant_id": event.tenant_id,
                "day": event.started.date(),
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "estimated_tokens": 0,
            },
        )
        row["requests"] += 1
        row["prompt_tokens"] += usage.prompt_tokens
        row["completion_tokens"] += usage.completion_tokens
        if usage.source is not Source.EXACT:
            row["estimated_tokens"] += usage.total
    if not totals:
        return
    stmt = pg_insert(usage_ledger)
    c, new = usage_ledger.c, stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=[c.key_id, c.day],
        set_={
            "requests": c.requests + new.requests,
            "prompt_tokens": c.prompt_tokens + new.prompt_tokens,
            "completion_tokens": c.completion_tokens + new.completion_tokens,
            "estimated_tokens": c.estimated_tokens + new.estimated_tokens,
            "updated_at": sa.func.now(),
        },
    )
    # Sorted, so concurrent nodes lock ledger rows in the same order (no deadlock).
    await conn.execute(stmt, sorted(totals.values(), key=lambda r: (r["key_id"], r["day"])))


class Store:
    """meterd's Postgres and Redis side for one node and one access log."""

    def __init__(
        self,
        engine: AsyncEngine,
        redis: aioredis.Redis,
        *,
        node: str,
        log_path: Path,
        prompt_retention_days: int,
        max_prompt_bytes: int,
    ) -> None:
        self._engine = engine
        self._redis = redis
        self._node = node
        self._log_path = str(log_path)
        self._retention = dt.timedelta(days=prompt_retention_days)
        self._max_prompt = max_prompt_bytes
        # Audit rows written at or after this moment may still lack their Redis step.
        self._replay_since: dt.datetime | None = None

    # --- reads ----------------------------------------------------------------------------

    async def load_checkpoint(self) -> Checkpoint | None:
        c = meter_checkpoints.c
        stmt = sa.select(meter_checkpoints).where(
            c.node == self._node, c.log_path == self._log_path
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(stmt)).one_or_none()
        if row is None:
            return None
        self._replay_since = row.updated_at
        return Checkpoint(
            file=FileId(dev=_unsigned(row.dev), inode=_unsigned(row.inode)),
            offset=row.byte_offset,
            fingerprint=bytes(row.fingerprint),
            fingerprint_len=row.fingerprint_len,
        )

    async def load_calibration(self) -> list[CalibrationRow]:
        names = [f.name for f in attrs.fields(CalibrationRow)]
        stmt = sa.select(*(meter_calibration.c[name] for name in names))
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [CalibrationRow(**dict(row._mapping)) for row in rows]

    # --- settlement -----------------------------------------------------------------------

    async def settle(self, batch: Batch, *, resume: Checkpoint) -> Outcome:
        """Settle `batch` exactly once; `resume` is the position before it (see above)."""
        records = self._unique(batch.records)
        written = await self._written(records)
        fresh = [r for r in records if r.event.request_id not in written]
        async with self._engine.begin() as conn:
            inserted = await self._insert_audit(conn, fresh)
            new = [r for r in fresh if r.event.request_id in inserted]
            await add_to_ledger(conn, new)
            await self._store_prompts(conn, new)
            observations = tuple(r.observation for r in new if r.observation is not None)
            await self._teach(conn, observations)
            committed = await self._save_checkpoint(conn, resume, batch=batch)
        if self._replay_since is None:
            self._replay_since = committed
        durable_ms = int(time.time() * 1000)
        items = [RedisSettlement(record=r, ledger_ms=durable_ms) for r in new]
        for record in records:
            done = written.get(record.event.request_id)
            if done is not None and done.at >= self._replay_since:
                # Settle what was audited: a re-estimate now could differ (the calibration
                # has learnt from this very batch since).
                items.append(
                    RedisSettlement(
                        record=attrs.evolve(record, usage=done.usage),
                        ledger_ms=int(done.at.timestamp() * 1000),
                    )
                )
        await settle_in_redis(self._redis, items)
        return Outcome(inserted=len(new), observations=observations)

    async def advance(self, position: Checkpoint) -> None:
        """Move the checkpoint past batches whose Redis step is done (idle, or stopping)."""
        async with self._engine.begin() as conn:
            self._replay_since = await self._save_checkpoint(conn, position, batch=None)

    @staticmethod
    def _unique(records: Iterable[Record]) -> list[Record]:
        seen: set[uuid.UUID] = set()
        unique = []
        for record in records:
            if record.event.request_id not in seen:
                seen.add(record.event.request_id)
                unique.append(record)
        return unique

    async def _written(self, records: list[Record]) -> dict[uuid.UUID, _Audited]:
        """The audit rows that already exist for `records`: when, and with which usage."""
        if not records:
            return {}
        ids = [r.event.request_id for r in records]
        c = audit_log.c
        stmt = sa.select(
            c.request_id, c.settled_at, c.prompt_tokens, c.completion_tokens, c.usage_source
        ).where(c.request_id.in_(ids))
        async with self._engine.connect() as conn:
            return {
                row.request_id: _Audited(
                    at=row.settled_at,
                    usage=Usage(
                        prompt_tokens=row.prompt_tokens,
                        completion_tokens=row.completion_tokens,
                        source=Source(row.usage_source),
                    ),
                )
                for row in await conn.execute(stmt)
            }

    async def _insert_audit(self, conn: AsyncConnection, records: list[Record]) -> set[uuid.UUID]:
        if not records:
            return set()
        stmt = (
            pg_insert(audit_log)
            .on_conflict_do_nothing(index_elements=[audit_log.c.request_id])
            .returning(audit_log.c.request_id)
        )
        result = await conn.execute(stmt, [audit_row(r, self._node) for r in records])
        return set(result.scalars())

    async def _store_prompts(self, conn: AsyncConnection, records: list[Record]) -> None:
        wanted = [
            r
            for r in records
            if r.event.prompt_log and r.event.req_body is not None and r.event.admitted
        ]
        if not wanted:
            return
        ids = list({r.event.key_id for r in wanted})
        policy = {
            row.key_id: row for row in (await conn.execute(_PROMPT_POLICY, {"ids": ids})).all()
        }
        now = dt.datetime.now(dt.UTC)
        rows = []
        for record in wanted:
            event = record.event
            rule = policy.get(event.key_id)
            if rule is None or not rule.enabled:
                continue  # key gone or logging turned off since admission
            body, truncated = self._bounded(event.req_body or "")
            if body is None:
                continue
            retention = dt.timedelta(days=rule.days) if rule.days else self._retention
            rows.append(
                {
                    "request_id": event.request_id,
                    "key_id": event.key_id,
                    "tenant_id": event.tenant_id,
                    "stored_at": now,
                    "expires_at": event.started + retention,
                    "body": body,
                    "truncated": truncated,
                }
            )
        if rows:
            stmt = pg_insert(prompt_log).on_conflict_do_nothing(
                index_elements=[prompt_log.c.request_id]
            )
            await conn.execute(stmt, rows)

    def _bounded(self, body: str) -> tuple[str | None, bool]:
        encoded = body.encode("utf-8", "replace")
        if len(encoded) <= self._max_prompt:
            return clean_text(body, len(body)), False
        cut = encoded[: self._max_prompt].decode("utf-8", "ignore")
        return clean_text(cut, len(cut)), True

    async def _teach(self, conn: AsyncConnection, observations: Sequence[Observation]) -> None:
        updates = _calibration_updates(observations)
        if not updates:
            return
        c = meter_calibration.c
        insert = pg_insert(meter_calibration)
        stmt = insert.on_conflict_do_update(
            index_elements=[c.model, c.path],
            set_={
                **{name: c[name] * sa.bindparam("factor") + insert.excluded[name] for name in SUMS},
                "updated_at": sa.func.now(),
            },
        )
        await conn.execute(stmt, sorted(updates, key=lambda u: (u["model"], u["path"])))

    async def _save_checkpoint(
        self, conn: AsyncConnection, position: Checkpoint, *, batch: Batch | None
    ) -> dt.datetime:
        """Store `position` (and the batch's counters); returns the transaction's time."""
        records = batch.records if batch is not None else ()
        values = {
            "node": self._node,
            "log_path": self._log_path,
            "dev": _signed(position.file.dev),
            "inode": _signed(position.file.inode),
            "byte_offset": position.offset,
            "fingerprint": position.fingerprint,
            "fingerprint_len": position.fingerprint_len,
            "lines": batch.lines if batch is not None else 0,
            "bad_lines": batch.bad_lines if batch is not None else 0,
            "last_event_at": max((r.event.started for r in records), default=None),
        }
        insert = pg_insert(meter_checkpoints).values(**values)
        c, new_row = meter_checkpoints.c, insert.excluded
        stmt = insert.on_conflict_do_update(
            index_elements=[c.node, c.log_path],
            set_={
                "dev": new_row.dev,
                "inode": new_row.inode,
                "byte_offset": new_row.byte_offset,
                "fingerprint": new_row.fingerprint,
                "fingerprint_len": new_row.fingerprint_len,
                "lines": c.lines + new_row.lines,
                "bad_lines": c.bad_lines + new_row.bad_lines,
                "last_event_at": sa.func.coalesce(new_row.last_event_at, c.last_event_at),
                "updated_at": sa.func.now(),
            },
        ).returning(c.updated_at)
        updated: dt.datetime = (await conn.execute(stmt)).scalar_one()
        return updated

    # --- housekeeping ---------------------------------------------------------------------

    async def prune_prompts(self) -> int:
        """Delete expired prompts, in chunks so no single statement holds locks for long."""
        return await prune_expired_prompts(self._engine)


async def prune_expired_prompts(engine: AsyncEngine) -> int:
    """Delete every prompt whose retention has passed; returns how many went."""
    expired = (
        sa.select(prompt_log.c.request_id)
        .where(prompt_log.c.expires_at <= sa.func.now())
        .limit(_PRUNE_CHUNK)
        .scalar_subquery()
    )
    stmt = sa.delete(prompt_log).where(prompt_log.c.request_id.in_(expired))
    total = 0
    while True:
        async with engine.begin() as conn:
            deleted = (await conn.execute(stmt)).rowcount
        total += deleted
        if deleted < _PRUNE_CHUNK:
            return total
