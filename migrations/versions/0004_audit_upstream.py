"""audit_log.upstream: which Ollama host served each request (several hosts, issue 14).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing, and old rows simply say NULL.
    op.add_column("audit_log", sa.Column("upstream", sa.Text))


def downgrade() -> None:
    op.drop_column("audit_log", "upstream")
