"""policyd's tables: tenants, API keys, and the limit columns both carry.

A key's limit value, where set, overrides its tenant's; NULL means "inherit" on a key
and "unlimited" on a tenant. Alembic (`migrations/`) builds these; this module is the
SQLAlchemy view of them.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID

__all__ = ["LIMIT_COLUMNS", "api_keys", "metadata", "tenants", "utcnow"]

metadata: Final = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: Limit and policy columns present on both tenants and keys.
LIMIT_COLUMNS: Final = (
    "rpm",
    "tpm",
    "concurrency",
    "daily_tokens",
    "monthly_tokens",
    "total_tokens",
    "max_output_tokens",
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
