"""The ETag of an S3 record object as its own column.

Until schema 3, an S3 object's ETag was folded into ``mtime_ns`` (a number
derived from it in the sub-second part). From schema 4 ``mtime_ns`` holds
LastModified alone and ``etag`` the ETag; ``etag`` stays NULL for local files.
Rows written before keep their folded ``mtime_ns`` and no ETag: each S3 record
is looked at once more after the upgrade (its synced prefix checked, nothing
written twice) and settled with the new columns.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("syncd_records") as batch:
        batch.add_column(sa.Column("etag", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("syncd_records") as batch:
        batch.drop_column("etag")
