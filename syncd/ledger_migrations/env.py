"""Alembic environment: always run programmatically by ``syncd.ledger`` on a given connection."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=None,
    version_table="syncd_alembic_version",  # never MLflow's alembic_version in a shared database
    render_as_batch=True,  # SQLite: ALTERs through table copies where needed
)
with context.begin_transaction():
    context.run_migrations()
