"""Run-creation intents: the records some worker may have created an MLflow run for.

A worker notes the intent, fenced by the record's lease, before it creates the
record's run. A record with no intent has never had a run created through this
ledger, so in an experiment this very process created (one that held no run
before) the adoption search by ``syncd.record_id`` can be skipped: nobody can
have made a run for it there. Intents outlive ``resync`` and replaced records on
purpose: the run they announce may still exist.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "syncd_run_intents",
        sa.Column("sink", sa.String(512), primary_key=True),
        sa.Column("record_id", sa.String(128), primary_key=True),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("syncd_run_intents")
