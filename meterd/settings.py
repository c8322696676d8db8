"""meterd's settings, read once from an explicit environment mapping.

Every problem is reported at once so an operator fixes the configuration in one go.
Nothing here reads `os.environ` by itself: the entry point passes it in.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

from policyd.shared.bounds import MAX_PROMPT_RETENTION_DAYS
from policyd.shared.envreader import EnvReader, redacted_url
from policyd.shared.errors import SettingsError
from policyd.shared.sentinel import SentinelSettings, read_sentinels

__all__ = ["Settings", "SettingsError", "load_settings"]

_MAX_NODE_LEN: Final = 200
_MAX_PORT: Final = 65535
#: Each named tenant is a Prometheus series; beyond this a TSDB suffers.
_MAX_TENANT_SERIES: Final = 1000


@attrs.frozen(kw_only=True)
class Settings:
    """Everything the meter daemon needs, validated. Defaults are documented in docs/metering.md."""

    database_url: str = attrs.field(repr=redacted_url)
    redis_url: str = attrs.field(repr=redacted_url)
    #: NZ_REDIS_SENTINELS: the primary is whichever these name (the URL's host is unused).
    sentinels: SentinelSettings | None = None
    #: Caddy's access log (NZ_ACCESS_LOG); rolled files are found beside it.
    access_log: Path
    #: Names this node's checkpoint and heartbeat; several nodes share one database.
    node: str
    #: Most lines settled in one Postgres transaction.
    batch_lines: int = 500
    #: How often an idle tail looks for new lines.
    poll_s: float = 0.2
    #: How often the lease follower looks for new lines (leases are released then).
    lease_poll_s: float = 0.05
    #: The heartbeat key expires this long after the last beat; `--check` fails after it.
    heartbeat_ttl_s: int = 30
    #: How often expired prompts are deleted.
    prune_every_s: float = 3600.0
    #: Retention for prompts when neither key nor tenant sets one.
    prompt_retention_days: int = 30
    #: Longest access-log line kept whole; longer ones keep their head (see parse.py).
    max_line_bytes: int = 64 * 1024 * 1024
    #: Longest request body stored in the prompt log (larger ones are cut and marked).
    max_prompt_bytes: int = 1024 * 1024
    #: After SIGTERM, how long meterd keeps settling what is already in the log.
    drain_s: float = 20.0
    #: Ceiling of the retry backoff while Postgres or Redis is unavailable.
    max_backoff_s: float = 30.0
    #: How often reservations whose log line never arrived are looked for (sweep.py).
    sweep_every_s: float = 30.0
    #: How long after its lease expired a reservation is charged as reserved and flagged.
    sweep_grace_s: float = 30.0
    log_level: str = "INFO"
    #: The Prometheus listener (metrics.py): an internal address only; port 0 turns it off.
    metrics_bind: str = "127.0.0.1"
    metrics_port: int = 9181
    #: Tenants with their own series in nz_meterd_tenant_tokens_total; the rest are "other".
    metrics_tenants: int = 50


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build settings from `env` (normally `os.environ`); raise listing every problem."""
    read = EnvReader(env)
    database_url = read.url("NZ_DATABASE_URL", ("postgresql+asyncpg",))
    redis_url = read.url("NZ_REDIS_URL", ("redis", "rediss", "unix"))
    sentinels = read_sentinels(read)
    access_log = read.required("NZ_ACCESS_LOG")
    if access_log and not Path(access_log).is_absolute():
        read.errors.append("NZ_ACCESS_LOG must be an absolute path")
    node = read.text("NZ_METERD_NODE") or socket.gethostname()
    if len(node) > _MAX_NODE_LEN or not node.isprintable():
        read.errors.append(f"NZ_METERD_NODE must be 1-{_MAX_NODE_LEN} printable characters")
    num = read.number
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        sentinels=sentinels,
        access_log=Path(access_log),
        node=node,
        batch_lines=int(num("NZ_METERD_BATCH_LINES", 500, integer=True)),
        poll_s=num("NZ_METERD_POLL_S", 0.2),
        lease_poll_s=num("NZ_METERD_LEASE_POLL_S", 0.05),
        heartbeat_ttl_s=int(num("NZ_METERD_HEARTBEAT_TTL_S", 30, integer=True, above=2)),
        prune_every_s=num("NZ_METERD_PRUNE_EVERY_S", 3600.0),
        prompt_retention_days=int(num("NZ_METERD_PROMPT_RETENTION_DAYS", 30, integer=True)),
        sweep_every_s=num("NZ_METERD_SWEEP_EVERY_S", 30.0),
        sweep_grace_s=num("NZ_METERD_SWEEP_GRACE_S", 30.0),
        max_line_bytes=int(
            num("NZ_METERD_MAX_LINE_BYTES", 64 * 1024 * 1024, integer=True, above=4095)
        ),
        max_prompt_bytes=int(num("NZ_METERD_MAX_PROMPT_BYTES", 1024 * 1024, integer=True)),
        drain_s=num("NZ_METERD_DRAIN_S", 20.0),
        max_backoff_s=num("NZ_METERD_MAX_BACKOFF_S", 30.0),
        log_level=read.log_level("NZ_METERD_LOG_LEVEL"),
        metrics_bind=read.text("NZ_METERD_METRICS_BIND", "127.0.0.1"),
        metrics_port=int(num("NZ_METERD_METRICS_PORT", 9181, integer=True, above=-1)),
        metrics_tenants=int(num("NZ_METERD_METRICS_TENANTS", 50, integer=True, above=-1)),
    )
    if settings.metrics_port > _MAX_PORT:
        read.errors.append(f"NZ_METERD_METRICS_PORT must be at most {_MAX_PORT}")
    if settings.metrics_tenants > _MAX_TENANT_SERIES:
        read.errors.append(f"NZ_METERD_METRICS_TENANTS must be at most {_MAX_TENANT_SERIES}")
    if settings.prompt_retention_days > MAX_PROMPT_RETENTION_DAYS:
        read.errors.append(
            f"NZ_METERD_PROMPT_RETENTION_DAYS must be at most {MAX_PROMPT_RETENTION_DAYS}"
        )
    if read.errors:
        raise SettingsError("; ".join(read.errors))
    return settings
