"""`neuronetz-gateway`: the operator CLI for tenants and keys.

Every command takes `--json`. Errors are one line on stderr and a non-zero exit code;
no traceback, no connection string with its password, never a key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, NoReturn, TypeVar

import attrs
import redis.asyncio as aioredis
import rich_click as click
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from policyd import admin

__all__ = ["main"]

_T = TypeVar("_T")
_DURATION: Final = re.compile(r"^(\d+)([smhdw])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_EXIT_ERROR: Final = 1


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(_EXIT_ERROR)


def _env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        _fail(f"{name} is not set")
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
    except admin.AdminError as exc:
        _fail(str(exc))
    except (SQLAlchemyError, OSError) as exc:
        cause = exc.orig if isinstance(exc, SQLAlchemyError) and hasattr(exc, "orig") else exc
        detail = type(cause).__name__ if cause is not None else type(exc).__name__
        _fail(f"cannot use the database at {_database_target(url)} ({detail})")
    except RedisError as exc:
        _fail(f"cannot reach Redis ({type(exc).__name__})")


def _run(
    action: Callable[[AsyncEngine, aioredis.Redis | None], Awaitable[_T]], *, redis: bool
) -> _T:
    url = _env("NZ_DATABASE_URL")
    redis_url = _env("NZ_REDIS_URL") if redis else None

    async def go() -> _T:
        try:
            engine = create_async_engine(url, pool_size=1, connect_args={"timeout": 5})
        except ArgumentError:
            _fail("NZ_DATABASE_URL is not a valid database URL")
        client = (
            aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
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


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value else None


def _jsonable(value: Any) -> Any:
    if attrs.has(type(value)):
        return {k: _jsonable(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, dt.datetime):
        return _iso(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2))


def _short(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def parse_expiry(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """`30d`, `12h`, `2w`, a date (`2027-01-31`, end of that day UTC) or an ISO datetime."""
    current = now or dt.datetime.now(dt.UTC)
    match = _DURATION.match(text.strip())
    if match:
        return current + dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            day = dt.date.fromisoformat(text.strip())
            return dt.datetime.combine(day, dt.time.max, tzinfo=dt.UTC)
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        _fail(f"invalid expiry {text!r}: use e.g. 30d, 12h, 2027-01-31 or 2027-01-31T12:00:00Z")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neuronetz-gateway")
def cli() -> None:
    """Administer neuronetz-gateway: tenants, API keys and their limits.

    Reads NZ_DATABASE_URL (and NZ_REDIS_URL for commands that must reach every policyd).
    """


@cli.command("create-tenant")
@click.option("--name", required=True, help="Tenant name: lowercase letters, digits, . _ -")
@_json_option
def create_tenant(name: str, as_json: bool) -> None:
    """Create a tenant."""
    tenant = _run(lambda e, _r: admin.create_tenant(e, name=name), redis=False)
    if as_json:
        _print_json(tenant)
    else:
        click.echo(f"created tenant {tenant.name} ({tenant.id})")


@cli.command("list-tenants")
@_json_option
def list_tenants(as_json: bool) -> None:
    """List tenants with their number of keys."""
    found = _run(lambda e, _r: admin.list_tenants(e), redis=False)
    if as_json:
        _print_json(found)
        return
    table = Table("name", "id", "keys", "created")
    for t in found:
        table.add_row(t.name, t.id, str(t.keys), _short(t.created_at))
    Console().print(table)


@cli.command("create-key")
@click.option("--tenant", required=True, help="Tenant that owns the key.")
@click.option("--name", required=True, help="Key name, unique within the tenant.")
@click.option("--expires", default=None, help="Expiry: 30d, 12h, 2027-01-31 or ISO datetime.")
@_json_option
def create_key(tenant: str, name: str, expires: str | None, as_json: bool) -> None:
    """Create an API key and print it. This is the only time the key is shown."""
    expires_at = parse_expiry(expires) if expires is not None else None
    created = _run(
        lambda e, r: admin.create_key(e, r, tenant=tenant, name=name, expires_at=expires_at),
        redis=bool(os.environ.get("NZ_REDIS_URL")),
    )
    if as_json:
        _print_json(
            {
                "key": created.key,
                "prefix": created.prefix,
                "name": created.name,
                "tenant": created.tenant,
                "id": created.id,
                "expires_at": _iso(created.expires_at),
            }
        )
        return
    click.echo(created.key)
    click.echo(
        f"key {created.prefix} ({created.name}) for tenant {created.tenant}"
        f"{', expires ' + _short(created.expires_at) if created.expires_at else ''}. "
        "Store it now: it cannot be shown again.",
        err=True,
    )


@cli.command("list-keys")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
@_json_option
def list_keys(tenant: str | None, as_json: bool) -> None:
    """List keys (prefix, name, tenant, status, dates). Secrets are never shown."""
    found = _run(lambda e, _r: admin.list_keys(e, tenant=tenant), redis=False)
    if as_json:
        _print_json(found)
        return
    table = Table("prefix", "name", "tenant", "status", "created", "expires", "last used")
    for k in found:
        table.add_row(
            k.prefix,
            k.name,
            k.tenant,
            k.status,
            _short(k.created_at),
            _short(k.expires_at),
            _short(k.last_used_at),
        )
    Console().print(table)


@cli.command("revoke-key")
@click.option("--prefix", required=True, help="The key's prefix, e.g. nz_ab12cd34.")
@_json_option
def revoke_key(prefix: str, as_json: bool) -> None:
    """Revoke a key. Every policyd refuses it within a second. Safe to repeat."""
    key = _run(lambda e, r: admin.revoke_key(e, _need(r), prefix=prefix), redis=True)
    if as_json:
        _print_json(key)
    else:
        click.echo(f"revoked key {key.prefix} ({key.name}) of tenant {key.tenant}")


def _need(client: aioredis.Redis | None) -> aioredis.Redis:
    assert client is not None
    return client


def main() -> None:
    """Console-script entry point."""
    cli()
