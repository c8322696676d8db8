"""meterd's Postgres connections: a small asyncpg pool, and which of its errors are outages.

meterd talks to asyncpg directly. Its statements are constant texts over arrays
(`writes.py`), so after the first batch asyncpg's per-connection cache of prepared
statements serves every one, and a batch costs a handful of round trips instead of
SQLAlchemy building, compiling and caching statements for each (docs/metering.md).
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.dialects.postgresql.asyncpg import dialect as _asyncpg_dialect
from sqlalchemy.engine import make_url

__all__ = ["PG_OUTAGES", "connect_kwargs", "create_pool", "is_pg_outage"]

_CONNECT_TIMEOUT_S: Final = 5.0
#: Concurrent users: the meter loop, the sweep, the prune loop (the calibration reload
#: runs inside the meter loop).
_MAX_CONNECTIONS: Final = 3
# Options of SQLAlchemy's asyncpg dialect that asyncpg itself does not take.
_SQLALCHEMY_ONLY: Final = ("prepared_statement_cache_size", "prepared_statement_name_func")

#: asyncpg's errors that mean "Postgres is unavailable right now" rather than a bug:
#: the connection broke or could not be made (class 08), the server is shutting down,
#: starting up or cancelled the statement (57), lacks resources (53), failed on I/O
#: (58), or rolled the transaction back for a deadlock or serialization failure (40).
#: InternalClientError too: when Postgres shuts down it tells idle connections so
#: (57P01) before closing them, and a pooled connection taken in between refuses its
#: next statement with "cannot switch to state …; another operation … is in progress"
#: (seen in CI during a restart). meterd never shares a connection between tasks, so
#: here it means that dying connection; the pool replaces it once the close arrives.
PG_OUTAGES: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def is_pg_outage(exc: BaseException) -> bool:
    """Whether `exc` from asyncpg is Postgres being unavailable (retry) rather than a bug."""
    # A bad connection option is a configuration error, not something that passes.
    return isinstance(exc, PG_OUTAGES) and not isinstance(
        exc, asyncpg.exceptions.ClientConfigurationError
    )


def connect_kwargs(database_url: str) -> dict[str, Any]:
    """asyncpg.connect() arguments for NZ_DATABASE_URL, read as SQLAlchemy reads it.

    policyd, the CLI and Alembic take the same URL through SQLAlchemy, so its options
    (`?ssl=require`, `?host=/socket/dir`, ...) mean the same here.
    """
    dialect = _asyncpg_dialect()  # type: ignore[no-untyped-call]
    args, kwargs = dialect.create_connect_args(make_url(database_url))  # type: ignore[no-untyped-call]
    assert not args
    for name in _SQLALCHEMY_ONLY:
        kwargs.pop(name, None)
    return dict(kwargs)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset on release (asyncpg still rolls back an open transaction).

    meterd sets no session state, and the default reset costs a round trip per batch.
    """


async def create_pool(database_url: str) -> asyncpg.Pool:
    """A pool that connects on first use and replaces broken connections by itself."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        min_size=0,
        max_size=_MAX_CONNECTIONS,
        timeout=_CONNECT_TIMEOUT_S,
        reset=_keep_session,
        **connect_kwargs(database_url),
    )
    return pool
