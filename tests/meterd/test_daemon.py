"""The meterd process: SIGKILL at any moment, SIGTERM drains, heartbeat, bad lines."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from compose.local.services import PostgresServer, RedisServer, Service
from policyd.authz.records import KeyRecord
from policyd.shared.tables import audit_log, meter_checkpoints, usage_ledger
from tests.meterd.conftest import create_key, leases, limiter, spent
from tests.meterd.lines import caddy_line, encode
from tests.meterd.process import Meterd
from tests.meterd.rolling import RollingWriter


@pytest.fixture
def meterd(tmp_path: Path, database_url: str, redis_url: str) -> Iterator[Meterd]:
    """A meterd node (not started) reading tmp_path/logs/access.log."""
    node = Meterd(
        database_url=database_url,
        redis_url=redis_url,
        access_log=tmp_path / "logs" / "access.log",
        log_path=tmp_path / "meterd.log",
        settings={"NZ_METERD_BATCH_LINES": "40", "NZ_METERD_HEARTBEAT_TTL_S": "3"},
    )
    (tmp_path / "logs").mkdir()
    yield node
    node.stop()


async def _count(engine: AsyncEngine, table: sa.Table = audit_log) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def _wait_rows(engine: AsyncEngine, n: int, *, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while (found := await _count(engine)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {found} of {n} audit rows after {within_s}s")
        await asyncio.sleep(0.1)


def _line(key: KeyRecord, request_id: str, n: int) -> bytes:
    """A mix: exact non-streamed, estimated streamed, and refused requests."""
    if n % 10 == 9:
        return encode(
            caddy_line(
                request_id=request_id,
                admitted=False,
                status=429,
                refusal="requests_per_minute_exceeded",
            )
        )
    if n % 3 == 0:
        return encode(
            caddy_line(
                request_id=request_id,
                key_id=key.key_id,
                tenant_id=key.tenant_id,
                stream=True,
                size=2000 + 7 * n,
                bytes_read=100 + n,
            )
        )
    body = json.dumps(
        {
            "message": {"content": "ok"},
            "done": True,
            "prompt_eval_count": 10 + n % 17,
            "eval_count": 1 + n % 23,
        }
    )
    return encode(
        caddy_line(
            request_id=request_id,
            key_id=key.key_id,
            tenant_id=key.tenant_id,
            stream=False,
            resp_body=body,
        )
    )


def _starts(meterd: Meterd) -> int:
    if not meterd.log_path.exists():
        return 0
    return meterd.log_path.read_text(errors="replace").count("meterd starting")


async def _wait_started(meterd: Meterd, starts: int, *, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while _starts(meterd) < starts:
        assert time.monotonic() < deadline, "meterd never reported starting"
        await asyncio.sleep(0.05)


async def _audited_usage(engine: AsyncEngine) -> tuple[int, int]:
    stmt = sa.select(
        sa.func.count(audit_log.c.key_id),
        sa.func.coalesce(sa.func.sum(audit_log.c.prompt_tokens + audit_log.c.completion_tokens), 0),
    )
    async with engine.connect() as conn:
        row = (await conn.execute(stmt)).one()
    return int(row[0]), int(row[1])


async def test_sigkill_at_any_moment_loses_and_duplicates_nothing(
    meterd: Meterd, engine: AsyncEngine, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Killed -9 six times during 600 lines with rolls: every row once, budgets match."""
    key = await create_key(engine)
    total = 600
    ids = [str(uuid.uuid4()) for _ in range(total)]
    admit = limiter(redis)
    for n, request_id in enumerate(ids):
        if n % 10 != 9:
            assert (await admit.admit(key, request_id=request_id, reserve=50)).refusal is None
    log = RollingWriter(tmp_path / "logs" / "access.log")

    def write() -> None:
        for n, request_id in enumerate(ids):
            log.line(_line(key, request_id, n))
            if n % 150 == 149:
                log.roll()
            time.sleep(0.01)

    writer = threading.Thread(target=write)
    writer.start()
    rng = random.Random(4)
    seen: list[int] = []
    try:
        for _ in range(6):
            before = await _count(engine)
            meterd.start()
            # Kill once it is settling (startup time varies with the machine's load).
            await _wait_rows(engine, min(before + 1, total))
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            meterd.kill()
            seen.append(await _count(engine))
        starts = _starts(meterd)
        meterd.start()
        writer.join()
        await _wait_rows(engine, total)
        # Stop it only once it is running (a SIGTERM during its imports is a plain kill).
        await _wait_started(meterd, starts + 1)
        assert meterd.terminate() == 0
    finally:
        writer.join()
        log.close()
    assert len(set(seen)) >= 4, f"kills did not land mid-run: {seen}"
    assert await _count(engine) == total
    admitted, used = await _audited_usage(engine)
    assert admitted == total - total // 10
    async with engine.connect() as conn:
        ledger = (await conn.execute(sa.select(sa.func.sum(usage_ledger.c.requests)))).scalar()
    assert ledger == admitted
    assert await spent(redis, key) == used
    assert await leases(redis, key) == 0


async def test_sigterm_drains_what_was_logged(
    meterd: Meterd, engine: AsyncEngine, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGTERM mid-backlog: meterd settles every line already in the log, then exits 0."""
    key = await create_key(engine)
    path = tmp_path / "logs" / "access.log"
    path.write_bytes(b"".join(_line(key, str(uuid.uuid4()), n) + b"\n" for n in range(400)))
    meterd.start()
    await _wait_rows(engine, 1)
    assert meterd.terminate() == 0
    assert await _count(engine) == 400
    async with engine.connect() as conn:
        offset = (await conn.execute(sa.select(meter_checkpoints.c.byte_offset))).scalar_one()
    assert offset == path.stat().st_size


async def test_check_follows_the_heartbeat(meterd: Meterd, engine: AsyncEngine) -> None:
    """`meterd --check` is 0 while the daemon runs and 1 once its heartbeat is stale."""
    assert meterd.check().returncode == 1
    meterd.start()
    deadline = time.monotonic() + 20
    while (done := meterd.check()).returncode != 0:
        assert time.monotonic() < deadline, done.stderr
        await asyncio.sleep(0.2)
    figures = json.loads(done.stdout)
    assert figures["state"] == "ok"
    assert figures["lag_bytes"] == 0
    assert meterd.terminate() == 0
    await asyncio.sleep(3.5)
    assert meterd.check().returncode == 1


_BAD = [
    b"",
    b"garbage",
    b'{"truncated":',
    b"[1,2,3]",
    b'{"uuid":"nope","ts":1,"status":200}',
    b"\xff\xfe\x00",
    encode(caddy_line(extra={"status": "teapot"})),
    b"{" * 5000,
]


async def test_bad_lines_are_counted_and_skipped(
    meterd: Meterd, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Malformed lines between good ones are counted; the good ones all settle; no crash."""
    key = await create_key(engine)
    good = [_line(key, str(uuid.uuid4()), n) for n in range(20)]
    probe = encode(caddy_line(admitted=False, path="/healthz", method="GET"))
    lines = [item for pair in zip(good, _BAD * 3, strict=False) for item in pair] + [probe]
    (tmp_path / "logs" / "access.log").write_bytes(b"\n".join(lines) + b"\n")
    meterd.start()
    await _wait_rows(engine, len(good))
    assert meterd.terminate() == 0
    assert await _count(engine) == len(good)  # the probe is not audited
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(meter_checkpoints))).one()
    assert row.bad_lines == sum(1 for line in lines if line in _BAD)
    assert row.lines == len(lines)
    assert "skipping bad log line" in meterd.log_path.read_text()
    assert "garbage" not in meterd.log_path.read_text()


async def test_redis_outage_pauses_then_catches_up(
    meterd: Meterd,
    engine: AsyncEngine,
    redis_server: Service[RedisServer],
    tmp_path: Path,
) -> None:
    """With Redis down meterd retries without losing lines, and catches up when it is back."""
    key = await create_key(engine)
    log = RollingWriter(tmp_path / "logs" / "access.log")
    meterd.start()
    log.line(_line(key, str(uuid.uuid4()), 1))
    await _wait_rows(engine, 1)
    redis_server.stop()
    try:
        for n in range(2, 40):
            log.line(_line(key, str(uuid.uuid4()), n))
        await asyncio.sleep(2.0)
        assert "retrying" in meterd.log_path.read_text()
    finally:
        redis_server.start()
    await _wait_rows(engine, 39)
    deadline = time.monotonic() + 20
    while (done := meterd.check()).returncode != 0 or json.loads(done.stdout)["lag_bytes"]:
        assert time.monotonic() < deadline, done.stderr
        await asyncio.sleep(0.2)
    assert meterd.terminate() == 0
    log.close()


async def test_postgres_restart_pauses_then_settles_everything_once(
    meterd: Meterd,
    engine: AsyncEngine,
    redis: aioredis.Redis,
    postgres: Service[PostgresServer],
    tmp_path: Path,
) -> None:
    """Postgres stopped mid-run and restarted: meterd retries, then settles each line once."""
    key = await create_key(engine)
    ids = [str(uuid.uuid4()) for _ in range(60)]
    admit = limiter(redis)
    for n, request_id in enumerate(ids):
        if n % 10 != 9:
            assert (await admit.admit(key, request_id=request_id, reserve=50)).refusal is None
    log = RollingWriter(tmp_path / "logs" / "access.log")
    meterd.start()
    for n in range(20):
        log.line(_line(key, ids[n], n))
    await _wait_rows(engine, 20)
    postgres.stop()
    try:
        for n in range(20, 60):
            log.line(_line(key, ids[n], n))
        await asyncio.sleep(2.0)
        assert "retrying" in meterd.log_path.read_text()
    finally:
        postgres.start()
        await engine.dispose()  # its connections ended with the old server
    await _wait_rows(engine, 60)
    await _wait_started(meterd, 1)
    assert meterd.terminate() == 0
    log.close()
    assert await _count(engine) == 60
    admitted, used = await _audited_usage(engine)
    assert admitted == 54
    async with engine.connect() as conn:
        ledger = (await conn.execute(sa.select(sa.func.sum(usage_ledger.c.requests)))).scalar()
    assert ledger == admitted
    assert await spent(redis, key) == used
    assert await leases(redis, key) == 0
