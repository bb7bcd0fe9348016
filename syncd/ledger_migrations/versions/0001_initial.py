"""The first ledger schema: records, runs, artifacts, errors, sync events, extensions.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "syncd_records",
        sa.Column("sink", sa.String(512), primary_key=True),
        sa.Column("source", sa.String(2048), primary_key=True),
        sa.Column("record_id", sa.String(128)),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("skipped", sa.Integer, nullable=False),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error_count", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("last_sync_at", sa.Float),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "syncd_runs",
        sa.Column("sink", sa.String(512), primary_key=True),
        sa.Column("record_id", sa.String(128), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("experiment_id", sa.String(64), nullable=False),
        sa.Column("parent_record_id", sa.String(128)),
        sa.Column("parent_linked", sa.Boolean, nullable=False),
    )
    op.create_table(
        "syncd_artifacts",
        sa.Column("sink", sa.String(512), primary_key=True),
        sa.Column("record_id", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(1024), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("uploaded_at", sa.Float, nullable=False),
    )
    op.create_table(
        "syncd_record_errors",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sink", sa.String(512), nullable=False),
        sa.Column("source", sa.String(2048), nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("seq", sa.Integer),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_syncd_records_record_id", "syncd_records", ["record_id"])
    op.create_index("ix_syncd_runs_parent_record_id", "syncd_runs", ["parent_record_id"])
    op.create_index("ix_syncd_record_errors_source", "syncd_record_errors", ["sink", "source"])
    op.create_table(
        "syncd_sync_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("sink", sa.String(512), nullable=False),
        sa.Column("source", sa.String(2048), nullable=False),
        sa.Column("record_id", sa.String(128)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("first_seq", sa.Integer),
        sa.Column("last_seq", sa.Integer),
        sa.Column("events", sa.Integer, nullable=False),
        sa.Column("metric_points", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_syncd_sync_events_at", "syncd_sync_events", ["at"])
    op.create_table(
        "syncd_extension_events",
        sa.Column("sink", sa.String(512), primary_key=True),
        sa.Column("source", sa.String(2048), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_table(
        "syncd_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "syncd_meta",
        "syncd_extension_events",
        "syncd_sync_events",
        "syncd_record_errors",
        "syncd_artifacts",
        "syncd_runs",
        "syncd_records",
    ):
        op.drop_table(table)
