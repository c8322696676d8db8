"""The session fixtures: shared servers, and the per-test reset of their state."""

from __future__ import annotations

import redis

from compose.local.services import PostgresServer, RedisServer, Service
from tests.support.state import flush_redis, reset_database

__all__: list[str] = []


def test_reset_database_empties_tables_but_keeps_alembic_version(
    postgres: Service[PostgresServer], database_url: str
) -> None:
    """reset_database truncates every public table except alembic_version."""
    server = postgres.launcher
    server.psql("CREATE TABLE IF NOT EXISTS scratch (n int); INSERT INTO scratch VALUES (1);")
    try:
        before = server.psql("SELECT count(*) FROM alembic_version;").strip()
        reset_database(server)
        assert server.psql("SELECT count(*) FROM scratch;").strip() == "0"
        assert server.psql("SELECT count(*) FROM alembic_version;").strip() == before == "1"
    finally:
        server.psql("DROP TABLE scratch;")


def test_database_url_points_at_the_migrated_schema(
    postgres: Service[PostgresServer], database_url: str
) -> None:
    """The database_url fixture is the app role's asyncpg URL after `alembic upgrade head`."""
    assert database_url == postgres.launcher.database_url
    assert database_url.startswith("postgresql+asyncpg://")
    tables = postgres.launcher.psql("SELECT tablename FROM pg_tables WHERE schemaname='public';")
    assert {"tenants", "api_keys", "alembic_version"} <= set(tables.split())


def test_flush_redis_drops_every_key(redis_server: Service[RedisServer]) -> None:
    """flush_redis leaves the session Redis with no keys in any database."""
    for db in (0, 3):
        client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.launcher.port}/{db}")
        client.set("k", "v")
        client.close()
    flush_redis(redis_server.launcher.url)
    client = redis.Redis.from_url(redis_server.launcher.url)
    try:
        assert client.info("keyspace") == {}
    finally:
        client.close()


def test_fresh_state_restarts_a_stopped_redis(redis_server: Service[RedisServer]) -> None:
    """A test may stop the shared Redis; the next test using it finds it running (part 1)."""
    redis_server.stop()
    assert not redis_server.running


def test_fresh_state_found_redis_running(redis_server: Service[RedisServer]) -> None:
    """A test may stop the shared Redis; the next test using it finds it running (part 2)."""
    assert redis_server.running
    client = redis.Redis.from_url(redis_server.launcher.url)
    try:
        assert client.ping()
    finally:
        client.close()
