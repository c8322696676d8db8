"""meterd's tables: audit log, usage ledger, prompt log, checkpoints and calibration.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _now() -> sa.Column[object]:
    return sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("request_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True)),
        sa.Column("key_id", postgresql.UUID(as_uuid=True)),
        sa.Column("key_prefix", sa.Text),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("surface", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("stream", sa.Boolean),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("usage_source", sa.Text, nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger),
        sa.Column("bytes_in", sa.BigInteger, nullable=False),
        sa.Column("bytes_out", sa.BigInteger, nullable=False),
        sa.Column("duration_ms", sa.BigInteger, nullable=False),
        sa.Column("ttfb_ms", sa.BigInteger),
        sa.Column("client_ip", postgresql.INET),
        sa.Column("user_agent", sa.Text),
        sa.Column("refusal", sa.Text),
        sa.Column("node", sa.Text, nullable=False),
        sa.Column(
            "settled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("request_id", name="pk_audit_log"),
        sa.CheckConstraint(
            "usage_source IN ('exact', 'estimated', 'reserved')", name="ck_audit_log_source"
        ),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    op.create_index("ix_audit_log_tenant_id_ts", "audit_log", ["tenant_id", "ts"])
    op.create_index("ix_audit_log_key_id_ts", "audit_log", ["key_id", "ts"])

    op.create_table(
        "usage_ledger",
        sa.Column("key_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("estimated_tokens", sa.BigInteger, nullable=False, server_default="0"),
        _now(),
        sa.PrimaryKeyConstraint("key_id", "day", name="pk_usage_ledger"),
    )
    op.create_index("ix_usage_ledger_tenant_id_day", "usage_ledger", ["tenant_id", "day"])

    op.create_table(
        "prompt_log",
        sa.Column("request_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("key_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False, server_default="false"),
        sa.PrimaryKeyConstraint("request_id", name="pk_prompt_log"),
    )
    op.create_index("ix_prompt_log_expires_at", "prompt_log", ["expires_at"])

    op.create_table(
        "meter_checkpoints",
        sa.Column("node", sa.Text, nullable=False),
        sa.Column("log_path", sa.Text, nullable=False),
        sa.Column("dev", sa.BigInteger, nullable=False),
        sa.Column("inode", sa.BigInteger, nullable=False),
        sa.Column("byte_offset", sa.BigInteger, nullable=False),
        sa.Column("fingerprint", sa.LargeBinary, nullable=False),
        sa.Column("fingerprint_len", sa.Integer, nullable=False),
        sa.Column("lines", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("bad_lines", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_event_at", sa.DateTime(timezone=True)),
        _now(),
        sa.PrimaryKeyConstraint("node", "log_path", name="pk_meter_checkpoints"),
    )

    op.create_table(
        "meter_calibration",
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        *(
            sa.Column(name, sa.Double, nullable=False)
            for name in (
                "weight",
                "prompt_weight",
                "prompt_bytes",
                "prompt_tokens",
                "prompt_bytes_sq",
                "prompt_cross",
                "content_bytes",
                "completion_tokens",
                "context_bytes",
                "context_tokens",
            )
        ),
        _now(),
        sa.PrimaryKeyConstraint("model", "path", name="pk_meter_calibration"),
    )


def downgrade() -> None:
    op.drop_table("meter_calibration")
    op.drop_table("meter_checkpoints")
    op.drop_index("ix_prompt_log_expires_at", table_name="prompt_log")
    op.drop_table("prompt_log")
    op.drop_index("ix_usage_ledger_tenant_id_day", table_name="usage_ledger")
    op.drop_table("usage_ledger")
    op.drop_index("ix_audit_log_key_id_ts", table_name="audit_log")
    op.drop_index("ix_audit_log_tenant_id_ts", table_name="audit_log")
    op.drop_index("ix_audit_log_ts", table_name="audit_log")
    op.drop_table("audit_log")
