"""The ledger schema on a real PostgreSQL (a fleet shares one); skipped where none answers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import EXAMPLES, line, runs_by_record, started, write_record
from pg import throwaway_database

from syncd.backfill import backfill
from syncd.config import load_config
from syncd.errors import RecordError
from syncd.ledger import SYNCED, Ledger, Progress, RecordRow, RunRow

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    with throwaway_database() as url:
        yield url


def test_checkpoints_runs_errors_and_status_round_trip(pg_url: str) -> None:
    ledger = Ledger(pg_url, "sqlite:////srv/mlflow.db")
    row = RecordRow(
        source="file:///runs/a/run_record.jsonl",
        record_id="a1",
        offset=120,
        line=3,
        seq=2,
        fingerprint="f" * 32,
        state=SYNCED,
        size=120,
        mtime_ns=5,
    )
    ledger.commit(
        Progress(
            record=row,
            kind="applied",
            run=RunRow("a1", "run123", "7", parent_record_id="p1"),
            errors=[RecordError("bad", path="x", line=2, seq=1)],
            artifacts={"model.txt -> .": "d" * 64},
            extensions=[(2, "x-note", "{}")],
            events=3,
        )
    )
    # upserts: the same keys again must update, not collide
    row.offset, row.seq = 200, 4
    ledger.commit(
        Progress(
            record=row,
            kind="applied",
            run=RunRow("a1", "run123", "7", "p1", True),
            artifacts={"model.txt -> .": "e" * 64},
            extensions=[(2, "x-note", "{}")],
        )
    )
    again = Ledger(pg_url, "sqlite:////srv/mlflow.db")  # a second host opening the same schema
    got = again.get_record(row.source)
    assert got is not None and (got.offset, got.seq, got.error_count) == (200, 4, 1)
    run = again.get_run("a1")
    assert run is not None and run.parent_linked
    assert again.artifact_digests("a1") == {"model.txt -> .": "e" * 64}
    assert again.errors_of(row.source) == [(2, 1, "bad")]
    assert again.summary()["records"]["synced"] == 1
    assert [e["kind"] for e in again.recent_events()] == ["applied", "applied"]
    # rows are per sink: another tracking URI sees nothing
    assert Ledger(pg_url, "http://mlflow:5000").all_records() == {}
    ledger.close()
    again.close()


def test_backfill_with_a_postgres_ledger(
    pg_url: str, workdir: Path, tracking_uri: str, client
) -> None:
    root = workdir / "runs"
    shutil.copytree(EXAMPLES, root)
    write_record(root / "bad", [started("badpg"), "{x\n", line(2, "metrics", metrics={"a": 1})])
    settings = load_config(
        None,
        overrides={"roots": [str(root)], "tracking_uri": tracking_uri, "ledger_url": pg_url},
        env={},
    )
    first = backfill(settings)
    assert first.records == 8 and first.synced == 7 and first.with_errors == 1
    second = backfill(settings)
    assert second.unchanged == 8 and second.events == 0
    assert len(runs_by_record(client)) == 8


def test_many_processes_opening_a_fresh_ledger_at_once_all_succeed(pg_url: str) -> None:
    """Schema creation runs under an advisory lock: no UniqueViolation on pg_type."""
    import subprocess
    import sys

    code = (
        "import sys; from syncd.ledger import Ledger; "
        "Ledger(sys.argv[1], 'sink').close(); print('ok')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, pg_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], results
