"""A fresh SQLite store appears complete or not at all: readers and SIGKILLs never see less."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from daemon_helpers import SYNCD
from helpers import line, started, write_record

from syncd.store_schema import NEW_STORE_MARK, inspect_store

pytestmark = pytest.mark.slow


def schema_of(db: Path) -> str | None:
    """The store's alembic revision if it is complete, None if it has no tables; raises
    AssertionError for a half-made store."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return None
        assert "alembic_version" in tables, f"half-made store: {sorted(tables)}"
        [(revision,)] = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        return str(revision)
    finally:
        conn.close()


def start_backfill(workdir: Path, db: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACK"))}
    return subprocess.Popen(
        [SYNCD, "backfill", "runs", "--tracking-uri", f"sqlite:///{db}", "--log-format", "json"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture
def runs(workdir: Path) -> Path:
    write_record(workdir / "runs" / "r", [started("r1"), line(1, "metrics", metrics={"loss": 1.0})])
    return workdir / "runs"


def test_a_reader_never_sees_a_half_made_store(workdir: Path, runs: Path) -> None:
    db = workdir / "store" / "mlflow.db"
    head = inspect_store(db).head
    proc = start_backfill(workdir, db)
    seen: list[str | None] = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if db.exists():
            seen.append(schema_of(db))  # asserts completeness
    assert proc.wait(60) == 0
    seen.append(schema_of(db))
    assert seen and set(seen) == {head}
    assert not list(db.parent.glob(f".mlflow.db{NEW_STORE_MARK}*"))


def test_kills_during_store_creation_leave_no_store_or_a_complete_one(
    workdir: Path, runs: Path
) -> None:
    rng = random.Random(1401)
    db = workdir / "store" / "mlflow.db"
    head = inspect_store(db).head
    for attempt in range(5):
        proc = start_backfill(workdir, db)
        time.sleep(rng.uniform(0.5, 4.0))  # a random point of the run, not a wait for state
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if db.exists():
            assert schema_of(db) == head, f"attempt {attempt} (seed 1401)"
        if db.exists() and attempt >= 2:
            db.unlink()  # start over: kill creation again
            shutil.rmtree(workdir / ".syncd", ignore_errors=True)  # with a ledger to match
    proc = start_backfill(workdir, db)
    assert proc.wait(120) == 0
    assert schema_of(db) == head
    assert not list(db.parent.glob(f".mlflow.db{NEW_STORE_MARK}*"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    [run] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.data.tags["syncd.record_id"] == "r1"
