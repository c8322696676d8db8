"""Tenants and API keys, with the limit and policy columns both levels carry.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _limit_columns(table: str) -> list[sa.Column[object]]:
    """NULL = inherit (key) / unlimited (tenant); checks keep nonsense out of the store."""
    return [
        sa.Column("rpm", sa.Integer, sa.CheckConstraint("rpm >= 0", name=f"ck_{table}_rpm")),
        sa.Column("tpm", sa.BigInteger, sa.CheckConstraint("tpm >= 0", name=f"ck_{table}_tpm")),
        sa.Column(
            "concurrency",
            sa.Integer,
            sa.CheckConstraint("concurrency >= 0", name=f"ck_{table}_concurrency"),
        ),
        sa.Column(
            "daily_tokens",
            sa.BigInteger,
            sa.CheckConstraint("daily_tokens >= 0", name=f"ck_{table}_daily"),
        ),
        sa.Column(
            "monthly_tokens",
            sa.BigInteger,
            sa.CheckConstraint("monthly_tokens >= 0", name=f"ck_{table}_monthly"),
        ),
        sa.Column(
            "total_tokens",
            sa.BigInteger,
            sa.CheckConstraint("total_tokens >= 0", name=f"ck_{table}_total"),
        ),
        sa.Column(
            "max_output_tokens",
            sa.Integer,
            sa.CheckConstraint("max_output_tokens > 0", name=f"ck_{table}_max_output"),
        ),
        sa.Column("allowed_models", postgresql.ARRAY(sa.Text)),
        sa.Column("prompt_logging", sa.Boolean),
        sa.Column(
            "prompt_retention_days",
            sa.Integer,
            sa.CheckConstraint("prompt_retention_days > 0", name=f"ck_{table}_retention"),
        ),
    ]


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            primary_key=True,
            server_default=sa.text("gen_random_uuid()"),
        ),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("budget_timezone", sa.Text),
        *_limit_columns("tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            primary_key=True,
            server_default=sa.text("gen_random_uuid()"),
        ),
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("secret_hash", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        *_limit_columns("api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_api_keys_tenant_id_tenants",
            ondelete="RESTRICT",
        ),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_api_keys_tenant_name"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
