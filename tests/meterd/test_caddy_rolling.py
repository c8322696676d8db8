"""The real Caddy writes and rolls the log; meterd, running or stopped, misses no line."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from compose.local.processes import free_port
from compose.local.services import CaddyServer, Service
from policyd.shared.tables import audit_log
from tests.meterd.process import Meterd

# Caddy's rolling with the gateway's settings, but 1 MiB files (the smallest it allows).
_CADDYFILE = """\
{
\tadmin off
\tauto_https off
}
http://{$METERD_TEST_LISTEN} {
\tbind {$METERD_TEST_LISTEN}
\tlog {
\t\toutput file {$NZ_ACCESS_LOG} {
\t\t\troll_size 1MiB
\t\t\troll_uncompressed
\t\t\troll_keep 20
\t\t\tmode 0640
\t\t}
\t\tformat json
\t}
\troute {
\t\theader >X-Request-Id {http.request.uuid}
\t\trespond "ok" 200
\t}
}
"""


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[CaddyServer]:
    """Caddy writing tmp_path/logs/access.log, rolled every MiB."""
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(_CADDYFILE)
    port = free_port()
    launcher = CaddyServer(
        caddyfile=caddyfile,
        log_dir=tmp_path / "caddy-log",
        state_dir=tmp_path / "caddy-state",
        port=port,
        settings={
            "NZ_ACCESS_LOG": str(tmp_path / "logs" / "access.log"),
            "METERD_TEST_LISTEN": f"127.0.0.1:{port}",
        },
    )
    service = Service(launcher)
    service.start()
    yield launcher
    service.stop()


def _send(client: httpx.Client, url: str, n: int) -> list[str]:
    # An 8 KiB header makes each line ~8 KiB: a roll every ~125 requests.
    agent = "load-test/" + "x" * 8192
    ids = []
    for _ in range(n):
        reply = client.get(f"{url}/api/tags", headers={"User-Agent": agent})
        assert reply.status_code == 200
        ids.append(reply.headers["X-Request-Id"])
    return ids


async def _audited(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return [str(v) for v in (await conn.execute(sa.select(audit_log.c.request_id))).scalars()]


async def test_rolls_while_running_and_while_stopped_lose_nothing(
    caddy: CaddyServer, engine: AsyncEngine, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """450 requests, a roll while meterd runs, two while it is stopped: 450 rows, once each."""
    meterd = Meterd(
        database_url=database_url,
        redis_url=redis_url,
        access_log=tmp_path / "logs" / "access.log",
        log_path=tmp_path / "meterd.log",
    )
    ids: list[str] = []
    try:
        with httpx.Client(timeout=10) as client:
            meterd.start()
            ids += await asyncio.to_thread(_send, client, caddy.url, 200)
            deadline = time.monotonic() + 30
            while len(await _audited(engine)) < 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            assert meterd.terminate() == 0
            ids += await asyncio.to_thread(_send, client, caddy.url, 250)
        rolled = sorted((tmp_path / "logs").glob("access-*.log"))
        assert len(rolled) >= 3, rolled
        meterd.start()
        deadline = time.monotonic() + 30
        while len(await _audited(engine)) < len(ids):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert meterd.terminate() == 0
    finally:
        meterd.stop()
    audited = await _audited(engine)
    assert sorted(audited) == sorted(ids)
    assert all(uuid.UUID(i) for i in audited)
