"""The launchers start real servers that answer, stop by PID and restart on the same port."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from compose.local.services import (
    CaddyServer,
    PostgresServer,
    RedisServer,
    Service,
    StandinServer,
)

__all__: list[str] = []

_TRIVIAL_CADDYFILE = """\
{
\tadmin off
\tauto_https off
}

http://:{$NZ_HTTP_PORT} {
\tbind {$NZ_BIND}
\trespond "hello {$NZ_GREETING}" 200
}
"""


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A temp dir the postgres user can traverse (pytest's own tmp dirs are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="nz-harness-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def _whoami(database_url: str) -> str:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            query = text("SELECT current_user || '@' || current_database()")
            return str(await conn.scalar(query))
    finally:
        await engine.dispose()


async def test_postgres_starts_accepts_the_app_role_and_stops(reachable_dir: Path) -> None:
    """Postgres comes up with the app role and database, and stop() leaves no process."""
    service = Service(PostgresServer(base_dir=reachable_dir / "pg", user="app", database="appdb"))
    handle = service.start()
    try:
        assert service.launcher.database_url.startswith("postgresql+asyncpg://app:")
        assert await _whoami(service.launcher.database_url) == "app@appdb"
    finally:
        service.stop()
    assert not handle.running
    assert not handle.family()
    assert _port_closed(service.launcher.port)


def test_postgres_restart_keeps_data(reachable_dir: Path) -> None:
    """A restarted Postgres reuses its data dir: rows written before are still there."""
    service = Service(PostgresServer(base_dir=reachable_dir / "pg"))
    service.start()
    try:
        service.launcher.psql("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7);")
        service.restart()
        assert service.launcher.psql("SELECT n FROM kept;").strip() == "7"
    finally:
        service.stop()


def test_redis_stops_and_restarts_empty_on_the_same_port(tmp_path: Path) -> None:
    """Redis refuses connections once stopped and comes back empty on the same port."""
    service = Service(RedisServer(data_dir=tmp_path / "redis"))
    service.start()
    client = redis.Redis.from_url(service.launcher.url, socket_timeout=2.0)
    try:
        client.set("k", "v")
        service.stop()
        assert _port_closed(service.launcher.port)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        service.start()
        assert client.ping()
        assert client.get("k") is None
    finally:
        client.close()
        service.stop()
    assert not service.running


def test_caddy_serves_a_caddyfile_with_env_settings(tmp_path: Path) -> None:
    """Caddy runs a Caddyfile whose placeholders come from the settings passed in."""
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(_TRIVIAL_CADDYFILE)
    service = Service(
        CaddyServer(
            caddyfile=caddyfile,
            log_dir=tmp_path / "log",
            state_dir=tmp_path / "caddy",
            settings={"NZ_GREETING": "gateway"},
        )
    )
    handle = service.start()
    try:
        reply = httpx.get(service.launcher.url, timeout=5.0)
        assert (reply.status_code, reply.text) == (200, "hello gateway")
    finally:
        service.stop()
    assert not handle.family()
    assert _port_closed(service.launcher.port)


def test_standin_answers_version_and_stops(tmp_path: Path) -> None:
    """The stand-in starts on a free port, answers GET /api/version and stops by PID."""
    service = Service(StandinServer(log_dir=tmp_path))
    handle = service.start()
    try:
        reply = httpx.get(f"{service.launcher.url}/api/version", timeout=5.0)
        assert reply.status_code == 200
        assert "version" in reply.json()
    finally:
        service.stop()
    assert not handle.family()
