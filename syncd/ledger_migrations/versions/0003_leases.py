"""Per-record leases: which worker projects a record, until when; and which worker
wrote each sync event.

A table of its own rather than columns on ``syncd_records``: a record's row is
deleted and inserted again when its file is replaced or resynced, and the lease
must outlive that; the row's ``version`` (compare-and-set) stays untouched by
lease renewals.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "syncd_leases",
        sa.Column("sink", sa.String(512), primary_key=True),
        sa.Column("source", sa.String(2048), primary_key=True),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),  # epoch seconds, database clock
        sa.Column("acquired_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("syncd_sync_events") as batch:
        batch.add_column(sa.Column("worker", sa.String(256)))


def downgrade() -> None:
    with op.batch_alter_table("syncd_sync_events") as batch:
        batch.drop_column("worker")
    op.drop_table("syncd_leases")
