"""Reservations whose log line never arrives: charged as reserved once, flagged, on any node.

Once a test has started the session's stack, its meterd (node "local", default grace)
sweeps the same Redis every minute. So that it never sweeps a reservation first, each
reservation here is overdue only for the sweeper under test: the in-process sweepers run
on a clock set ahead of the admissions, and the daemon under test has a shorter grace.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from meterd.health import read_beat
from meterd.settings import load_settings
from meterd.sweep import MISSING_LINE, Sweeper, hold_off_s, parse_reservation
from meterd.usage import Source
from meterd.writes import insert_audit
from policyd.authz.records import KeyRecord
from policyd.shared.keyspace import heartbeat as heartbeat_key
from policyd.shared.keyspace import reservation as redis_reservation
from policyd.shared.tables import audit_log, usage_ledger
from tests.meterd.conftest import LEASE_S, Stores, admit, leases, spent
from tests.meterd.process import Meterd
from tests.meterd.records import batch, exact, position

#: The grace of the in-process sweepers, as meterd's default.
_GRACE_S = 120
#: The daemon under test's grace: far below the default of any other meterd on this Redis.
_DAEMON_GRACE_S = 5
#: How long ago the daemon test's reservation lost its lease: past the daemon's grace (with
#: room for a hold-off), well within the default one for the whole of the test.
_DAEMON_OVERDUE_S = 60


class _Clock:
    """A settable wall clock (unix seconds)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _past_grace(admitted: float, *, by: float) -> _Clock:
    """A clock `by` seconds after the lease of a request admitted at `admitted` plus the grace."""
    return _Clock(admitted + LEASE_S + _GRACE_S + by)


def _sweeper(stores: Stores, clock: _Clock, node: str = "node-a") -> Sweeper:
    return Sweeper(
        stores.pool,
        stores.redis,
        stores.script,
        node=node,
        grace_s=_GRACE_S,
        scan_count=3,
        clock=clock,
    )


async def _audit_rows(engine: AsyncEngine) -> list[sa.Row[tuple[object, ...]]]:
    async with engine.connect() as conn:
        return list(await conn.execute(sa.select(audit_log).order_by(audit_log.c.ts)))


async def _ledger(engine: AsyncEngine) -> list[tuple[object, ...]]:
    c = usage_ledger.c
    stmt = sa.select(c.key_id, c.day, c.requests, c.prompt_tokens, c.completion_tokens).add_columns(
        c.estimated_tokens
    )
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(stmt)]


async def _reserved(redis: aioredis.Redis, key: KeyRecord, request_id: uuid.UUID) -> bool:
    return bool(await redis.exists(redis_reservation(key.tenant_id, str(request_id))))


async def test_overdue_reservation_is_swept_once(stores: Stores, key: KeyRecord) -> None:
    """An expired reservation becomes a 'reserved' audit row and ledger entry; a fresh one stays."""
    engine, redis = stores.engine, stores.redis
    admitted_at = int(time.time())
    clock = _past_grace(admitted_at, by=30)
    fresh = await admit(redis, key, at=clock.now - 5, reserve=700)
    overdue = await admit(redis, key, at=admitted_at + 0.4, reserve=900)
    budget = await spent(redis, key)
    sweeper = _sweeper(stores, clock)

    assert await sweeper.sweep() == 1

    (row,) = await _audit_rows(engine)
    assert row.request_id == overdue
    assert (row.usage_source, row.prompt_tokens, row.completion_tokens) == ("reserved", 0, 900)
    assert (row.status, row.method, row.path, row.refusal) == (0, "-", "-", MISSING_LINE)
    assert (row.key_id, row.tenant_id, row.key_prefix) == (
        uuid.UUID(key.key_id),
        uuid.UUID(key.tenant_id),
        key.prefix,
    )
    assert row.ts == dt.datetime.fromtimestamp(admitted_at, dt.UTC)
    assert (row.reserved_tokens, row.node) == (900, "node-a")
    day = dt.datetime.fromtimestamp(admitted_at, dt.UTC).date()
    assert await _ledger(engine) == [(uuid.UUID(key.key_id), day, 1, 0, 900, 900)]
    assert not await _reserved(redis, key, overdue)
    assert await _reserved(redis, key, fresh)
    assert await spent(redis, key) == budget  # already charged at admission
    assert await leases(redis, key) == 1


async def test_second_sweep_and_late_line_change_nothing(stores: Stores, key: KeyRecord) -> None:
    """Sweeping again, or the line finally arriving, neither re-audits nor double-counts."""
    engine, redis = stores.engine, stores.redis
    admitted = time.time()
    overdue = await admit(redis, key, at=admitted, reserve=500)
    sweeper = _sweeper(stores, _past_grace(admitted, by=60))
    assert await sweeper.sweep() == 1
    rows, ledger, budget = await _audit_rows(engine), await _ledger(engine), await spent(redis, key)

    assert await sweeper.sweep() == 0
    late = stores.store()
    outcome = await late.settle(
        batch([exact(key, 30, 40, request_id=str(overdue))]), resume=position(0)
    )

    assert outcome.inserted == 0
    assert await _audit_rows(engine) == rows
    assert await _ledger(engine) == ledger
    assert await spent(redis, key) == budget


async def test_grace_follows_the_clock(stores: Stores, key: KeyRecord) -> None:
    """A reservation is swept only once its lease expired more than the grace ago."""
    redis = stores.redis
    admitted = time.time() - 10
    request_id = await admit(redis, key, at=admitted, reserve=700)
    clock = _past_grace(admitted, by=-1)
    sweeper = _sweeper(stores, clock)

    assert await sweeper.sweep() == 0
    assert await sweeper.sweep(hold_off=30) == 0
    clock.now += 2
    assert await sweeper.sweep(hold_off=30) == 0  # a lagging node widens the grace
    assert await _reserved(redis, key, request_id)
    assert await sweeper.sweep() == 1
    assert not await _reserved(redis, key, request_id)


async def test_nodes_sweeping_at_once_charge_once(stores: Stores, key: KeyRecord) -> None:
    """Two nodes sweeping the same reservations together write each audit and ledger entry once."""
    redis = stores.redis
    admitted = time.time()
    ids = [await admit(redis, key, at=admitted + n, reserve=100) for n in range(8)]
    clock = _past_grace(admitted, by=1000)
    a, b = (_sweeper(stores, clock, node) for node in ("node-a", "node-b"))

    counts = await asyncio.gather(a.sweep(), b.sweep())

    assert sum(counts) == len(ids)
    assert {row.request_id for row in await _audit_rows(stores.engine)} == set(ids)
    ledger = await _ledger(stores.engine)
    assert sum(r[2] for r in ledger) == len(ids)  # type: ignore[misc]
    assert sum(r[4] for r in ledger) == 100 * len(ids)  # type: ignore[misc]
    assert await leases(redis, key) == 0


async def test_audited_but_unsettled_request_is_settled_as_audited(
    stores: Stores, key: KeyRecord
) -> None:
    """A request audited before a crash (reservation still in Redis) is settled with its usage."""
    redis = stores.redis
    admitted = time.time()
    request_id = await admit(redis, key, at=admitted, reserve=1000)
    before = await spent(redis, key)
    record = exact(key, 30, 40, request_id=str(request_id))
    async with stores.pool.acquire() as conn:  # the commit happened, Redis did not
        await insert_audit(conn, [record], node="node-a")

    assert await _sweeper(stores, _past_grace(admitted, by=1000), "node-b").sweep() == 0

    (row,) = await _audit_rows(stores.engine)
    assert (row.usage_source, row.node) == ("exact", "node-a")
    assert await _ledger(stores.engine) == []  # the crashed batch's ledger is its own business
    assert not await _reserved(redis, key, request_id)
    assert await spent(redis, key) == before - 1000 + 70


def test_parse_reservation_rejects_foreign_hashes() -> None:
    """Only hashes shaped like admission's are read; anything else is left alone."""
    tenant, rid, kid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    name = redis_reservation(str(tenant), str(rid)).encode()
    good = {
        b"k": str(kid).encode(),
        b"t": str(tenant).encode(),
        b"tok": b"12",
        b"sec": b"1700000000",
        b"lease": b"1700000600000",
    }
    parsed = parse_reservation(name, good)
    assert parsed is not None
    assert (parsed.request_id, parsed.key_id, parsed.tokens) == (rid, kid, 12)
    assert parse_reservation(name, {}) is None
    assert parse_reservation(name, {**good, b"tok": b"many"}) is None
    assert parse_reservation(b"nz:{t:x}:res:not-a-uuid", good) is None
    assert parse_reservation(name, {**good, b"k": b""}) is None


async def test_hold_off_reads_the_heartbeats(redis: aioredis.Redis) -> None:
    """The hold-off is the largest lag any live node reports, unknown while one starts behind."""
    assert await hold_off_s(redis) == 0.0
    beat = {"node": "a", "at": time.time(), "state": "ok", "lines": 0, "bad_lines": 0}
    await redis.set(
        heartbeat_key("a"), msgspec.json.encode({**beat, "lag_bytes": 0, "lag_seconds": 0})
    )
    await redis.set(
        heartbeat_key("b"), msgspec.json.encode({**beat, "lag_bytes": 9, "lag_seconds": 42.5})
    )
    assert await hold_off_s(redis) == 42.5
    await redis.set(
        heartbeat_key("c"), msgspec.json.encode({**beat, "lag_bytes": 9, "lag_seconds": 0})
    )
    assert await hold_off_s(redis) is None


def test_settings_read_the_sweep_options() -> None:
    """NZ_METERD_SWEEP_EVERY_S and NZ_METERD_SWEEP_GRACE_S are read, with their defaults."""
    env = {
        "NZ_DATABASE_URL": "postgresql+asyncpg://u:p@127.0.0.1:1/db",
        "NZ_REDIS_URL": "redis://127.0.0.1:1/0",
        "NZ_ACCESS_LOG": "/var/log/caddy/access.log",
    }
    defaults = load_settings(env)
    assert (defaults.sweep_every_s, defaults.sweep_grace_s) == (30.0, 30.0)
    tuned = load_settings({**env, "NZ_METERD_SWEEP_EVERY_S": "5", "NZ_METERD_SWEEP_GRACE_S": "0.5"})
    assert (tuned.sweep_every_s, tuned.sweep_grace_s) == (5.0, 0.5)


@pytest.fixture
def meterd(tmp_path: Path, database_url: str, redis_url: str) -> Iterator[Meterd]:
    """A meterd node that sweeps every 0.2 s with a short grace, on an empty log."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "access.log").write_bytes(b"")
    node = Meterd(
        database_url=database_url,
        redis_url=redis_url,
        access_log=tmp_path / "logs" / "access.log",
        log_path=tmp_path / "meterd.log",
        settings={
            "NZ_METERD_SWEEP_EVERY_S": "0.2",
            "NZ_METERD_SWEEP_GRACE_S": str(_DAEMON_GRACE_S),
            "NZ_METERD_HEARTBEAT_TTL_S": "3",
        },
    )
    yield node
    node.stop()


async def test_daemon_sweeps_and_counts_in_its_heartbeat(
    meterd: Meterd, stores: Stores, key: KeyRecord
) -> None:
    """The running daemon sweeps an overdue reservation, counts it and logs its request id."""
    engine, redis = stores.engine, stores.redis
    lease_expired = time.time() - _DAEMON_OVERDUE_S
    request_id = await admit(redis, key, at=lease_expired - LEASE_S, reserve=700)
    meterd.start()
    deadline = time.monotonic() + 15
    while (beat := await read_beat(redis, "test-node")) is None or beat.swept < 1:
        if time.monotonic() >= deadline:
            # Who audited it, if anyone, tells a slow daemon from another node sweeping first.
            audited = [(row.request_id, row.node) for row in await _audit_rows(engine)]
            raise AssertionError(f"not swept; audit rows {audited}\n{meterd.log_path.read_text()}")
        await asyncio.sleep(0.2)
    assert meterd.terminate() == 0
    (row,) = await _audit_rows(engine)
    assert (row.request_id, row.usage_source) == (request_id, Source.RESERVED.value)
    assert not await _reserved(redis, key, request_id)
    logged = meterd.log_path.read_text()
    assert str(request_id) in logged
    assert key.prefix in logged
