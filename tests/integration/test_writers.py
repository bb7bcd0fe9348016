"""Parallel writers: distinct records at once over HTTP, one writer for a SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import history, line, runs_by_record, started, write_record
from mlflow_server import MlflowServerProcess, unique_experiment

from syncd.backfill import backfill, open_ledger
from syncd.config import load_config
from syncd.writers import writer_count

POINTS = 40


def make_records(root: Path, experiment: str, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        lines = [started(f"{experiment}-r{i}", experiment)]
        lines += [
            line(s, "metrics", step=s, metrics={"loss": s / 10}) for s in range(1, POINTS + 1)
        ]
        lines.append(line(POINTS + 1, "run_finished", status="FINISHED"))
        paths.append(write_record(root / f"r{i}", lines))
    return paths


def writers_per_record(settings: Any, paths: list[Path]) -> dict[str, set[str]]:
    ledger = open_ledger(settings)
    assert ledger is not None
    try:
        return {
            p.parent.name: {
                e["worker"] for e in ledger.events_of(p.as_uri()) if e["kind"] == "applied"
            }
            for p in paths
        }
    finally:
        ledger.close()


def test_writer_count_follows_the_store() -> None:
    assert writer_count("sqlite:////srv/mlflow.db", 8) == 1
    assert writer_count("file:///srv/mlruns", 8) == 1
    assert writer_count("http://mlflow:5000", 8) == 8
    assert writer_count("postgresql+psycopg://u@db/mlflow", 3) == 3


@pytest.mark.slow
def test_backfill_over_http_writes_distinct_records_in_parallel(
    workdir: Path, mlflow_server: MlflowServerProcess
) -> None:
    from mlflow.tracking import MlflowClient

    experiment = unique_experiment("writers")
    root = workdir / "runs"
    paths = make_records(root, experiment, 12)
    settings = load_config(
        None,
        overrides={
            "roots": [str(root)],
            "tracking_uri": mlflow_server.uri,
            "state_dir": str(workdir / ".syncd"),
            "writer": {"concurrency": 4},
        },
        env={},
    )
    summary = backfill(settings)
    assert summary.clean and summary.synced == 12, summary
    assert summary.metric_points == 12 * POINTS

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = runs_by_record(client, [experiment])  # a duplicate run fails here
    assert sorted(runs) == sorted(f"{experiment}-r{i}" for i in range(12))
    for run in runs.values():
        assert len(history(client, run.info.run_id, "loss")) == POINTS
        assert run.info.status == "FINISHED"
    workers = writers_per_record(settings, paths)
    # one writer per record (one record in order), several writers over the pass
    assert all(len(w) == 1 for w in workers.values()), workers
    assert len(set().union(*workers.values())) > 1, workers
    again = backfill(settings)
    assert again.unchanged == 12 and again.events == 0


def test_a_sqlite_store_keeps_one_writer(workdir: Path, tracking_uri: str) -> None:
    root = workdir / "runs"
    paths = make_records(root, "one-writer", 6)
    settings = load_config(
        None,
        overrides={
            "roots": [str(root)],
            "tracking_uri": tracking_uri,
            "state_dir": str(workdir / ".syncd"),
            "writer": {"concurrency": 4},
        },
        env={},
    )
    summary = backfill(settings)
    assert summary.clean and summary.synced == 6
    workers = writers_per_record(settings, paths)
    assert len(set().union(*workers.values())) == 1, workers
