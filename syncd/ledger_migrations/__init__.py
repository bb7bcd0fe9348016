"""Alembic migrations of the ledger schema (version table ``syncd_alembic_version``)."""
