"""Reset the shared Postgres and Redis between tests.

The schema is built once per session by `alembic upgrade head`; between tests only the
rows go. Truncating every table in `public` (except alembic's own) means new tables
need no change here.
"""

from __future__ import annotations

import time
from typing import Final

import redis

from compose.local.services import PostgresServer

__all__ = ["flush_redis", "reset_database"]

_TRUNCATE_ALL: Final = """
DO $$
DECLARE tables text;
BEGIN
    SELECT string_agg(format('%I.%I', schemaname, tablename), ', ')
      INTO tables
      FROM pg_tables
     WHERE schemaname = 'public' AND tablename <> 'alembic_version';
    IF tables IS NOT NULL THEN
        EXECUTE 'TRUNCATE ' || tables || ' RESTART IDENTITY CASCADE';
    END IF;
END
$$;
"""


def reset_database(server: PostgresServer, *, attempts: int = 5) -> None:
    """Empty every table in the public schema except alembic_version.

    meterd may be writing while a test starts (it runs in the stack); TRUNCATE then can
    lose a deadlock against its transaction, which Postgres resolves by failing one side.
    Trying again is all it takes.
    """
    for attempt in range(attempts):
        try:
            server.psql(_TRUNCATE_ALL)
            return
        except RuntimeError as exc:
            if "deadlock detected" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def flush_redis(url: str) -> None:
    """Drop every key in every Redis database of the server at `url`."""
    client = redis.Redis.from_url(url, socket_timeout=5.0)
    try:
        client.flushall()
    finally:
        client.close()
