"""Operator commands on what meterd settled: `audit`, `usage`, `prune-prompts`.

meterd writes these tables; this module reads them through their one description
(`policyd.shared.tables`). Register the commands on the
`neuronetz-gateway` group from `COMMANDS`. Like every command: `--json` for
machines, one line on stderr and exit 1 on errors, never a key or a prompt.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Final, TypeVar

import rich_click as click
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from policyd.admin.accounts import InvalidInput, find_tenant_id
from policyd.cli.base import bad_input, iso, json_option, parse_when, run
from policyd.shared.bounds import MAX_LOOKBACK_DAYS
from policyd.shared.retention import prune_expired_prompts as _prune
from policyd.shared.tables import api_keys, audit_log, tenants, usage_ledger

__all__ = [
    "COMMANDS",
    "audit",
    "parse_moment",
    "prune_expired_prompts",
    "prune_prompts",
    "settled_usage",
    "since_option",
    "until_option",
]

_T = TypeVar("_T")
_EXIT_ERROR: Final = 1
_MAX_LIMIT: Final = 1000
#: Highest page: the row offset stays far inside Postgres's bigint.
_MAX_PAGE: Final = 10**9
_STATUS_CLASS: Final = re.compile(r"^([1-5])xx$")

# --- shared options -------------------------------------------------------------------------


def parse_moment(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """`24h`/`7d`/`30m`/`2w` ago, a date (its start, UTC) or an ISO datetime."""
    moment = parse_when(text, ahead=False, now=now, within_days=MAX_LOOKBACK_DAYS)
    if moment is None:
        raise click.BadParameter(
            f"{text!r}: use e.g. 24h, 7d, 2026-11-01 or 2026-11-01T12:00:00Z, "
            f"at most {MAX_LOOKBACK_DAYS} days from now"
        )
    return moment


def _moment(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dt.datetime | None:
    return parse_moment(value) if value is not None else None


_tenant_option = click.option("--tenant", default=None, help="Only this tenant (by name).")
_key_option = click.option("--key", "prefix", default=None, help="Only this key (by prefix).")
since_option = click.option(
    "--since", default=None, callback=_moment, help="From: 24h, 7d, a date or ISO datetime."
)
until_option = click.option(
    "--until", default=None, callback=_moment, help="Before: 1h, a date or ISO datetime."
)


# --- audit ---------------------------------------------------------------------------------


async def audit_rows(
    engine: AsyncEngine,
    *,
    tenant: str | None = None,
    prefix: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    status: str | None = None,
    model: str | None = None,
    limit: int = 50,
    page: int = 1,
) -> list[dict[str, Any]]:
    """Audit rows, newest first, as plain dicts (what `audit --json` prints)."""
    a = audit_log.c
    stmt = (
        sa.select(audit_log, tenants.c.name.label("tenant"))
        .select_from(audit_log.outerjoin(tenants, tenants.c.id == a.tenant_id))
        .order_by(a.ts.desc(), a.request_id)
        .limit(limit)
        .offset((page - 1) * limit)
    )
    async with engine.connect() as conn:
        if tenant is not None:
            stmt = stmt.where(a.tenant_id == await find_tenant_id(conn, tenant))
        if prefix is not None:
            stmt = stmt.where(a.key_prefix == prefix)
        if since is not None:
            stmt = stmt.where(a.ts >= since)
        if until is not None:
            stmt = stmt.where(a.ts < until)
        if model is not None:
            stmt = stmt.where(a.model == model)
        if status is not None:
            stmt = stmt.where(_status_filter(status))
        rows = (await conn.execute(stmt)).all()
    return [_audit_dict(row._mapping) for row in rows]


def _status_filter(status: str) -> sa.ColumnElement[bool]:
    value = status.strip().lower()
    match = _STATUS_CLASS.match(value)
    if match:
        low = int(match.group(1)) * 100
        return sa.and_(audit_log.c.status >= low, audit_log.c.status < low + 100)
    if value.isdigit() and len(value) == 3:
        return audit_log.c.status == int(value)
    raise InvalidInput(f"invalid status {status!r}: use e.g. 200, 429 or 4xx")


def _audit_dict(row: Any) -> dict[str, Any]:
    return {
        "request_id": str(row["request_id"]),
        "ts": iso(row["ts"]),
        "tenant": row["tenant"],
        "tenant_id": str(row["tenant_id"]) if row["tenant_id"] else None,
        "key_prefix": row["key_prefix"],
        "key_id": str(row["key_id"]) if row["key_id"] else None,
        "method": row["method"],
        "path": row["path"],
        "model": row["model"],
        "stream": row["stream"],
        "status": row["status"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "usage_source": row["usage_source"],
        "reserved_tokens": row["reserved_tokens"],
        "bytes_in": row["bytes_in"],
        "bytes_out": row["bytes_out"],
        "duration_ms": row["duration_ms"],
        "ttfb_ms": row["ttfb_ms"],
        "client_ip": str(row["client_ip"]) if row["client_ip"] is not None else None,
        "user_agent": row["user_agent"],
        "refusal": row["refusal"],
        # A 401's claimed prefix: never verified, so never shown as the key.
        "claimed_prefix": row["claimed_prefix"],
        "node": row["node"],
        "upstream": row["upstream"],
    }


@click.command("audit")
@_tenant_option
@_key_option
@since_option
@until_option
@click.option("--status", default=None, help="HTTP status (429) or class (4xx).")
@click.option("--model", default=None, help="Only requests for this model (as requested).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, _MAX_LIMIT))
@click.option(
    "--page", default=1, show_default=True, type=click.IntRange(1, _MAX_PAGE), help="1 = newest."
)
@json_option
def audit(
    tenant: str | None,
    prefix: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    status: str | None,
    model: str | None,
    limit: int,
    page: int,
    as_json: bool,
) -> None:
    """Show the audit log: one row per request, newest first. Never keys or prompts."""
    if status is not None:
        try:
            _status_filter(status)
        except InvalidInput as exc:
            bad_input(str(exc))
    rows = run(
        lambda e, _r: audit_rows(
            e,
            tenant=tenant,
            prefix=prefix,
            since=since,
            until=until,
            status=status,
            model=model,
            limit=limit,
            page=page,
        ),
        redis=False,
    )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("time (UTC)", "tenant", "key", "request", "status", "model", "tokens", "ms")
    for r in rows:
        tokens = f"{r['prompt_tokens']}+{r['completion_tokens']}"
        if r["usage_source"] != "exact":
            tokens += f" ({r['usage_source']})"
        table.add_row(
            (r["ts"] or "")[:19].replace("T", " "),
            r["tenant"] or "-",
            r["key_prefix"] or "-",
            f"{r['method']} {r['path']}",
            str(r["status"]) + (f" {r['refusal']}" if r["refusal"] else ""),
            r["model"] or "-",
            tokens,
            str(r["duration_ms"]),
        )
    Console().print(table)
    if len(rows) == limit:
        click.echo(f"more rows: --page {page + 1}", err=True)


# --- usage ---------------------------------------------------------------------------------


async def settled_usage(
    engine: AsyncEngine,
    *,
    tenant: str | None = None,
    prefix: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    by: str = "day",
) -> list[dict[str, Any]]:
    """Settled usage per period (UTC day or month), tenant and key, from the ledger."""
    u = usage_ledger.c
    period = sa.func.date_trunc(by, u.day).label("period")
    stmt = (
        sa.select(
            period,
            tenants.c.name.label("tenant"),
            api_keys.c.prefix.label("key_prefix"),
            sa.func.sum(u.requests).label("requests"),
            sa.func.sum(u.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(u.completion_tokens).label("completion_tokens"),
            sa.func.sum(u.estimated_tokens).label("estimated_tokens"),
        )
        .select_from(
            usage_ledger.outerjoin(tenants, tenants.c.id == u.tenant_id).outerjoin(
                api_keys, api_keys.c.id == u.key_id
            )
        )
        .group_by(period, tenants.c.name, api_keys.c.prefix)
        .order_by(period, tenants.c.name, api_keys.c.prefix)
    )
    async with engine.connect() as conn:
        if tenant is not None:
            stmt = stmt.where(u.tenant_id == await find_tenant_id(conn, tenant))
        if prefix is not None:
            stmt = stmt.where(api_keys.c.prefix == prefix)
        if since is not None:
            stmt = stmt.where(u.day >= since)
        if until is not None:
            stmt = stmt.where(u.day < until)
        rows = (await conn.execute(stmt)).all()
    shown = "%Y-%m-%d" if by == "day" else "%Y-%m"
    return [
        {
            "period": r.period.strftime(shown),
            "tenant": r.tenant,
            "key_prefix": r.key_prefix,
            "requests": int(r.requests),
            "prompt_tokens": int(r.prompt_tokens),
            "completion_tokens": int(r.completion_tokens),
            "total_tokens": int(r.prompt_tokens + r.completion_tokens),
            "estimated_tokens": int(r.estimated_tokens),
        }
        for r in rows
    ]


# --- prune-prompts -------------------------------------------------------------------------


async def prune_expired_prompts(engine: AsyncEngine) -> int:
    """Delete logged prompts past their retention, in chunks; returns how many went."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection  # asyncpg's connection, autocommitting
        return await _prune(driver)


@click.command("prune-prompts")
@json_option
def prune_prompts(as_json: bool) -> None:
    """Delete logged prompts whose retention has passed (meterd also does this hourly)."""
    deleted = run(lambda e, _r: prune_expired_prompts(e), redis=False)
    if as_json:
        click.echo(json.dumps({"deleted": deleted}))
    else:
        click.echo(f"deleted {deleted} expired prompt{'s' if deleted != 1 else ''}")


#: The commands this module adds to `neuronetz-gateway`.
COMMANDS: Final = (audit, prune_prompts)
