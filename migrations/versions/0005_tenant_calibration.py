"""Per-tenant calibration, and the key prefix a refused 401 claimed.

The old `meter_calibration` was one row per model and endpoint, learnt from every
tenant's traffic and keyed on the model as spelled, so one tenant could poison every
tenant's streamed charges; its figures (fitted on request-body bytes) mean nothing to the
new estimator, so it is replaced, not migrated: the estimator starts from its priors.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FIGURES = ("prompt", "reply", "context")


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("claimed_prefix", sa.Text))
    op.drop_table("meter_calibration")
    op.create_table(
        "meter_calibration",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        *(
            sa.Column(f"{figure}_{part}", sa.Double, nullable=False, server_default="0")
            for figure in _FIGURES
            for part in ("n", "log")
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("tenant_id", "model", "path", name="pk_meter_calibration"),
    )


def downgrade() -> None:
    op.drop_table("meter_calibration")
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
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("model", "path", name="pk_meter_calibration"),
    )
    op.drop_column("audit_log", "claimed_prefix")
