"""Every Lua script touches only the keys it declares, all in its tenant's slot.

Redis Cluster (and any proxy that routes by key) sends a script to the node of its
declared KEYS and checks them; a key a script builds for itself is invisible to that
routing. Here Redis's MONITOR shows every command each script ran, `COMMAND GETKEYS`
names the keys of each, and every one must be among the KEYS of a script call made in
the same window, carrying the tenant's hash tag. The scripts run through the real
callers: policyd's admission and rebuild, meterd's batch settlement and sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Final

import attrs
import msgspec
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from meterd.settle import RedisSettlement, settle_in_redis
from meterd.settle_script import SettleScript
from meterd.sweep import Sweeper
from policyd.authz.limits import Limiter
from policyd.authz.rebuild import TenantLoader
from policyd.authz.records import KeyRecord, Limits
from policyd.shared import keyspace
from policyd.shared.contract import load_script, release_script
from policyd.shared.resp import redis_address
from tests.meterd import records
from tests.meterd.conftest import Stores

_QUOTED: Final = re.compile(r'"((?:[^"\\]|\\.)*)"')
_SCRIPT_CALLS: Final = frozenset({"eval", "evalsha"})


@attrs.frozen
class Seen:
    """What one window of MONITOR saw: keys declared by script calls, keys scripts touched."""

    declared: frozenset[str]
    touched: frozenset[str]
    script_calls: int


class Monitor:
    """A MONITOR connection whose lines are grouped into windows marked with ECHO."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.lines: list[str] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self._reader.readline():
            self.lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))

    async def wait_for(self, marker: str) -> int:
        for _ in range(500):
            for index, line in enumerate(self.lines):
                if f'"{marker}"' in line:
                    return index
            await asyncio.sleep(0.01)
        raise AssertionError(f"MONITOR never showed {marker}")

    def close(self) -> None:
        self._task.cancel()
        self._writer.close()


@contextlib.asynccontextmanager
async def monitoring(redis_url: str) -> AsyncIterator[Monitor]:
    address = redis_address(redis_url)
    assert address is not None
    assert address.path is None
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"".join(address.handshake()) + b"MONITOR\r\n")
    await writer.drain()
    monitor = Monitor(reader, writer)
    try:
        yield monitor
    finally:
        monitor.close()


async def watched(
    redis: aioredis.Redis, monitor: Monitor, action: asyncio.Future[object] | object
) -> Seen:
    """Run `action` (an awaitable) between two ECHO markers and read what MONITOR saw."""
    marker = uuid.uuid4().hex
    await redis.echo(f"start-{marker}")
    await action  # type: ignore[misc]
    await redis.echo(f"end-{marker}")
    start = await monitor.wait_for(f"start-{marker}")
    end = await monitor.wait_for(f"end-{marker}")
    declared: set[str] = set()
    touched: set[str] = set()
    calls = 0
    for line in monitor.lines[start + 1 : end]:
        args = [_unescape(a) for a in _QUOTED.findall(line)]
        if not args:
            continue
        if " lua] " in line:
            touched.update(await _keys_of(redis, args))
        elif args[0].lower() in _SCRIPT_CALLS:
            calls += 1
            declared.update(args[3 : 3 + int(args[2])])
    return Seen(frozenset(declared), frozenset(touched), calls)


def _unescape(text: str) -> str:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


async def _keys_of(redis: aioredis.Redis, command: list[str]) -> list[str]:
    if command[0].upper() in {"TIME", "PING"}:
        return []
    keys = await redis.command_getkeys(*command)
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


def assert_declared(seen: Seen, tenant_id: str) -> None:
    assert seen.script_calls > 0, "no script ran in this window"
    assert seen.touched, "the scripts touched no key"
    undeclared = seen.touched - seen.declared
    assert not undeclared, f"scripts touched keys they did not declare: {sorted(undeclared)}"
    tag = f"{{t:{tenant_id}}}"
    assert all(tag in key for key in seen.declared | seen.touched)


def limited(key: KeyRecord) -> KeyRecord:
    """The key with every limit of key and tenant set, so every dimension is written."""
    every = Limits(
        rpm=1000,
        tpm=10**7,
        concurrency=100,
        daily_tokens=10**8,
        monthly_tokens=10**9,
        total_tokens=10**10,
    )
    return msgspec.structs.replace(key, key_limits=every, tenant_limits=every)


def settlement(
    key: KeyRecord, request_id: uuid.UUID, at: dt.datetime, *, completion: int
) -> RedisSettlement:
    record = records.exact(key, 5, completion)
    event = attrs.evolve(record.event, request_id=request_id, started=at)
    return RedisSettlement(record=attrs.evolve(record, event=event), ledger_ms=0)


@pytest.fixture
async def monitor(redis_url: str) -> AsyncIterator[Monitor]:
    async with monitoring(redis_url) as watching:
        yield watching


async def test_admission_rebuild_and_settlement_declare_every_key(
    stores: Stores, key: KeyRecord, engine: AsyncEngine, monitor: Monitor
) -> None:
    """policyd's admission (with the tenant rebuilt first), meterd's settle of it."""
    key = limited(key)
    loader = TenantLoader(engine=engine, redis=stores.redis, load_script=load_script(), timeout_s=5)
    limiter = Limiter(redis=stores.redis, load_tenant=loader, lease_ttl_s=60, timeout_s=5)
    request_id = uuid.uuid4()
    admit = limiter.admit(key, request_id=str(request_id), reserve=100)
    seen = await watched(stores.redis, monitor, admit)
    assert seen.script_calls >= 3  # admit (not loaded), load, admit
    assert_declared(seen, key.tenant_id)

    now = dt.datetime.now(dt.UTC)
    settle = settle_in_redis(stores.script, [settlement(key, request_id, now, completion=7)])
    assert_declared(await watched(stores.redis, monitor, settle), key.tenant_id)
    # Settled without a reservation (Redis lost it): usage added as is, same keys.
    lost = settle_in_redis(stores.script, [settlement(key, uuid.uuid4(), now, completion=3)])
    assert_declared(await watched(stores.redis, monitor, lost), key.tenant_id)


async def test_a_request_admitted_after_midnight_settles_on_its_own_day(
    stores: Stores, key: KeyRecord, monitor: Monitor
) -> None:
    """The log names 23:59:59.9, admission ran at 00:00:00.1: the reservation's day wins."""
    key = limited(key)
    midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    admitted_at = midnight.timestamp() + 0.1
    request_id = await records_admit(stores.redis, key, at=admitted_at)
    before = midnight - dt.timedelta(milliseconds=100)
    settle = settle_in_redis(stores.script, [settlement(key, request_id, before, completion=7)])
    seen = await watched(stores.redis, monitor, settle)
    assert seen.script_calls == 2  # answered "another day", then called with it
    assert_declared(seen, key.tenant_id)
    today = keyspace.scope_keys(key.tenant_id, key.key_id, day=_day(midnight), month="x")[3]
    yesterday = keyspace.scope_keys(key.tenant_id, key.key_id, day=_day(before), month="x")[3]
    assert int(await stores.redis.get(today) or 0) == 12  # the reservation replaced by 5 + 7
    assert await stores.redis.get(yesterday) is None
    assert await stores.redis.exists(keyspace.reservation(key.tenant_id, str(request_id))) == 0


async def test_the_sweep_declares_every_key(
    stores: Stores, key: KeyRecord, redis_url: str, monitor: Monitor
) -> None:
    """meterd's sweep settles an overdue reservation through the same script."""
    key = limited(key)
    await records_admit(stores.redis, key, at=time.time())
    # Overdue only for this sweeper (an hour ahead), never for the session stack's meterd.
    sweeper = Sweeper(
        stores.pool,
        stores.redis,
        stores.script,
        node="keyspace-test",
        grace_s=0,
        clock=lambda: time.time() + 3600,
    )
    seen = await watched(stores.redis, monitor, sweeper.sweep())
    assert_declared(seen, key.tenant_id)


def _day(at: dt.datetime) -> str:
    return f"{at.year:04d}{at.month:02d}{at.day:02d}"


async def records_admit(redis: aioredis.Redis, key: KeyRecord, *, at: float) -> uuid.UUID:
    """Admit one request at unix time `at` with a tenant whose counters load empty."""

    async def load_empty(rec: KeyRecord) -> None:
        keys, args = keyspace.load_call(rec.tenant_id, now_ms=0)
        await redis.eval(load_script(), len(keys), *keys, *args)

    limiter = Limiter(
        redis=redis, load_tenant=load_empty, lease_ttl_s=60, timeout_s=5, clock=lambda: at
    )
    request_id = uuid.uuid4()
    admission = await limiter.admit(key, request_id=str(request_id), reserve=100)
    assert admission.refusal is None
    return request_id


async def test_the_lease_release_declares_every_key(
    stores: Stores, key: KeyRecord, redis_url: str, monitor: Monitor
) -> None:
    """meterd's early lease release (release.lua) touches only the two lease sets it names."""
    key = limited(key)
    request_id = await records_admit(stores.redis, key, at=time.time())
    release = SettleScript(
        source=release_script(), redis_url=redis_url, redis=stores.redis, timeout_s=5
    )
    try:
        call = keyspace.release_call(
            tenant_id=key.tenant_id, key_id=key.key_id, request_id=str(request_id)
        )
        seen = await watched(stores.redis, monitor, release.run([call]))
    finally:
        await release.aclose()
    assert_declared(seen, key.tenant_id)
