"""`neuronetz-gateway`: the operator CLI for tenants, keys and limits.

Every command takes `--json`. Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import datetime as dt
import sys

import click as plain_click
import rich_click as click
from rich.console import Console
from rich.table import Table

from policyd.admin import accounts as admin
from policyd.cli import audit as cli_audit
from policyd.cli import limits as cli_limits
from policyd.cli.base import (
    EXIT_BAD_INPUT,
    bad_input,
    has_setting,
    iso,
    json_option,
    need_redis,
    one_line,
    parse_when,
    print_json,
    run,
)
from policyd.shared.bounds import MAX_EXPIRY_DAYS

__all__ = ["main"]


def _short(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def parse_expiry(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """`30d`, `12h`, `2w`, a date (`2027-01-31`, end of that day UTC) or an ISO datetime,
    at most `MAX_EXPIRY_DAYS` ahead."""
    moment = parse_when(text, ahead=True, now=now, within_days=MAX_EXPIRY_DAYS)
    if moment is None:
        bad_input(
            f"invalid expiry {text!r}: use e.g. 30d, 12h, 2027-01-31 or 2027-01-31T12:00:00Z, "
            f"at most {MAX_EXPIRY_DAYS} days ahead"
        )
    return moment


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neuronetz-gateway")
def cli() -> None:
    """Administer neuronetz-gateway: tenants, API keys and their limits.

    Reads NZ_DATABASE_URL (and NZ_REDIS_URL for commands that must reach every policyd).
    Inside a checkout with no NZ_* set, the local stack's .run/cli.env (from `make up`).
    """


@click.command("create-tenant")
@click.option("--name", required=True, help="Tenant name: lowercase letters, digits, . _ -")
@json_option
def create_tenant(name: str, as_json: bool) -> None:
    """Create a tenant."""
    tenant = run(lambda e, _r: admin.create_tenant(e, name=name), redis=False)
    if as_json:
        print_json(tenant)
    else:
        click.echo(f"created tenant {tenant.name} ({tenant.id})")


@click.command("list-tenants")
@json_option
def list_tenants(as_json: bool) -> None:
    """List tenants with their number of keys."""
    found = run(lambda e, _r: admin.list_tenants(e), redis=False)
    if as_json:
        print_json(found)
        return
    table = Table("name", "id", "keys", "created")
    for t in found:
        table.add_row(t.name, t.id, str(t.keys), _short(t.created_at))
    Console().print(table)


@click.command("create-key")
@click.option("--tenant", required=True, help="Tenant that owns the key.")
@click.option("--name", required=True, help="Key name, unique within the tenant.")
@click.option("--expires", default=None, help="Expiry: 30d, 12h, 2027-01-31 or ISO datetime.")
@json_option
def create_key(tenant: str, name: str, expires: str | None, as_json: bool) -> None:
    """Create an API key and print it. This is the only time the key is shown."""
    expires_at = parse_expiry(expires) if expires is not None else None
    created = run(
        lambda e, r: admin.create_key(e, r, tenant=tenant, name=name, expires_at=expires_at),
        redis=has_setting("NZ_REDIS_URL"),
    )
    if as_json:
        print_json(
            {
                "key": created.key,
                "prefix": created.prefix,
                "name": created.name,
                "tenant": created.tenant,
                "id": created.id,
                "expires_at": iso(created.expires_at),
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


@click.command("list-keys")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
@json_option
def list_keys(tenant: str | None, as_json: bool) -> None:
    """List keys (prefix, name, tenant, status, dates). Secrets are never shown."""
    found = run(lambda e, _r: admin.list_keys(e, tenant=tenant), redis=False)
    if as_json:
        print_json(found)
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


@click.command("revoke-key")
@click.option("--prefix", required=True, help="The key's prefix, e.g. nz_ab12cd34.")
@json_option
def revoke_key(prefix: str, as_json: bool) -> None:
    """Revoke a key. Every policyd refuses it within a second. Safe to repeat."""
    key = run(lambda e, r: admin.revoke_key(e, need_redis(r), prefix=prefix), redis=True)
    if as_json:
        print_json(key)
    else:
        click.echo(f"revoked key {key.prefix} ({key.name}) of tenant {key.tenant}")


for _command in (
    create_tenant,
    list_tenants,
    create_key,
    list_keys,
    revoke_key,
    *cli_limits.COMMANDS,
    *cli_audit.COMMANDS,
):
    cli.add_command(_command)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def run_cli(args: list[str] | None = None) -> int:
    """Run the CLI on `args` (default: the command line); returns the exit code.

    Click's own usage errors (a value out of an option's range, an unknown option) are
    one line too, exit 2, like every bad value; no error ever prints a traceback.
    """
    argv = sys.argv[1:] if args is None else args
    if not all(_utf8(arg) for arg in argv):
        # Bytes that are not UTF-8 reach Python as lone surrogates; no store takes them.
        click.echo("error: every argument must be valid UTF-8 text", err=True)
        return EXIT_BAD_INPUT
    try:
        cli.main(args=argv, prog_name="neuronetz-gateway", standalone_mode=False)
    except plain_click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except plain_click.ClickException as exc:
        click.echo(f"error: {one_line(exc.format_message())}", err=True)
        return exc.exit_code if exc.exit_code else EXIT_BAD_INPUT
    except plain_click.Abort:
        click.echo("error: aborted", err=True)
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run_cli())
