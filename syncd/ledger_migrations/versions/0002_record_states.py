"""Record states: retry attempts and their next time, a row version for compare-and-set,
and the continuity mark of the last consumed line.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("syncd_records") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", sa.Float))
        # rows written before versions existed are version 1, as if inserted now
        batch.add_column(sa.Column("version", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("tail", sa.String(80)))


def downgrade() -> None:
    with op.batch_alter_table("syncd_records") as batch:
        for column in ("tail", "version", "next_attempt_at", "attempts"):
            batch.drop_column(column)
