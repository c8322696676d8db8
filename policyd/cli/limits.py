"""CLI commands for limits: `set-limits`, `show-limits` and `usage`."""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import rich_click as click
from rich.console import Console
from rich.table import Table

from policyd.admin import limits as limits_admin
from policyd.cli.audit import settled_usage, since_option, until_option
from policyd.cli.base import bad_input, json_option, need_redis, print_json, run
from policyd.shared.bounds import LIMIT_MAXIMA

__all__ = ["COMMANDS"]

#: CLI option name -> column. Each takes a whole number; `--models` a comma list.
_OPTIONS: Final = {
    "rpm": "rpm",
    "tpm": "tpm",
    "concurrency": "concurrency",
    "daily-tokens": "daily_tokens",
    "monthly-tokens": "monthly_tokens",
    "total-tokens": "total_tokens",
    "max-output-tokens": "max_output_tokens",
    "max-keep-alive-seconds": "max_keep_alive_seconds",
    "max-num-ctx": "max_num_ctx",
    "prompt-retention-days": "prompt_retention_days",
}
_UNSETTABLE: Final = (*_OPTIONS, "models", "prompt-logging")


def _range(column: str, low: int) -> click.IntRange:
    """The values a limit column holds and the gateway accepts (`bounds.LIMIT_MAXIMA`)."""
    return click.IntRange(min=low, max=LIMIT_MAXIMA[column])


def _target_options(func: Any) -> Any:
    func = click.option("--key", "key", default=None, help="Key prefix, e.g. nz_ab12cd34.")(func)
    return click.option("--tenant", default=None, help="Tenant name.")(func)


def _changes(options: dict[str, Any], unset: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for column in _OPTIONS.values():
        value = options.get(column)
        if value is not None:
            values[column] = value
    models = options.get("models")
    if models is not None:
        names = tuple(m.strip() for m in models.split(",") if m.strip())
        if not names:
            bad_input("--models needs at least one model name (use --unset models to allow all)")
        values["allowed_models"] = names
    logging = options.get("prompt_logging")
    if logging is not None:
        values["prompt_logging"] = logging == "on"
    for name in unset:
        column = {"models": "allowed_models"}.get(name, name.replace("-", "_"))
        if column in values:
            bad_input(f"--unset {name} contradicts the value given for it")
        values[column] = None
    return values


@click.command("set-limits")
@_target_options
@click.option("--rpm", type=_range("rpm", 0), help="Requests per minute.")
@click.option("--tpm", type=_range("tpm", 0), help="Tokens per minute.")
@click.option("--concurrency", type=_range("concurrency", 0), help="Requests in flight.")
@click.option("--daily-tokens", type=_range("daily_tokens", 0), help="Token budget per UTC day.")
@click.option("--monthly-tokens", type=_range("monthly_tokens", 0), help="Per UTC month.")
@click.option("--total-tokens", type=_range("total_tokens", 0), help="Lifetime token budget.")
@click.option(
    "--max-output-tokens", type=_range("max_output_tokens", 1), help="Largest output cap."
)
@click.option(
    "--max-keep-alive-seconds",
    type=_range("max_keep_alive_seconds", 1),
    help="Longest keep_alive a client may ask for (unset: the client's is removed).",
)
@click.option(
    "--max-num-ctx",
    type=_range("max_num_ctx", 1),
    help="Largest num_ctx a client may ask for (unset: the client's is removed).",
)
@click.option("--models", default=None, help="Allowed models, comma separated.")
@click.option("--prompt-logging", type=click.Choice(["on", "off"]), default=None)
@click.option("--prompt-retention-days", type=_range("prompt_retention_days", 1), default=None)
@click.option(
    "--unset",
    multiple=True,
    type=click.Choice(_UNSETTABLE),
    help="Remove a value (a key then inherits the tenant's; a tenant becomes unlimited).",
)
@json_option
def set_limits(
    tenant: str | None, key: str | None, unset: tuple[str, ...], as_json: bool, **opts: Any
) -> None:
    """Set or unset limits of a tenant (defaults and caps) or of one key (overrides)."""
    values = _changes(opts, unset)

    async def action(engine: Any, redis: Any) -> list[limits_admin.LimitView]:
        target = await limits_admin.resolve_target(engine, tenant=tenant, key=key)
        await limits_admin.set_limits(engine, need_redis(redis), target, values)
        return await limits_admin.show_limits(engine, target)

    views = run(action, redis=True)
    if as_json:
        print_json(views)
    else:
        _print_limits(views)


@click.command("show-limits")
@_target_options
@json_option
def show_limits(tenant: str | None, key: str | None, as_json: bool) -> None:
    """Effective limits and where each comes from (key, tenant default, unset)."""

    async def action(engine: Any, _redis: Any) -> list[limits_admin.LimitView]:
        target = await limits_admin.resolve_target(engine, tenant=tenant, key=key)
        return await limits_admin.show_limits(engine, target)

    views = run(action, redis=False)
    if as_json:
        print_json(views)
    else:
        _print_limits(views)


@click.command("usage")
@_target_options
@since_option
@until_option
@click.option("--by", type=click.Choice(["day", "month"]), default="day", show_default=True)
@json_option
def usage(
    tenant: str | None,
    key: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    by: str,
    as_json: bool,
) -> None:
    """Live window and budget figures (for one tenant or key) and settled usage per period.

    Live figures come from Redis: requests and tokens in the last minute, requests in
    flight (counted only where a limit applies), budgets used including open
    reservations. Settled figures come from
    meterd's ledger, per UTC day or month.
    """
    one_target = (tenant is None) != (key is None)

    async def action(engine: Any, redis: Any) -> dict[str, Any]:
        live = None
        if one_target:
            target = await limits_admin.resolve_target(engine, tenant=tenant, key=key)
            live = await limits_admin.usage(engine, need_redis(redis), target)
        settled = await settled_usage(
            engine,
            tenant=tenant,
            prefix=key,
            since=since.date() if since else None,
            until=until.date() if until else None,
            by=by,
        )
        return {"live": live, "settled": settled}

    if tenant is not None and key is not None:
        bad_input("give at most one of --tenant or --key")
    found = run(action, redis=one_target)
    if as_json:
        print_json(found)
        return
    console = Console()
    if found["live"] is not None:
        table = Table("limit", "used now", "of", title="live")
        for v in found["live"]:
            limit = "unlimited" if v.limit is None else str(v.limit)
            used = "not counted" if v.used is None else str(v.used)
            table.add_row(v.name, used, limit)
        console.print(table)
    settled = Table(by, "tenant", "key", "requests", "prompt", "completion", "estimated")
    settled.title = "settled"
    for r in found["settled"]:
        settled.add_row(
            r["period"],
            r["tenant"] or "-",
            r["key_prefix"] or "-",
            str(r["requests"]),
            str(r["prompt_tokens"]),
            str(r["completion_tokens"]),
            str(r["estimated_tokens"]),
        )
    console.print(settled)


#: The commands this module adds to `neuronetz-gateway`.
COMMANDS: Final = (set_limits, show_limits, usage)


def _print_limits(views: list[limits_admin.LimitView]) -> None:
    table = Table("limit", "value", "from", "tenant cap")
    for v in views:
        value = "-" if v.value is None else _text(v.value)
        cap = "-" if v.tenant_cap is None else _text(v.tenant_cap)
        table.add_row(v.name, value, v.source, cap)
    Console().print(table)


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
