"""settle.py against real Postgres and Redis: once per request, whatever happens."""

from __future__ import annotations

import asyncio
import datetime as dt

import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from meterd.usage import Calibration, CalibrationRow
from meterd.writes import add_to_ledger, insert_audit
from policyd.authz.records import KeyRecord
from policyd.shared.retention import prune_expired_prompts
from policyd.shared.tables import audit_log, meter_calibration, prompt_log, usage_ledger
from tests.meterd.conftest import Stores, admit, create_key, leases, settler, spent
from tests.meterd.records import batch as _batch
from tests.meterd.records import exact as _exact
from tests.meterd.records import position as _position
from tests.meterd.records import record as _record


async def _count(engine: AsyncEngine, table: sa.Table) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def _ledger(engine: AsyncEngine) -> tuple[int, int, int]:
    c = usage_ledger.c
    stmt = sa.select(
        sa.func.sum(c.requests), sa.func.sum(c.prompt_tokens), sa.func.sum(c.completion_tokens)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(stmt)).one()
    return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)


async def test_a_batch_is_audited_and_ledgered_once(stores: Stores, key: KeyRecord) -> None:
    """Settling the same batch twice writes each audit row and ledger figure once."""
    batch = _batch(
        [_exact(key, 10, 5), _exact(key, 3, 7), _record(key, admitted=False, status=401)]
    )
    store = stores.store()
    first = await store.settle(batch, resume=_position(0))
    second = await store.settle(batch, resume=_position(0))
    assert (first.inserted, second.inserted) == (3, 0)
    assert await _count(stores.engine, audit_log) == 3
    assert await _ledger(stores.engine) == (2, 13, 12)


async def test_audit_row_has_identity_and_never_the_key(stores: Stores, key: KeyRecord) -> None:
    """The audit row names key, tenant, endpoint and usage source; no secret, no prompt."""
    record = _exact(key, 4, 2, path="/v1/chat/completions", req_body='{"secret prompt":1}')
    await stores.store().settle(_batch([record]), resume=_position(0))
    async with stores.engine.connect() as conn:
        row = (await conn.execute(sa.select(audit_log))).one()._mapping
    assert str(row["key_id"]) == key.key_id
    assert str(row["tenant_id"]) == key.tenant_id
    assert row["path"] == "/v1/chat/completions"
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (4, 2, "exact")
    assert str(row["client_ip"]) == "127.0.0.1"
    assert "secret prompt" not in repr(dict(row))


async def test_settlement_releases_the_lease_and_charges_actual_usage(
    stores: Stores, key: KeyRecord
) -> None:
    """After settling, the lease is gone and the budget holds actual, not reserved, tokens."""
    redis = stores.redis
    request_id = await admit(redis, key, reserve=1000)
    assert (await leases(redis, key), await spent(redis, key)) == (1, 1000)
    record = _exact(key, 20, 80, request_id=str(request_id))
    await stores.store().settle(_batch([record]), resume=_position(0))
    assert (await leases(redis, key), await spent(redis, key)) == (0, 100)


async def test_crash_between_commit_and_redis_is_settled_on_replay(
    stores: Stores, key: KeyRecord
) -> None:
    """If Redis fails after the commit, replaying the batch settles Redis, ledger once."""
    engine, redis = stores.engine, stores.redis
    request_id = await admit(redis, key, reserve=500)
    batch = _batch([_exact(key, 30, 20, request_id=str(request_id))])
    dead = settler(redis, "redis://127.0.0.1:1/0", timeout_s=0.5)
    try:
        await stores.store(script=dead).settle(batch, resume=_position(0))
    except (aioredis.ConnectionError, OSError):
        pass
    else:
        raise AssertionError("settling against a dead Redis should fail")
    finally:
        await dead.aclose()
    assert await _ledger(engine) == (1, 30, 20)  # committed before Redis was tried
    assert await spent(redis, key) == 500
    store = stores.store()
    await store.load_checkpoint()  # a restarted meterd
    await store.settle(batch, resume=_position(0))
    await store.settle(batch, resume=_position(0))
    assert await spent(redis, key) == 50
    assert await leases(redis, key) == 0
    assert await _ledger(engine) == (1, 30, 20)


async def test_a_row_audited_meanwhile_by_another_node_is_counted_once(
    stores: Stores, key: KeyRecord
) -> None:
    """A request another transaction audits while the batch is written is ledgered once."""
    rival, mine = _exact(key, 7, 7), _exact(key, 5, 5)
    async with stores.pool.acquire() as other:
        rivals = other.transaction()
        await rivals.start()
        await insert_audit(other, [rival], node="node-b")
        await add_to_ledger(other, [rival])
        settling = asyncio.ensure_future(
            stores.store().settle(_batch([rival, mine]), resume=_position(0))
        )
        await asyncio.sleep(0.5)
        assert not settling.done()  # waiting for the rival's audit row to commit or not
        await rivals.commit()
        outcome = await settling
    assert outcome.inserted == 1
    assert await _count(stores.engine, audit_log) == 2
    assert await _ledger(stores.engine) == (2, 12, 12)


async def test_rereading_old_lines_never_charges_redis_again(
    stores: Stores, key: KeyRecord
) -> None:
    """Lines settled before the checkpoint are not sent to Redis again, even without marks."""
    redis = stores.redis
    request_id = await admit(redis, key, reserve=100)
    batch = _batch([_exact(key, 5, 5, request_id=str(request_id))])
    store = stores.store()
    await store.settle(batch, resume=_position(0))
    await store.advance(_position(100))
    # The script's idempotency mark expires after two days; simulate that.
    await redis.delete(*[k async for k in redis.scan_iter(match="*done*")])
    restarted = stores.store()
    await restarted.load_checkpoint()
    await restarted.settle(batch, resume=_position(0))
    assert await spent(redis, key) == 10


async def test_checkpoint_round_trips_unsigned_file_ids(stores: Stores) -> None:
    """The stored checkpoint is exactly the position, per node and log path."""
    store = stores.store()
    assert await store.load_checkpoint() is None
    await store.settle(_batch([], offset=4242), resume=_position(1))
    assert await store.load_checkpoint() == _position(1)
    await store.advance(_position(4242))
    assert await store.load_checkpoint() == _position(4242)
    assert await stores.store(node="node-b").load_checkpoint() is None


async def test_prompts_are_stored_only_when_the_key_opted_in(stores: Stores) -> None:
    """Only flagged requests of keys whose policy is on keep their body, with its expiry."""
    engine = stores.engine
    opted = await create_key(engine, prompt_logging=True, retention_days=7)
    inherited = await create_key(engine, tenant_prompt_logging=True)
    turned_off = await create_key(engine, prompt_logging=False, tenant_prompt_logging=True)
    records = [
        _exact(opted, 1, 1, prompt_log=True, req_body='{"prompt":"keep me"}'),
        _exact(opted, 1, 1, prompt_log=False, req_body='{"prompt":"not flagged"}'),
        _exact(inherited, 1, 1, prompt_log=True, req_body='{"prompt":"tenant default"}'),
        _exact(turned_off, 1, 1, prompt_log=True, req_body='{"prompt":"switched off"}'),
        _exact(opted, 1, 1, prompt_log=True, req_body="x" * 100 + "é"),
    ]
    await stores.store().settle(_batch(records), resume=_position(0))
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(prompt_log))).all()
    stored = {row.body: row for row in rows}
    assert set(stored) == {'{"prompt":"keep me"}', '{"prompt":"tenant default"}', "x" * 64}
    keep = stored['{"prompt":"keep me"}']
    started = records[0].event.started
    assert keep.expires_at == started + dt.timedelta(days=7)
    assert stored['{"prompt":"tenant default"}'].expires_at == (
        records[2].event.started + dt.timedelta(days=30)
    )
    assert stored["x" * 64].truncated


async def test_expired_prompts_are_pruned(stores: Stores) -> None:
    """Pruning deletes prompts past their expiry and keeps the others."""
    key = await create_key(stores.engine, prompt_logging=True, retention_days=1)
    old = _exact(
        key,
        1,
        1,
        prompt_log=True,
        req_body="old",
        ts=(dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).timestamp(),
    )
    new = _exact(key, 1, 1, prompt_log=True, req_body="new")
    await stores.store().settle(_batch([old, new]), resume=_position(0))
    assert await prune_expired_prompts(stores.pool) == 1
    async with stores.engine.connect() as conn:
        assert (await conn.execute(sa.select(prompt_log.c.body))).scalars().all() == ["new"]


async def test_calibration_is_stored_as_learnt(stores: Stores, key: KeyRecord) -> None:
    """What the database accumulates equals what one process learns, batch by batch."""
    records = [_exact(key, 30 + 3 * n, 5 + n, counted=50) for n in range(5)]
    store = stores.store()
    await store.settle(_batch(records[:2]), resume=_position(0))
    await store.settle(_batch(records[2:], offset=200), resume=_position(100))
    local = Calibration()
    for batch in (records[:2], records[2:]):
        observations = [r.observation for r in batch if r.observation is not None]
        assert len(observations) == len(batch)
        local.learn(observations)
    stored = {(r.tenant, r.model, r.path): r for r in await store.load_calibration()}
    assert stored.keys() == local.rows().keys() == {(key.tenant_id, "llama3.2:latest", "/api/chat")}
    for name, row in local.rows().items():
        for field in ("prompt_n", "prompt_log", "reply_n", "reply_log"):
            assert abs(getattr(stored[name], field) - getattr(row, field)) < 1e-9, field
    assert await _count(stores.engine, meter_calibration) == 1
    assert isinstance(next(iter(stored.values())), CalibrationRow)
