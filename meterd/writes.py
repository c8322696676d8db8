"""meterd's Postgres statements: constant SQL, a whole batch per round trip.

Every statement takes its rows as one JSON array (`json_to_recordset`): msgspec encodes
a batch in a fraction of the CPU that asyncpg spends on one array per column, and
Postgres reads it in one pass. The texts never change, so asyncpg prepares each once
per connection.

`SETTLE` writes a whole batch in one statement (so in one implicit transaction): the
audit rows, the ledger, prompts and calibration, and the checkpoint. It writes only if
none of the batch's audit rows exists yet, which is every batch but replays; otherwise
it writes nothing and the caller takes the step by step path in a transaction
(`insert_audit`, then `SETTLE` without audit rows). Its audit INSERT has no ON CONFLICT:
a row another node inserts concurrently (the sweep) fails the statement as a whole,
and the step by step path sorts it out.

Every lookup is written so that it goes by index whatever the statistics say (a
LATERAL probe per row, `= ANY(array)`): asyncpg keeps each statement's generic plan for
the connection's life, and one planned while a table looked empty would otherwise scan
it whole on every batch.

Ledger and calibration rows are upserted in key order (`ORDER BY`), and every path
writes them with the same statement, so nodes settling the same keys at once lock the
rows in the same order and cannot deadlock. The tables are described in `schema.py`.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Final

import asyncpg  # type: ignore[import-untyped]
import attrs
import msgspec

from meterd.calibration import (
    FIGURES,
    RATE_FLOOR,
    STEP,
    CalibrationRow,
    Observation,
    batch_steps,
    learn_row,
)
from meterd.parse import clean_text
from meterd.records import Record
from meterd.tail import Checkpoint
from meterd.usage import Source, Usage
from policyd.shared.bounds import MAX_PROMPT_RETENTION_DAYS

__all__ = [
    "Audited",
    "add_to_ledger",
    "audited",
    "insert_audit",
    "load_calibration",
    "save_checkpoint",
    "settle_batch",
]

_U64: Final = 2**64
_I63: Final = 2**63
#: Stands for "write these rows" in the statements below; `SETTLE` replaces it by its
#: condition that no audit row of the batch exists yet.
_ALWAYS: Final = "/* guard */ true"

_AUDIT_COLUMNS: Final = """
    request_id, ts, tenant_id, key_id, key_prefix, method, path, surface, model, stream,
    status, prompt_tokens, completion_tokens, usage_source, reserved_tokens, bytes_in,
    bytes_out, duration_ms, ttfb_ms, client_ip, user_agent, refusal, upstream, claimed_prefix"""

# $1: the rows (`_AuditRow`), $2: the node.
_AUDIT_SOURCE: Final = """
json_to_recordset($1::json) AS r(
    request_id uuid, ts timestamptz, tenant_id uuid, key_id uuid, key_prefix text,
    method text, path text, surface text, model text, stream boolean, status integer,
    prompt_tokens bigint, completion_tokens bigint, usage_source text,
    reserved_tokens bigint, bytes_in bigint, bytes_out bigint, duration_ms bigint,
    ttfb_ms bigint, client_ip inet, user_agent text, refusal text, upstream text,
    claimed_prefix text)"""

_INSERT_AUDIT: Final = f"""
INSERT INTO audit_log ({_AUDIT_COLUMNS}, node)
SELECT {_AUDIT_COLUMNS}, $2::text FROM {_AUDIT_SOURCE}
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id
"""  # noqa: S608 -- built from constants; every value is a bound parameter # nosec B608

_AUDITED: Final = """
SELECT request_id, settled_at, prompt_tokens, completion_tokens, usage_source
  FROM audit_log
 WHERE request_id = ANY($1::uuid[])
"""

# $1: the rows (`_LedgerRow`), one per key and day.
_ADD_TO_LEDGER: Final = f"""
INSERT INTO usage_ledger AS l (
    key_id, tenant_id, day, requests, prompt_tokens, completion_tokens, estimated_tokens)
SELECT n.key_id, n.tenant_id, n.day, n.requests, n.prompt_tokens, n.completion_tokens,
       n.estimated_tokens
  FROM json_to_recordset($1::json) AS n(
       key_id uuid, tenant_id uuid, day date, requests bigint, prompt_tokens bigint,
       completion_tokens bigint, estimated_tokens bigint)
 WHERE {_ALWAYS}
 ORDER BY n.key_id, n.day
ON CONFLICT (key_id, day) DO UPDATE SET
    requests = l.requests + excluded.requests,
    prompt_tokens = l.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = l.completion_tokens + excluded.completion_tokens,
    estimated_tokens = l.estimated_tokens + excluded.estimated_tokens,
    updated_at = now()
"""  # noqa: S608 -- built from constants; every value is a bound parameter # nosec B608

# $1: the candidates (`_PromptRow`), $2: stored_at, $3: default retention (days).
# The key's effective prompt-logging policy is read at settlement (the join), so that
# turning logging off stops storing at once, even for lines admitted before the change.
# Retention in hours: adding days would follow the session's time zone across DST. It is
# bounded to the stated maximum, so a value set behind the CLI's back cannot overflow.
_STORE_PROMPTS: Final = f"""
INSERT INTO prompt_log (request_id, key_id, tenant_id, stored_at, expires_at, body, truncated)
SELECT p.request_id, p.key_id, p.tenant_id, $2::timestamptz,
       p.started + make_interval(hours => 24 * LEAST(GREATEST(COALESCE(
           NULLIF(COALESCE(k.prompt_retention_days, t.prompt_retention_days), 0), $3::integer),
           1), {MAX_PROMPT_RETENTION_DAYS})),
       p.body, p.truncated
  FROM json_to_recordset($1::json) AS p(
       request_id uuid, key_id uuid, tenant_id uuid, started timestamptz, body text,
       truncated boolean)
 CROSS JOIN LATERAL (
       SELECT tenant_id, prompt_logging, prompt_retention_days
         FROM api_keys WHERE id = p.key_id LIMIT 1) AS k
 CROSS JOIN LATERAL (
       SELECT prompt_logging, prompt_retention_days
         FROM tenants WHERE id = k.tenant_id LIMIT 1) AS t
 WHERE COALESCE(k.prompt_logging, t.prompt_logging, false) AND {_ALWAYS}
ON CONFLICT (request_id) DO NOTHING
"""  # noqa: S608 -- built from constants; every value is a bound parameter # nosec B608


# $1: the updates (`_calibration_updates`): per tenant, model and path, the row as
# learnt from the priors (new rows) and, per figure, the batch's count `k` and median
# `target` (log space). A stored row is pulled towards the target by the rule of
# calibration.pulled, here in SQL so that nodes learning at once both count.
def _pull(figure: str) -> str:
    rate = f"least(1.0, f.{figure}_k * greatest(1.0 / (c.{figure}_n + 1.0), {RATE_FLOOR!r}))"
    pull = f"greatest({-STEP!r}, least({STEP!r}, f.{figure}_target - c.{figure}_log))"
    pulled = f"c.{figure}_log + {rate} * {pull}"
    first = f"c.{figure}_n <= 0 AND f.{figure}_k > 0"
    return (
        f"c.{figure}_n + f.{figure}_k, CASE WHEN {first} THEN f.{figure}_target ELSE {pulled} END"
    )


_FIGURE_COLUMNS: Final = ", ".join(f"{f}_n, {f}_log" for f in FIGURES)
_FIGURE_INPUT: Final = ", ".join(
    f"{f}_n float8, {f}_log float8, {f}_k integer, {f}_target float8" for f in FIGURES
)
_TEACH: Final = f"""
INSERT INTO meter_calibration AS c (tenant_id, model, path, {_FIGURE_COLUMNS})
SELECT n.tenant_id, n.model, n.path, {", ".join(f"n.{f}_n, n.{f}_log" for f in FIGURES)}
  FROM json_to_recordset($1::json) AS n(
       tenant_id uuid, model text, path text,
       {_FIGURE_INPUT})
 WHERE {_ALWAYS}
 ORDER BY n.tenant_id, n.model, n.path
ON CONFLICT (tenant_id, model, path) DO UPDATE SET
    ({_FIGURE_COLUMNS}, updated_at) = (
        SELECT {", ".join(_pull(f) for f in FIGURES)}, now()
          FROM json_to_recordset($1::json) AS f(
               tenant_id uuid, model text, path text,
               {", ".join(f"{f}_k integer, {f}_target float8" for f in FIGURES)})
         WHERE f.tenant_id = excluded.tenant_id AND f.model = excluded.model
           AND f.path = excluded.path)
"""  # noqa: S608 -- built from constants; every value is a bound parameter # nosec B608

_LOAD_CALIBRATION: Final = f"""
SELECT tenant_id::text AS tenant, model, path, {_FIGURE_COLUMNS} FROM meter_calibration
"""  # noqa: S608 -- built from constants # nosec B608

# $1 node, $2 log path, $3-$7 the position, $8-$9 line counts to add, $10 last event.
_SAVE_CHECKPOINT: Final = f"""
INSERT INTO meter_checkpoints AS c (
    node, log_path, dev, inode, byte_offset, fingerprint, fingerprint_len, lines, bad_lines,
    last_event_at)
SELECT $1::text, $2::text, $3::bigint, $4::bigint, $5::bigint, $6::bytea, $7::integer,
       $8::bigint, $9::bigint, $10::timestamptz
 WHERE {_ALWAYS}
ON CONFLICT (node, log_path) DO UPDATE SET
    dev = excluded.dev,
    inode = excluded.inode,
    byte_offset = excluded.byte_offset,
    fingerprint = excluded.fingerprint,
    fingerprint_len = excluded.fingerprint_len,
    lines = c.lines + excluded.lines,
    bad_lines = c.bad_lines + excluded.bad_lines,
    last_event_at = COALESCE(excluded.last_event_at, c.last_event_at),
    updated_at = now()
RETURNING updated_at
"""  # built from constants; every value is a bound parameter # nosec B608


def _shifted(sql: str, by: int) -> str:
    """`sql` with its parameters renumbered: $1 becomes $(1 + by), and so on."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m[1]) + by}", sql)


def _guarded(sql: str) -> str:
    return sql.replace(_ALWAYS, "NOT EXISTS (SELECT FROM existing)")


# $1 audit rows, $2 node, $3 ledger, $4-$6 prompts, $7 calibration, $8-$17 checkpoint.
_SETTLE: Final = f"""
WITH input AS (
    SELECT {_AUDIT_COLUMNS} FROM {_AUDIT_SOURCE}
), existing AS (
    SELECT i.request_id FROM input AS i CROSS JOIN LATERAL (
        SELECT FROM audit_log AS a WHERE a.request_id = i.request_id LIMIT 1) AS hit
), audited AS (
    INSERT INTO audit_log ({_AUDIT_COLUMNS}, node)
    SELECT {_AUDIT_COLUMNS}, $2::text FROM input WHERE NOT EXISTS (SELECT FROM existing)
), ledger AS ({_guarded(_shifted(_ADD_TO_LEDGER, 2))}
), prompts AS ({_guarded(_shifted(_STORE_PROMPTS, 3))}
), taught AS ({_guarded(_shifted(_TEACH, 6))}
), saved AS ({_guarded(_shifted(_SAVE_CHECKPOINT, 7))}
)
SELECT updated_at FROM saved
"""  # noqa: S608 -- built from constants; every value is a bound parameter # nosec B608


class _AuditRow(msgspec.Struct, kw_only=True):
    """One audit_log row (the field names are the JSON keys the statements read).

    Every text was bounded and cleaned of NUL and lone surrogates by parse.py, which the
    JSON conversion in Postgres would refuse just like a text column.
    """

    request_id: uuid.UUID
    ts: dt.datetime
    tenant_id: uuid.UUID | None
    key_id: uuid.UUID | None
    key_prefix: str | None
    method: str
    path: str
    surface: str | None
    model: str | None
    stream: bool | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    usage_source: str
    reserved_tokens: int | None
    bytes_in: int
    bytes_out: int
    duration_ms: int
    ttfb_ms: int | None
    client_ip: str | None
    user_agent: str | None
    refusal: str | None
    upstream: str | None
    claimed_prefix: str | None


class _LedgerRow(msgspec.Struct, kw_only=True):
    key_id: uuid.UUID
    tenant_id: uuid.UUID
    day: dt.date
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_tokens: int = 0


class _PromptRow(msgspec.Struct, kw_only=True):
    request_id: uuid.UUID
    key_id: uuid.UUID
    tenant_id: uuid.UUID
    started: dt.datetime
    body: str
    truncated: bool


_JSON: Final = msgspec.json.Encoder()


def _json(rows: Sequence[msgspec.Struct] | Sequence[dict[str, object]]) -> str:
    return _JSON.encode(rows).decode()


@attrs.frozen(kw_only=True)
class Audited:
    """An audit row written earlier: when, and the usage it recorded."""

    at: dt.datetime
    usage: Usage


def _audit_rows(records: Iterable[Record]) -> list[_AuditRow]:
    rows = []
    for record in records:
        event, usage = record.event, record.usage
        rows.append(
            _AuditRow(
                request_id=event.request_id,
                ts=event.started,
                tenant_id=event.tenant_id,
                key_id=event.key_id,
                key_prefix=event.key_prefix,
                method=event.method,
                path=event.path,
                surface=event.surface,
                model=event.model,
                stream=event.stream,
                status=event.status,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                usage_source=usage.source.value,
                reserved_tokens=event.reserved,
                bytes_in=event.bytes_in,
                bytes_out=event.bytes_out,
                duration_ms=event.duration_ms,
                ttfb_ms=event.ttfb_ms,
                client_ip=event.client_ip,
                user_agent=event.user_agent,
                refusal=event.refusal,
                upstream=event.upstream,
                claimed_prefix=event.claimed_prefix,
            )
        )
    return rows


def _ledger_rows(records: Iterable[Record]) -> list[_LedgerRow]:
    """The records' usage per key and UTC day (requests refused before admission count not)."""
    totals: dict[tuple[uuid.UUID, dt.date], _LedgerRow] = {}
    for record in records:
        event, usage = record.event, record.usage
        if not event.admitted or event.key_id is None or event.tenant_id is None:
            continue  # refused before admission: nothing to count against a key
        day = event.started.date()
        row = totals.get((event.key_id, day))
        if row is None:
            row = totals[(event.key_id, day)] = _LedgerRow(
                key_id=event.key_id, tenant_id=event.tenant_id, day=day
            )
        row.requests += 1
        row.prompt_tokens += usage.prompt_tokens
        row.completion_tokens += usage.completion_tokens
        if usage.source is not Source.EXACT:
            row.estimated_tokens += usage.total
    return list(totals.values())


def _bounded(body: str, max_bytes: int) -> tuple[str | None, bool]:
    """The body fit for the prompt log: at most `max_bytes` of UTF-8, and whether it was cut."""
    encoded = body.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return clean_text(body, len(body)), False
    cut = encoded[:max_bytes].decode("utf-8", "ignore")
    return clean_text(cut, len(cut)), True


def _prompt_rows(records: Iterable[Record], max_bytes: int) -> list[_PromptRow]:
    """Bodies of requests flagged for the prompt log (the key's policy is checked in SQL)."""
    rows = []
    for record in records:
        event = record.event
        if not event.prompt_log or event.req_body is None:
            continue
        if not event.admitted or event.key_id is None or event.tenant_id is None:
            continue  # refused before admission: no key to keep it for
        body, truncated = _bounded(event.req_body, max_bytes)
        if body is not None:
            rows.append(
                _PromptRow(
                    request_id=event.request_id,
                    key_id=event.key_id,
                    tenant_id=event.tenant_id,
                    started=event.started,
                    body=body,
                    truncated=truncated,
                )
            )
    return rows


def _calibration_updates(observations: Iterable[Observation]) -> list[dict[str, object]]:
    """Per (tenant, model, path): the row learnt from the priors, and the batch's steps."""
    updates: list[dict[str, object]] = []
    for (tenant, model, path), steps in batch_steps(observations).items():
        fresh = learn_row(CalibrationRow(tenant=tenant, model=model, path=path), steps)
        update: dict[str, object] = attrs.asdict(fresh)
        update["tenant_id"] = update.pop("tenant")
        for figure in FIGURES:
            step = steps.get(figure)
            update[f"{figure}_k"] = step.k if step is not None else 0
            update[f"{figure}_target"] = step.target if step is not None else 0.0
        updates.append(update)
    return updates


async def load_calibration(pool: asyncpg.Pool) -> list[CalibrationRow]:
    """Every tenant's stored figures."""
    return [CalibrationRow(**dict(row)) for row in await pool.fetch(_LOAD_CALIBRATION)]


def _signed(value: int) -> int:
    """A device or inode number (unsigned 64-bit) as Postgres's bigint holds it."""
    return value - _U64 if value >= _I63 else value


def _checkpoint_args(
    node: str,
    log_path: str,
    position: Checkpoint,
    *,
    lines: int,
    bad_lines: int,
    last_event_at: dt.datetime | None,
) -> tuple[object, ...]:
    return (
        node,
        log_path,
        _signed(position.file.dev),
        _signed(position.file.inode),
        position.offset,
        position.fingerprint,
        position.fingerprint_len,
        lines,
        bad_lines,
        last_event_at,
    )


async def settle_batch(
    conn: asyncpg.Connection,
    *,
    node: str,
    log_path: str,
    audit: Sequence[Record],
    new: Sequence[Record],
    position: Checkpoint,
    lines: int,
    bad_lines: int,
    last_event_at: dt.datetime | None,
    max_prompt_bytes: int,
    retention_days: int,
) -> dt.datetime | None:
    """`SETTLE`: audit rows for `audit`, the ledger, prompts and calibration of `new`, and
    the checkpoint `position` with the batch's line counts; one statement.

    Returns the transaction's time, or None when an audit row of `audit` existed already
    (then nothing was written). Raises asyncpg.UniqueViolationError when another
    transaction inserted one of them meanwhile (nothing was written either).
    """
    observations = [r.observation for r in new if r.observation is not None]
    committed: dt.datetime | None = await conn.fetchval(
        _SETTLE,
        _json(_audit_rows(audit)),
        node,
        _json(_ledger_rows(new)),
        _json(_prompt_rows(new, max_prompt_bytes)),
        dt.datetime.now(dt.UTC),
        retention_days,
        _json(_calibration_updates(observations)),
        *_checkpoint_args(
            node,
            log_path,
            position,
            lines=lines,
            bad_lines=bad_lines,
            last_event_at=last_event_at,
        ),
    )
    return committed


async def insert_audit(
    conn: asyncpg.Connection, records: Sequence[Record], *, node: str
) -> set[uuid.UUID]:
    """Write the audit rows that do not exist yet; returns the request ids written."""
    if not records:
        return set()
    found = await conn.fetch(_INSERT_AUDIT, _json(_audit_rows(records)), node)
    return {row[0] for row in found}


async def audited(conn: asyncpg.Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Audited]:
    """The audit rows that exist for `ids`: when they were written, with which usage."""
    if not ids:
        return {}
    return {
        row[0]: Audited(
            at=row[1],
            usage=Usage(prompt_tokens=row[2], completion_tokens=row[3], source=Source(row[4])),
        )
        for row in await conn.fetch(_AUDITED, list(ids))
    }


async def add_to_ledger(conn: asyncpg.Connection, records: Iterable[Record]) -> None:
    """Add the usage of newly audited records to the ledger, per key and UTC day."""
    rows = _ledger_rows(records)
    if rows:
        await conn.execute(_ADD_TO_LEDGER, _json(rows))


async def save_checkpoint(
    conn: asyncpg.Connection, *, node: str, log_path: str, position: Checkpoint
) -> dt.datetime:
    """Store `position` alone (no lines settled with it); returns the transaction's time."""
    updated: dt.datetime = await conn.fetchval(
        _SAVE_CHECKPOINT,
        *_checkpoint_args(node, log_path, position, lines=0, bad_lines=0, last_event_at=None),
    )
    return updated
