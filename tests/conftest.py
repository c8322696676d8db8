"""Session-wide real services: one Postgres, Redis and stand-in per test run.

Every part runs from local binaries on free 127.0.0.1 ports under one run directory and
is stopped by PID when the session ends, also after failures or SIGTERM. A missing binary
is an error that says what to install; nothing is skipped. Tests that touch Postgres or
Redis (directly or through `stack`) start from empty tables and an empty Redis.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Final, TypeVar

import pytest

from compose.local.parts import Stack, StackConfig, run_migrations
from compose.local.services import (
    Launcher,
    PostgresServer,
    RedisServer,
    Service,
    StandinServer,
)
from tests.support.state import flush_redis, reset_database

__all__: list[str] = []

_L = TypeVar("_L", bound=Launcher)
_RUN_DIR: Final = pytest.StashKey[Path]()
_RUN_DIR_PREFIX: Final = "nz-tests-"
_KEEP_FAILED_RUN_DIRS_S: Final = 24 * 3600
_DB_FIXTURES: Final = frozenset({"postgres", "database_url", "stack"})
_REDIS_FIXTURES: Final = frozenset({"redis_server", "redis_url", "stack"})


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into the Ctrl-C path, so session finalizers stop every server we started.
    raise KeyboardInterrupt(f"received signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop our servers also when the test run itself is terminated."""
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Point at the service logs when they were kept because something failed."""
    run_dir = terminalreporter.config.stash.get(_RUN_DIR, None)
    if run_dir is not None and run_dir.exists():
        terminalreporter.write_line(f"service logs kept in {run_dir / 'log'}")


def _prune_kept_run_dirs() -> None:
    # Failed sessions keep their logs; a day later nobody is reading them any more.
    cutoff = time.time() - _KEEP_FAILED_RUN_DIRS_S
    for old in Path(tempfile.gettempdir()).glob(f"{_RUN_DIR_PREFIX}*"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)


def _running(service: Service[_L]) -> Iterator[Service[_L]]:
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def run_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory for this session's servers and logs; kept for a day if a test failed."""
    _prune_kept_run_dirs()
    path = Path(tempfile.mkdtemp(prefix=_RUN_DIR_PREFIX))
    # Traversable, not listable: as root, Postgres runs as `postgres` and must reach its dir.
    path.chmod(0o711)
    request.config.stash[_RUN_DIR] = path
    yield path
    if request.session.testsfailed == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(run_dir: Path) -> Iterator[Service[PostgresServer]]:
    """A running PostgreSQL with role and database `neuronetz` (schema not yet migrated)."""
    yield from _running(Service(PostgresServer(base_dir=run_dir / "pg", log_dir=run_dir / "log")))


@pytest.fixture(scope="session")
def database_url(postgres: Service[PostgresServer], run_dir: Path) -> str:
    """NZ_DATABASE_URL of the session database after `alembic upgrade head`."""
    url = postgres.launcher.database_url
    run_migrations(database_url=url, log_path=run_dir / "log" / "alembic.log")
    return url


@pytest.fixture(scope="session")
def redis_server(run_dir: Path) -> Iterator[Service[RedisServer]]:
    """A running redis-server without persistence (restartable by tests)."""
    yield from _running(Service(RedisServer(data_dir=run_dir / "redis", log_dir=run_dir / "log")))


@pytest.fixture(scope="session")
def redis_url(redis_server: Service[RedisServer]) -> str:
    """NZ_REDIS_URL of the session Redis."""
    return redis_server.launcher.url


@pytest.fixture(scope="session")
def standin(run_dir: Path) -> Iterator[Service[StandinServer]]:
    """The Ollama stand-in, fast (200 tokens/s, 20 ms to the first token)."""
    yield from _running(Service(StandinServer(log_dir=run_dir / "log")))


@pytest.fixture(scope="session")
def stack(
    run_dir: Path,
    postgres: Service[PostgresServer],
    database_url: str,
    redis_server: Service[RedisServer],
    standin: Service[StandinServer],
) -> Iterator[Stack]:
    """The whole gateway (Caddy, policyd) on the session Postgres, Redis and stand-in."""
    built = Stack(
        StackConfig(base_dir=run_dir / "stack"),
        postgres=postgres,
        redis=redis_server,
        standin=standin,
    )
    with built:
        yield built


@pytest.fixture(autouse=True)
def _fresh_state(request: pytest.FixtureRequest) -> None:
    """Empty tables and Redis for every test that uses them; restart parts a test stopped."""
    used = set(request.fixturenames)
    if "stack" in used:
        request.getfixturevalue("stack").ensure_running()
    if used & _DB_FIXTURES:
        service: Service[PostgresServer] = request.getfixturevalue("postgres")
        service.start()
        reset_database(service.launcher)
    if used & _REDIS_FIXTURES:
        redis_service: Service[RedisServer] = request.getfixturevalue("redis_server")
        redis_service.start()
        flush_redis(redis_service.launcher.url)
