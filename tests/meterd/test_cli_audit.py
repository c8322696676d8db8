"""`audit`, `usage` and `prune-prompts`: what operators see of meterd's tables."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from compose.local.cli_runner import cli_binary
from compose.local.processes import base_env
from compose.local.services import REPO_ROOT
from meterd.settle_script import SettleScript
from policyd.shared.tables import prompt_log, tenants
from tests.meterd.conftest import create_key
from tests.meterd.records import batch, exact, position, record, store

# The commands are plain click commands; run them as the CLI would, in a fresh process.


async def _cli(database_url: str, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(cli_binary()), command, *args],
        env=base_env({"NZ_DATABASE_URL": database_url, "COLUMNS": "200"}),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _json(database_url: str, command: str, *args: str) -> Any:
    done = await _cli(database_url, command, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def _tenant_name(engine: AsyncEngine, tenant_id: str) -> str:
    async with engine.connect() as conn:
        stmt = sa.select(tenants.c.name).where(tenants.c.id == tenant_id)
        return str((await conn.execute(stmt)).scalar_one())


async def test_audit_lists_filters_and_pages(
    engine: AsyncEngine,
    redis: aioredis.Redis,
    database_url: str,
    pool: asyncpg.Pool,
    script: SettleScript,
) -> None:
    """`audit --json` lists rows newest first, filtered by tenant/key/status/model, paged."""
    one, two = await create_key(engine), await create_key(engine)
    now = dt.datetime.now(dt.UTC).timestamp()
    records = [
        exact(one, 10, 5, ts=now - 30, model="llama3.2"),
        exact(one, 3, 2, ts=now - 20, model="qwen2.5-coder:7b", path="/v1/chat/completions"),
        exact(two, 7, 1, ts=now - 10),
        record(one, admitted=False, status=429, refusal="tokens_per_minute_exceeded", ts=now),
    ]
    await store(pool, script).settle(batch(records), resume=position(0))
    rows = await _json(database_url, "audit")
    assert [r["request_id"] for r in rows] == [str(r.event.request_id) for r in records[::-1]]
    first = rows[-1]
    assert first["tenant"] == await _tenant_name(engine, one.tenant_id)
    assert first["key_prefix"] == "nz_ab12cd34"
    assert (first["path"], first["status"], first["usage_source"]) == ("/api/chat", 200, "exact")
    assert (first["prompt_tokens"], first["completion_tokens"]) == (10, 5)
    assert rows[0]["refusal"] == "tokens_per_minute_exceeded"
    tenant = await _tenant_name(engine, two.tenant_id)
    assert len(await _json(database_url, "audit", "--tenant", tenant)) == 1
    assert len(await _json(database_url, "audit", "--status", "4xx")) == 1
    assert len(await _json(database_url, "audit", "--model", "qwen2.5-coder:7b")) == 1
    since = dt.datetime.fromtimestamp(now - 15, dt.UTC).isoformat()
    assert len(await _json(database_url, "audit", "--since", since)) == 2
    assert len(await _json(database_url, "audit", "--since", "1h")) == 4
    page = await _json(database_url, "audit", "--limit", "3", "--page", "2")
    assert [r["request_id"] for r in page] == [str(records[0].event.request_id)]
    table = await _cli(database_url, "audit")
    assert table.returncode == 0
    assert "/v1/chat/completions" in table.stdout


async def test_audit_rejects_unknown_tenant_in_one_line(database_url: str) -> None:
    """An unknown tenant is one readable error line and exit 1; a malformed filter value
    is one line and exit 2 (bad operator input)."""
    done = await _cli(database_url, "audit", "--tenant", "nobody")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: unknown tenant 'nobody'"
    bad = await _cli(database_url, "audit", "--status", "teapot")
    assert bad.returncode == 2
    assert "invalid status" in bad.stderr


async def test_usage_shows_settled_figures_per_day_and_month(
    engine: AsyncEngine,
    redis: aioredis.Redis,
    database_url: str,
    pool: asyncpg.Pool,
    script: SettleScript,
) -> None:
    """`usage` sums the ledger per UTC day or month, per tenant and key."""
    key = await create_key(engine)
    day = dt.datetime(2026, 11, 3, 12, tzinfo=dt.UTC).timestamp()
    records = [
        exact(key, 10, 5, ts=day),
        exact(key, 1, 1, ts=day + 86400),
        record(key, stream=True, size=5000, ts=day + 86400),
    ]
    await store(pool, script).settle(batch(records), resume=position(0))
    daily = (await _json(database_url, "usage", "--since", "2026-11-01"))["settled"]
    assert [(r["period"], r["requests"]) for r in daily] == [("2026-11-03", 1), ("2026-11-04", 2)]
    assert daily[0]["total_tokens"] == 15
    assert daily[1]["estimated_tokens"] == records[2].usage.total
    monthly = (await _json(database_url, "usage", "--by", "month"))["settled"]
    assert [(r["period"], r["requests"]) for r in monthly] == [("2026-11", 3)]


async def test_prune_prompts_deletes_only_expired(
    engine: AsyncEngine,
    redis: aioredis.Redis,
    database_url: str,
    pool: asyncpg.Pool,
    script: SettleScript,
) -> None:
    """`prune-prompts` removes prompts past their retention and reports how many."""
    key = await create_key(engine, prompt_logging=True, retention_days=1)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    records = [
        exact(key, 1, 1, prompt_log=True, req_body="old", ts=old.timestamp()),
        exact(key, 1, 1, prompt_log=True, req_body="fresh"),
    ]
    await store(pool, script).settle(batch(records), resume=position(0))
    assert await _json(database_url, "prune-prompts") == {"deleted": 1}
    async with engine.connect() as conn:
        assert (await conn.execute(sa.select(prompt_log.c.body))).scalars().all() == ["fresh"]
