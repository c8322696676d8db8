"""Settle a batch of requests: one Postgres transaction, then Redis. Exactly once.

Per batch:

1. One transaction (`writes.py`): audit rows (`ON CONFLICT (request_id) DO NOTHING`);
   for those that existed already, when they were written and with which usage; ledger
   rows for exactly the audit rows inserted, their prompts, the calibration they
   teach, and the checkpoint (file identity + offset).
2. Redis (`settle_in_redis`): release each request's concurrency lease and replace its
   reservation by the actual usage, via the limits layer's settle script, which is
   idempotent by request id and told when the usage became durable (`ledger_ms`), so a
   counter rebuilt from the ledger in between is not charged twice.

The checkpoint written in step 1 is the position *before* the batch (the end of the
previous one, whose Redis step has completed). A crash between the commit and step 2
therefore replays the batch: its audit rows exist, so the ledger is untouched, and the
rows written since the stored checkpoint (`written_at >= checkpoint time`) are settled in
Redis again, which the script ignores if it already saw them. Rows older than the
checkpoint are never sent to Redis again, so rereading old files (after a lost
checkpoint) cannot charge a budget twice once the script's idempotency record expired.
`advance()` moves the checkpoint past the last batch at the end of a backlog, when the
log is idle, and at shutdown; under a steady trickle the next batch stores it.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import asyncpg  # type: ignore[import-untyped]
import attrs
import msgspec

from meterd import metrics, writes
from meterd.records import Batch, Record
from meterd.settle_script import SettleScript
from meterd.tail import Checkpoint, FileId
from meterd.usage import CalibrationRow, Observation, Source, Usage
from policyd.shared import keyspace
from policyd.shared.retention import prune_expired_prompts

__all__ = [
    "DATA_ERRORS",
    "QUARANTINED",
    "Outcome",
    "RedisSettlement",
    "Store",
    "settle_in_redis",
]

_log: Final = logging.getLogger(__name__)

_U64: Final = 2**64

#: settle.lua's answer when the reservation holds another budget day or month than KEYS.
_OTHER_CALENDAR: Final = 5

_LOAD_CHECKPOINT: Final = """
SELECT dev, inode, byte_offset, fingerprint, fingerprint_len, updated_at
  FROM meter_checkpoints
 WHERE node = $1 AND log_path = $2
"""


@attrs.frozen(kw_only=True)
class Outcome:
    #: Audit rows written by this batch (the others were already there).
    inserted: int
    #: Observations of the inserted rows, in log order, for the in-memory calibration.
    observations: tuple[Observation, ...]
    #: Requests Postgres refused for a data reason, settled fail-closed instead.
    quarantined: int = 0


#: Postgres refusing a row for what it holds (a value out of range, a constraint, a
#: malformed value), or the row failing to encode: retrying cannot help, so the request
#: is quarantined (below) instead of stopping settlement. Outages are not among these.
DATA_ERRORS: Final = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
    msgspec.EncodeError,
    OverflowError,
)
#: The audit row's `refusal` of a quarantined request.
QUARANTINED: Final = "meter_quarantined"


def quarantined(record: Record) -> Record:
    """`record` as settled when Postgres refused it: charged what admission reserved, no
    prompt, no calibration, flagged; only the columns every line has valid values for."""
    event = record.event
    reserved = event.reserved or 0
    return Record(
        event=attrs.evolve(
            event,
            prompt_log=False,
            req_body=None,
            resp_body=None,
            client_ip=None,
            user_agent=None,
            refusal=QUARANTINED,
        ),
        usage=Usage(prompt_tokens=0, completion_tokens=reserved, source=Source.RESERVED),
    )


def _unsigned(value: int) -> int:
    return value + _U64 if value < 0 else value


@functools.lru_cache(maxsize=4096)
def _text(value: uuid.UUID) -> str:
    """str() of a key or tenant id: they recur, and formatting a UUID is not free."""
    return str(value)


@attrs.frozen(kw_only=True)
class RedisSettlement:
    """One request to settle in Redis, with when its usage became durable."""

    record: Record
    ledger_ms: int


async def settle_in_redis(script: SettleScript, items: Sequence[RedisSettlement]) -> None:
    """Release leases and replace reservations by actual usage: one script call per request.

    Arguments come from `keyspace.settle_call` (every key the script touches; request id,
    tokens, ledger time, the admission's budget day/month/second); the whole batch is one
    round trip (`settle_script.py`). A request admitted just after midnight (its log line
    names the second before) is called again with the day and month its reservation holds.
    """
    calls = []
    for item in items:
        event, usage = item.record.event, item.record.usage
        if not event.admitted or event.tenant_id is None or event.key_id is None:
            continue  # refused before admission: nothing was reserved
        calls.append(
            functools.partial(
                keyspace.settle_call,
                tenant_id=_text(event.tenant_id),
                key_id=_text(event.key_id),
                request_id=str(event.request_id),
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                requested_at=event.started,
                ledger_ms=item.ledger_ms,
            )
        )
    results = await script.run([call() for call in calls])
    moved = [i for i, r in enumerate(results) if _other_calendar(r)]
    if moved:
        again = [calls[i](day=_ascii(results[i][1]), month=_ascii(results[i][2])) for i in moved]
        for i, result in zip(moved, await script.run(again), strict=True):
            results[i] = result
    unusual = [r for r in results if not (isinstance(r, list) and r and r[0] in (0, 1))]
    if unusual:
        _log.info("settled %d requests without their reservation: %s", len(unusual), unusual[:5])


def _other_calendar(result: object) -> bool:
    """The settle script's "reservation is on another budget day/month" answer."""
    return isinstance(result, list) and len(result) == 3 and result[0] == _OTHER_CALENDAR


def _ascii(value: object) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


class Store:
    """meterd's Postgres and Redis side for one node and one access log."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        script: SettleScript,
        *,
        node: str,
        log_path: Path,
        prompt_retention_days: int,
        max_prompt_bytes: int,
    ) -> None:
        self._pool = pool
        self._script = script
        self._node = node
        self._log_path = str(log_path)
        self._retention_days = prompt_retention_days
        self._max_prompt = max_prompt_bytes
        # Audit rows written at or after this moment may still lack their Redis step.
        self._replay_since: dt.datetime | None = None

    # --- reads ----------------------------------------------------------------------------

    async def load_checkpoint(self) -> Checkpoint | None:
        row = await self._pool.fetchrow(_LOAD_CHECKPOINT, self._node, self._log_path)
        if row is None:
            return None
        self._replay_since = row["updated_at"]
        return Checkpoint(
            file=FileId(dev=_unsigned(row["dev"]), inode=_unsigned(row["inode"])),
            offset=row["byte_offset"],
            fingerprint=bytes(row["fingerprint"]),
            fingerprint_len=row["fingerprint_len"],
        )

    async def load_calibration(self) -> list[CalibrationRow]:
        return await writes.load_calibration(self._pool)

    # --- settlement -----------------------------------------------------------------------

    async def settle(self, batch: Batch, *, resume: Checkpoint) -> Outcome:
        """Settle `batch` exactly once; `resume` is the position before it (see above).

        When Postgres refuses the batch for a data reason, its requests are settled one
        by one, and each one refused alone is quarantined: logged once with its request
        id, counted as a bad line, audited as `quarantined()` (or, if even that is
        refused, only released in Redis with its reservation kept charged).
        """
        try:
            return await self._settle(batch, resume=resume)
        except DATA_ERRORS as exc:
            _log.warning(
                "a batch of %d requests was refused (%s); settling them one by one",
                len(batch.records),
                type(exc).__name__,
            )
        inserted, quarantine = 0, 0
        observations: list[Observation] = []
        for record in self._unique(batch.records):
            alone = Batch(records=(record,), checkpoint=batch.checkpoint, lines=0, bad_lines=0)
            try:
                outcome = await self._settle(alone, resume=resume)
            except DATA_ERRORS as exc:
                quarantine += 1
                outcome = await self._quarantine(record, alone, resume=resume, error=exc)
            inserted += outcome.inserted
            observations += outcome.observations
        # The batch's line counts, with the quarantined requests among its bad lines.
        counts = Batch(
            records=(),
            checkpoint=batch.checkpoint,
            lines=batch.lines,
            bad_lines=batch.bad_lines + quarantine,
        )
        await self._settle(counts, resume=resume)
        return Outcome(inserted=inserted, observations=tuple(observations), quarantined=quarantine)

    async def _quarantine(
        self, record: Record, alone: Batch, *, resume: Checkpoint, error: BaseException
    ) -> Outcome:
        event = record.event
        _log.warning(
            "quarantined request %s of key %s: Postgres refused its row (%s); "
            "charged as reserved (%s tokens)",
            event.request_id,
            event.key_prefix or "-",
            type(error).__name__,
            event.reserved or 0,
        )
        flagged = quarantined(record)
        try:
            return await self._settle(attrs.evolve(alone, records=(flagged,)), resume=resume)
        except DATA_ERRORS as exc:
            _log.error(
                "request %s could not be audited at all (%s); its lease is released and "
                "its reservation stays charged",
                event.request_id,
                type(exc).__name__,
            )
        # Redis only: delta 0 against the reservation (it stays charged), lease released.
        await settle_in_redis(
            self._script, [RedisSettlement(record=flagged, ledger_ms=int(time.time() * 1000))]
        )
        return Outcome(inserted=0, observations=())

    async def _settle(self, batch: Batch, *, resume: Checkpoint) -> Outcome:
        records = self._unique(batch.records)
        async with self._pool.acquire() as conn:
            try:
                # Usually no audit row exists yet: everything in one statement.
                committed = await self._write(conn, batch, resume, audit=records, new=records)
            except asyncpg.UniqueViolationError:
                committed = None  # another node audited one of them just now
            new: list[Record] = records
            written: dict[uuid.UUID, writes.Audited] = {}
            if committed is None:
                # Some were audited before (a replay after a crash, a reread file, the
                # sweep): write the others, and learn when and with which usage those were.
                async with conn.transaction():
                    inserted = await writes.insert_audit(conn, records, node=self._node)
                    new = [r for r in records if r.event.request_id in inserted]
                    written = await writes.audited(
                        conn,
                        [r.event.request_id for r in records if r.event.request_id not in inserted],
                    )
                    committed = await self._write(conn, batch, resume, audit=(), new=new)
                assert committed is not None
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
        await settle_in_redis(self._script, items)
        metrics.settled(new)
        observations = tuple(r.observation for r in new if r.observation is not None)
        return Outcome(inserted=len(new), observations=observations)

    async def _write(
        self,
        conn: asyncpg.Connection,
        batch: Batch,
        resume: Checkpoint,
        *,
        audit: Sequence[Record],
        new: Sequence[Record],
    ) -> dt.datetime | None:
        return await writes.settle_batch(
            conn,
            node=self._node,
            log_path=self._log_path,
            audit=audit,
            new=new,
            position=resume,
            lines=batch.lines,
            bad_lines=batch.bad_lines,
            last_event_at=max((r.event.started for r in batch.records), default=None),
            max_prompt_bytes=self._max_prompt,
            retention_days=self._retention_days,
        )

    async def advance(self, position: Checkpoint) -> None:
        """Move the checkpoint past batches whose Redis step is done (idle, or stopping)."""
        async with self._pool.acquire() as conn:
            self._replay_since = await writes.save_checkpoint(
                conn, node=self._node, log_path=self._log_path, position=position
            )

    @staticmethod
    def _unique(records: Iterable[Record]) -> list[Record]:
        seen: set[uuid.UUID] = set()
        unique = []
        for record in records:
            if record.event.request_id not in seen:
                seen.add(record.event.request_id)
                unique.append(record)
        return unique

    # --- housekeeping ---------------------------------------------------------------------

    async def prune_prompts(self) -> int:
        """Delete expired prompts, in chunks so no single statement holds locks for long."""
        return await prune_expired_prompts(self._pool)
