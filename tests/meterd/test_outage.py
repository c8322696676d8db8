"""is_outage: which errors pause settlement (retried) and which stop meterd (bugs)."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import pytest
import redis.exceptions as redis_errors

from meterd.daemon import is_outage


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.InterfaceError("connection is closed"),
        # A pooled connection Postgres told it is shutting down, taken before it closed.
        asyncpg.InternalClientError(
            "cannot switch to state 11; another operation (2) is in progress"
        ),
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
        redis_errors.ConnectionError("redis is gone"),
        redis_errors.BusyLoadingError("LOADING"),
    ],
)
def test_postgres_unavailable_is_an_outage(error: BaseException) -> None:
    """asyncpg's errors for a Postgres that is down, restarting or overloaded are retried."""
    assert is_outage(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        asyncpg.exceptions.UndefinedColumnError("no such column"),
        asyncpg.exceptions.DataError("invalid input"),
        asyncpg.exceptions.ClientConfigurationError("bad option"),
        redis_errors.ResponseError("ERR wrong number of arguments"),
        ValueError("a bug"),
    ],
)
def test_other_postgres_errors_are_bugs(error: BaseException) -> None:
    """Errors Postgres would repeat on every retry stop the daemon instead."""
    assert not is_outage(error)
