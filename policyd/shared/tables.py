"""Every table, described once: policyd's tenants and keys, meterd's audit and ledger.

Alembic (`migrations/`) builds them and compares against this metadata; policyd, meterd
and the CLI read and write through these descriptions (meterd's hot writes are SQL text
in `meterd/writes.py` that must match these columns).

Tenants and keys: a key's limit value, where set, overrides its tenant's; NULL means
"inherit" on a key and "unlimited" on a tenant. meterd's tables reference neither: a key
may be deleted while its audit history stays.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, INET, UUID

from policyd.shared.keyspace import DIMENSIONS

__all__ = [
    "CALIBRATION_FIGURES",
    "LIMIT_COLUMNS",
    "USAGE_SOURCES",
    "api_keys",
    "audit_log",
    "metadata",
    "meter_calibration",
    "meter_checkpoints",
    "prompt_log",
    "tenants",
    "usage_ledger",
    "utcnow",
]

metadata: Final = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: Limit and policy columns present on both tenants and keys: the admission script's
#: dimensions, then the key policy.
LIMIT_COLUMNS: Final = (
    *DIMENSIONS,
    "max_output_tokens",
    "max_keep_alive_seconds",
    "max_num_ctx",
    "allowed_models",
    "prompt_logging",
    "prompt_retention_days",
)


def _limit_columns() -> list[Column[object]]:
    return [
        Column("rpm", Integer, CheckConstraint("rpm >= 0", name="rpm")),
        Column("tpm", BigInteger, CheckConstraint("tpm >= 0", name="tpm")),
        Column("concurrency", Integer, CheckConstraint("concurrency >= 0", name="concurrency")),
        Column("daily_tokens", BigInteger, CheckConstraint("daily_tokens >= 0", name="daily")),
        Column(
            "monthly_tokens", BigInteger, CheckConstraint("monthly_tokens >= 0", name="monthly")
        ),
        Column("total_tokens", BigInteger, CheckConstraint("total_tokens >= 0", name="total")),
        Column(
            "max_output_tokens",
            Integer,
            CheckConstraint("max_output_tokens > 0", name="max_output"),
        ),
        Column(
            "max_keep_alive_seconds",
            Integer,
            CheckConstraint("max_keep_alive_seconds > 0", name="max_keep_alive"),
        ),
        Column("max_num_ctx", Integer, CheckConstraint("max_num_ctx > 0", name="max_num_ctx")),
        Column("allowed_models", ARRAY(Text)),
        Column("prompt_logging", Boolean),
        Column(
            "prompt_retention_days",
            Integer,
            CheckConstraint("prompt_retention_days > 0", name="retention"),
        ),
    ]


def utcnow() -> dt.datetime:
    """Timezone-aware now, the only clock used for stored timestamps."""
    return dt.datetime.now(dt.UTC)


tenants: Final = Table(
    "tenants",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("name", Text, nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: IANA zone for calendar budget windows; UTC when unset.
    Column("budget_timezone", Text),
    *_limit_columns(),
)

api_keys: Final = Table(
    "api_keys",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column(
        "tenant_id",
        UUID(as_uuid=True),
        ForeignKey("tenants.id", ondelete="RESTRICT"),
        nullable=False,
        index=True,
    ),
    Column("name", Text, nullable=False),
    #: Public lookup id, e.g. `nz_ab12cd34`; never secret, shown in listings and logs.
    Column("prefix", Text, nullable=False, unique=True),
    #: Argon2id PHC string of the whole key; the key itself is never stored.
    Column("secret_hash", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("last_used_at", DateTime(timezone=True)),
    *_limit_columns(),
    UniqueConstraint("tenant_id", "name", name="uq_api_keys_tenant_name"),
)


# meterd's tables.

USAGE_SOURCES: Final = ("exact", "estimated", "reserved")
#: The figures meterd/calibration.py keeps per tenant, model and endpoint: each an
#: observation count (`_n`) and a value in log space (`_log`).
CALIBRATION_FIGURES: Final = ("prompt", "reply", "context")

audit_log: Final = Table(
    "audit_log",
    metadata,
    #: Caddy's {http.request.uuid}: the same id policyd, Ollama and the client saw.
    Column("request_id", UUID(as_uuid=True), nullable=False),
    #: When the request started (UTC).
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("tenant_id", UUID(as_uuid=True)),
    Column("key_id", UUID(as_uuid=True)),
    Column("key_prefix", Text),
    Column("method", Text, nullable=False),
    #: Path only: a query string may carry secrets.
    Column("path", Text, nullable=False),
    Column("surface", Text),
    Column("model", Text),
    Column("stream", Boolean),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column(
        "usage_source",
        Text,
        CheckConstraint("usage_source IN ('exact', 'estimated', 'reserved')", name="source"),
        nullable=False,
    ),
    #: What admission reserved (estimated prompt + max output); NULL when nothing was.
    Column("reserved_tokens", BigInteger),
    Column("bytes_in", BigInteger, nullable=False),
    Column("bytes_out", BigInteger, nullable=False),
    Column("duration_ms", BigInteger, nullable=False),
    #: Until Ollama sent its response headers (the first chunk of a stream).
    Column("ttfb_ms", BigInteger),
    Column("client_ip", INET),
    Column("user_agent", Text),
    #: policyd's refusal code for refused requests.
    Column("refusal", Text),
    #: The meterd node (and so the Caddy) that logged the request.
    Column("node", Text, nullable=False),
    #: The Ollama host (host:port) that served it; NULL when none did (refusals).
    Column("upstream", Text),
    #: A 401's key prefix as the client claimed it: never verified (`key_prefix` is).
    Column("claimed_prefix", Text),
    Column("settled_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("request_id", name="pk_audit_log"),
)

usage_ledger: Final = Table(
    "usage_ledger",
    metadata,
    Column("key_id", UUID(as_uuid=True), nullable=False),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    #: UTC day the requests started.
    Column("day", Date, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    #: Of the tokens above, how many were estimated or charged at the reservation.
    Column("estimated_tokens", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("key_id", "day", name="pk_usage_ledger"),
)

prompt_log: Final = Table(
    "prompt_log",
    metadata,
    Column("request_id", UUID(as_uuid=True), nullable=False),
    Column("key_id", UUID(as_uuid=True), nullable=False),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    #: The request body as the client sent it (cut at NZ_METERD_MAX_PROMPT_BYTES).
    Column("body", Text, nullable=False),
    Column("truncated", Boolean, nullable=False, server_default="false"),
    PrimaryKeyConstraint("request_id", name="pk_prompt_log"),
)

meter_checkpoints: Final = Table(
    "meter_checkpoints",
    metadata,
    Column("node", Text, nullable=False),
    Column("log_path", Text, nullable=False),
    #: File identity: st_dev and st_ino (stored as signed 64-bit).
    Column("dev", BigInteger, nullable=False),
    Column("inode", BigInteger, nullable=False),
    #: Every byte before this offset has been settled.
    Column("byte_offset", BigInteger, nullable=False),
    #: SHA-256 of the file's first `fingerprint_len` bytes: guards against inode reuse.
    Column("fingerprint", LargeBinary, nullable=False),
    Column("fingerprint_len", Integer, nullable=False),
    Column("lines", BigInteger, nullable=False, server_default="0"),
    Column("bad_lines", BigInteger, nullable=False, server_default="0"),
    #: `ts` of the last settled request, for lag.
    Column("last_event_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("node", "log_path", name="pk_meter_checkpoints"),
)

meter_calibration: Final = Table(
    "meter_calibration",
    metadata,
    # Each tenant calibrates only its own streamed charges (meterd/calibration.py).
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    #: The canonical model name (folded, default registry and namespace dropped, tag).
    Column("model", Text, nullable=False),
    Column("path", Text, nullable=False),
    *(
        Column(f"{figure}_{part}", Double, nullable=False, server_default="0")
        for figure in CALIBRATION_FIGURES
        for part in ("n", "log")
    ),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant_id", "model", "path", name="pk_meter_calibration"),
)

Index("ix_audit_log_ts", audit_log.c.ts)
Index("ix_audit_log_tenant_id_ts", audit_log.c.tenant_id, audit_log.c.ts)
Index("ix_audit_log_key_id_ts", audit_log.c.key_id, audit_log.c.ts)
Index("ix_usage_ledger_tenant_id_day", usage_ledger.c.tenant_id, usage_ledger.c.day)
Index("ix_prompt_log_expires_at", prompt_log.c.expires_at)
