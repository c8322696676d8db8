"""Runtime policy columns: the longest keep_alive and largest num_ctx a key may ask for.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (("max_keep_alive_seconds", "max_keep_alive"), ("max_num_ctx", "max_num_ctx"))


def upgrade() -> None:
    for table in ("tenants", "api_keys"):
        for column, check in _COLUMNS:
            op.add_column(table, sa.Column(column, sa.Integer()))
            op.create_check_constraint(op.f(f"ck_{table}_{check}"), table, f"{column} > 0")


def downgrade() -> None:
    for table in ("tenants", "api_keys"):
        for column, _ in _COLUMNS:
            op.drop_column(table, column)
