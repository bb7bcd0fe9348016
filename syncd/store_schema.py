"""The schema guard of a SQLite MLflow store: never open a store syncd's MLflow does not know.

MLflow upgrades a store's schema implicitly when it opens one whose tables are
incomplete, without a backup, and a newer MLflow that opened syncd's store
leaves a schema the installed one refuses (there is no downgrade). So before
the first write syncd compares the store's alembic revision with the head of
the MLflow it runs on:

- the same: go on;
- older (a revision MLflow knows): stop and say how to upgrade it
  (``syncd backfill --upgrade-store`` makes a backup first);
- unknown (written by a newer MLflow): stop and name both versions.

A fresh store is created atomically (:func:`create_store`): MLflow's first
migration runs in a temporary file beside the target, under syncd's store
lock, and the finished file is linked into place. A kill at any moment leaves
either no store or a complete one, and no reader ever sees a half-made schema.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from syncd.errors import TransientSinkError
from syncd.pids import alive


class StoreSchemaError(TransientSinkError):
    """The store's schema is not the one syncd's MLflow writes; retried until it is fixed."""


@dataclass(frozen=True, slots=True)
class SchemaState:
    path: Path
    current: str | None  # None: a fresh store (no tables)
    head: str
    known: bool  # ``current`` is a revision of the installed MLflow

    @property
    def matches(self) -> bool:
        return self.current is None or self.current == self.head


def mlflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("mlflow", "mlflow-skinny"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


def _migrations() -> object:
    import importlib.util

    from alembic.script import ScriptDirectory

    # Found without importing mlflow (a second of start-up the check does not need).
    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        raise StoreSchemaError("MLflow is not installed: cannot check the store's schema")
    package = Path(next(iter(spec.submodule_search_locations)))
    return ScriptDirectory(str(package / "store" / "db_migrations"))


def inspect_store(path: Path) -> SchemaState:
    """The store's revision against the installed MLflow's head (read-only)."""
    script = _migrations()
    heads = script.get_heads()  # type: ignore[attr-defined]
    head = str(heads[0]) if heads else ""
    if not path.exists() or path.stat().st_size == 0:
        return SchemaState(path, None, head, True)
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if not tables - {"alembic_version"}:
                return SchemaState(path, None, head, True)
            if "alembic_version" not in tables:
                raise StoreSchemaError(
                    f"{path} holds tables but no alembic_version: it is not an MLflow store"
                )
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreSchemaError(f"cannot read the MLflow store {path}: {exc}") from exc
    current = str(row[0]) if row else ""
    try:
        known = script.get_revision(current) is not None  # type: ignore[attr-defined]
    except Exception:
        known = False
    return SchemaState(path, current, head, known)


def check_store(path: Path) -> SchemaState:
    """Raise StoreSchemaError unless the store at ``path`` is fresh or at MLflow's head."""
    state = inspect_store(path)
    if state.matches:
        return state
    ours = f"MLflow {mlflow_version()} (schema {state.head})"
    if state.known:
        raise StoreSchemaError(
            f"the MLflow store {path} has the older schema {state.current}; syncd writes"
            f" {ours} and never upgrades a store implicitly. Upgrade it with"
            f" 'syncd backfill --upgrade-store ...' (a backup copy is made first) or"
            f" 'mlflow db upgrade sqlite:///{path}' after a backup"
        )
    raise StoreSchemaError(
        f"the MLflow store {path} has schema {state.current}, written by a newer MLflow than"
        f" syncd's {ours}, which cannot open it (there is no downgrade). Install a syncd"
        " whose MLflow matches the one that upgraded the store, or restore the store from"
        " the backup taken before the upgrade"
    )


def upgrade_store(path: Path) -> Path | None:
    """Back the store up beside itself, then migrate it to MLflow's head.

    Returns the backup's path (None when nothing needed doing). The caller holds
    the store's interprocess lock.
    """
    state = inspect_store(path)
    if state.matches:
        return None
    if not state.known:
        check_store(path)  # raises: a newer store cannot be migrated back
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.backup-{state.current}-{stamp}")
    source = sqlite3.connect(path, timeout=30)
    try:
        target = sqlite3.connect(backup)
        try:
            source.backup(target)  # a consistent copy, even with readers attached
        finally:
            target.close()
    finally:
        source.close()
    import sqlalchemy

    try:
        from mlflow.store.db.utils import _upgrade_db
    except ImportError as exc:  # pragma: no cover - depends on the MLflow release
        raise StoreSchemaError(
            f"this MLflow cannot upgrade stores itself: run 'mlflow db upgrade sqlite:///{path}'"
            f" (backup made at {backup})"
        ) from exc

    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        _upgrade_db(engine)  # type: ignore[no-untyped-call]
    finally:
        engine.dispose()
    return backup


NEW_STORE_MARK = ".syncd-new-"


def create_store(path: Path) -> bool:
    """Create a complete store at ``path`` if there is none; False when one exists.

    The caller holds the store's interprocess lock. The schema is built in
    ``.<name>.syncd-new-<pid>`` beside the target, flushed to disk, then linked
    to the target name (``link`` never replaces a store someone else made).
    """
    if path.exists() and path.stat().st_size > 0:
        return False
    clean_stale_new_stores(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{NEW_STORE_MARK}{os.getpid()}")
    tmp.unlink(missing_ok=True)
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)  # type: ignore[no-untyped-call]
    finally:
        engine.dispose()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if path.exists() and path.stat().st_size == 0:
        path.unlink()  # an empty file is no store (a touch, or sqlite3 opened it)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def clean_stale_new_stores(path: Path) -> int:
    """Remove half-made stores of processes that died while creating one."""
    removed = 0
    prefix = f".{path.name}{NEW_STORE_MARK}"
    for leftover in path.parent.glob(f"{prefix}*"):  # the file and its -journal / -wal
        pid = leftover.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and pid != str(os.getpid()) and not alive(int(pid)):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed
