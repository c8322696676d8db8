"""What every CLI command shares: settings, store access, error lines, JSON output.

Errors are one line on stderr and a non-zero exit code; no traceback, no connection
string with its password, never a key.

Settings come from the NZ_* environment. When no NZ_* variable is set and the working
directory is inside a checkout whose local stack is up (`make up` wrote `.run/cli.env`),
that file is used instead, and one line on stderr says so: the operator's first command
after `make up` just works, and an explicit environment always wins.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import re
import shlex
import stat
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import attrs
import redis.asyncio as aioredis
import rich_click as click
from redis.exceptions import RedisError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from policyd.admin import accounts as admin
from policyd.shared.envreader import EnvReader
from policyd.shared.sentinel import SentinelSettings, read_sentinels, redis_client

__all__ = [
    "EXIT_BAD_INPUT",
    "LOCAL_ENV",
    "bad_input",
    "fail",
    "has_setting",
    "iso",
    "json_option",
    "local_env_file",
    "need_redis",
    "one_line",
    "parse_when",
    "print_json",
    "read_env_file",
    "run",
    "settings_env",
]

_T = TypeVar("_T")
_EXIT_ERROR: Final = 1
#: Where `make up` writes the local stack's settings, relative to the checkout.
LOCAL_ENV: Final = Path(".run") / "cli.env"
#: Exit code of a value the operator gave that cannot be used (Click's usage errors too).
EXIT_BAD_INPUT: Final = 2

Action = Callable[[AsyncEngine, aioredis.Redis | None], Awaitable[_T]]

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def one_line(message: str) -> str:
    """`message` on one line: an operator's value may hold line breaks of its own."""
    return " ".join(message.split())


def fail(message: str, *, code: int = _EXIT_ERROR) -> NoReturn:
    """Print one error line and exit non-zero (`EXIT_BAD_INPUT` for a bad operator value)."""
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


def bad_input(message: str) -> NoReturn:
    """A value the operator gave cannot be used: one line, exit 2."""
    fail(message, code=EXIT_BAD_INPUT)


def local_env_file(start: Path) -> Path | None:
    """`.run/cli.env` of the checkout around `start` (the nearest pyproject.toml), if any."""
    for directory in (start, *start.parents):
        if (directory / "pyproject.toml").is_file():
            candidate = directory / LOCAL_ENV
            return candidate if candidate.is_file() else None
    return None


def read_env_file(path: Path) -> dict[str, str]:
    """The NZ_* assignments of a file `make up` wrote (`NAME=<shell-quoted value>` lines)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, raw = line.partition("=")
        if sep and name.startswith("NZ_") and name.isidentifier():
            values[name] = "".join(shlex.split(raw))
    return values


def _trusted(path: Path) -> bool:
    # It names the database the CLI writes to: only a file of ours that nobody else can
    # change (make up writes it 0600) may redirect us.
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


@functools.cache
def settings_env() -> Mapping[str, str]:
    """The settings the CLI runs with: the NZ_* environment, else the local stack's file."""
    if any(name.startswith("NZ_") for name in os.environ):
        return os.environ
    found = local_env_file(Path.cwd())
    if found is None:
        return os.environ
    if not _trusted(found):
        click.echo(f"note: ignoring {found}: not yours, or writable by others", err=True)
        return os.environ
    try:
        values = read_env_file(found)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {found}: {exc}")
    click.echo(f"note: no NZ_* variables set, so using the local stack's {found}", err=True)
    return values


def has_setting(name: str) -> bool:
    """Whether `name` is set (to something) in the CLI's settings."""
    return bool(settings_env().get(name, "").strip())


def _env(name: str) -> str:
    value = settings_env().get(name, "").strip()
    if not value:
        fail(
            f"{name} is not set (set the NZ_* variables, or run inside a checkout after "
            "`make up`: with no NZ_* set, its .run/cli.env is used)"
        )
    return value


def _database_target(url: str) -> str:
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "the configured database"
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"


@contextmanager
def _store_errors(url: str) -> Iterator[None]:
    """Turn store failures into one readable line (without credentials)."""
    try:
        yield
    except admin.InvalidInput as exc:
        bad_input(str(exc))
    except admin.AdminError as exc:
        fail(str(exc))
    except (SQLAlchemyError, OSError) as exc:
        cause = getattr(exc, "orig", None) or exc
        fail(f"cannot use the database at {_database_target(url)} ({type(cause).__name__})")
    except RedisError as exc:
        fail(f"cannot reach Redis ({type(exc).__name__})")


def _sentinels() -> SentinelSettings | None:
    read = EnvReader(os.environ)
    found = read_sentinels(read)
    if read.errors:
        fail("; ".join(read.errors))
    return found


def run(action: Action[_T], *, redis: bool) -> _T:
    """Run `action` with an engine (and a Redis client if `redis`), then close them."""
    url = _env("NZ_DATABASE_URL")
    redis_url = _env("NZ_REDIS_URL") if redis else None

    async def go() -> _T:
        try:
            engine = create_async_engine(url, pool_size=1, connect_args={"timeout": 5})
        except ArgumentError:
            fail("NZ_DATABASE_URL is not a valid database URL")
        client = (
            redis_client(redis_url, _sentinels(), socket_timeout=5, socket_connect_timeout=5)
            if redis_url
            else None
        )
        try:
            return await action(engine, client)
        finally:
            if client is not None:
                await client.aclose()
            await engine.dispose()

    with _store_errors(url):
        return asyncio.run(go())
    raise AssertionError("unreachable")  # pragma: no cover


def need_redis(client: aioredis.Redis | None) -> aioredis.Redis:
    """The Redis client of a command declared with `redis=True`."""
    assert client is not None
    return client


def iso(value: dt.datetime | None) -> str | None:
    """UTC ISO-8601 with a `Z`, or None."""
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value else None


def _jsonable(value: Any) -> Any:
    if attrs.has(type(value)):
        return {k: _jsonable(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, dt.datetime):
        return iso(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "hex") and type(value).__name__ == "UUID":
        return str(value)
    return value


def print_json(value: Any) -> None:
    """Print `value` (attrs classes, lists, datetimes) as indented JSON."""
    click.echo(json.dumps(_jsonable(value), indent=2))


#: A duration: at most 12 digits (longer ones are no duration anyone means).
_DURATION: Final = re.compile(r"^(\d{1,12})([smhdw])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DATE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_when(
    text: str, *, ahead: bool, now: dt.datetime | None = None, within_days: int = 36500
) -> dt.datetime | None:
    """A moment as operators write it; None when it cannot be read or lies further than
    `within_days` from now (either way: a moment the stores hold, never an overflow).

    `30d`, `12h`, `2w`, `45m`, `10s` count from now, forwards when `ahead` (an expiry),
    else backwards (`--since 24h`). A date is the end of that day (UTC) looking ahead, so
    a key expiring on a date works through it, and its start looking back. An ISO
    datetime without a zone is UTC.
    """
    value = text.strip()
    current = now or dt.datetime.now(dt.UTC)
    reach = dt.timedelta(days=within_days)
    match = _DURATION.fullmatch(value)
    if match:
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if seconds > reach.total_seconds():
            return None
        span = dt.timedelta(seconds=seconds)
        return current + span if ahead else current - span
    try:
        if _DATE.fullmatch(value):
            edge = dt.time.max if ahead else dt.time()
            moment = dt.datetime.combine(dt.date.fromisoformat(value), edge, tzinfo=dt.UTC)
        else:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            moment = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        if abs(moment - current) > reach:
            return None
        return moment.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        return None
