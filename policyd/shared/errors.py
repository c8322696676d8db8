"""The error types both daemons and the CLI share, and how a store error is classified.

Every error the gateway raises on purpose derives from `GatewayError`. A store that
cannot answer right now (`StoreUnavailable`, an outage) and a store that answered with
an error no retry will fix (`StoreFault`: a Lua script error, a wrong type, bad SQL) are
kept apart the same way everywhere: policyd refuses the first with 503 and "retry in
1 s" and the second with 500 and a loud log; meterd waits out the first and stops on
the second.
"""

from __future__ import annotations

from typing import Final

import redis.exceptions as redis_errors
from sqlalchemy import exc as sa_errors

__all__ = [
    "REDIS_OUTAGES",
    "GatewayError",
    "SettingsError",
    "StoreFault",
    "StoreUnavailable",
    "is_redis_outage",
    "redis_failure",
    "sql_failure",
]


class GatewayError(Exception):
    """Root of every error neuronetz-gateway raises on purpose."""


class SettingsError(GatewayError):
    """The environment does not describe a usable configuration."""


class StoreUnavailable(GatewayError):
    """Redis or Postgres could not answer in time: refuse (503), never allow; retry later."""


class StoreFault(GatewayError):
    """A store answered with an error a retry will not fix: a bug (500, logged loudly)."""


#: Redis errors that mean "unavailable right now" (a restart, a failover, a full
#: server), as opposed to an error reply that a retry would only repeat.
REDIS_OUTAGES: Final = (
    redis_errors.ConnectionError,  # AuthenticationError too: a password being rotated
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,  # a replica promoted, or the old primary after failover
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.OutOfMemoryError,
)

# SQLAlchemy errors that only a bug produces; everything else from the database layer
# (connection, pool timeout, shutdown) is an outage.
_SQL_FAULTS: Final = (
    sa_errors.ProgrammingError,
    sa_errors.DataError,
    sa_errors.IntegrityError,
    sa_errors.ArgumentError,
    sa_errors.CompileError,
)


def is_redis_outage(exc: BaseException) -> bool:
    """Whether `exc` from a Redis client means "unavailable now" rather than a bug."""
    return isinstance(exc, (*REDIS_OUTAGES, OSError, TimeoutError))


def redis_failure(exc: BaseException) -> GatewayError:
    """The error to raise for a Redis failure: an outage or a fault."""
    name = type(exc).__name__
    if is_redis_outage(exc):
        return StoreUnavailable(f"redis: {name}")
    return StoreFault(f"redis: {name}: {exc}")


def sql_failure(exc: BaseException) -> GatewayError:
    """The error to raise for a Postgres failure seen through SQLAlchemy."""
    name = type(exc).__name__
    if isinstance(exc, _SQL_FAULTS):
        return StoreFault(f"postgres: {name}")
    return StoreUnavailable(f"postgres: {name}")
