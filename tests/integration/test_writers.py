"""Parallel writers: distinct records at once over HTTP, one writer for a SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import history, line, runs_by_record, started, write_record
from mlflow_server import MlflowServerProcess, unique_experiment

from syncd.backfill import backfill, open_ledger
from syncd.config import load_config
from syncd.engine import Engine
from syncd.errors import LedgerError
from syncd.ledger import Lease, Ledger, Progress
from syncd.sink import MlflowSink
from syncd.sources.local import LocalRecord
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


class BindingLostOnce(Ledger):
    """A real ledger that fails the first commit of a run binding (after MLflow made the run)."""

    failed = False

    def commit(self, progress: Progress, lease: Lease | None = None) -> None:
        if progress.kind == "bound" and not self.failed:
            self.failed = True
            raise LedgerError("injected: the binding's commit failed")
        super().commit(progress, lease)


def test_writers_search_for_a_record_s_run_only_where_one_may_exist(
    workdir: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers of one backfill share the experiments they created. A record that no
    writer ever set out to create a run for is not searched for in such an experiment
    (a new experiment holds no runs), but one whose run another writer created and could
    not bind is: it is adopted, never created twice. A daemon's writer always searches."""
    from mlflow.tracking import MlflowClient

    ledger = BindingLostOnce(f"sqlite:///{workdir / 'ledger.db'}", tracking_uri)
    created: set[str] = set()
    sinks = [MlflowSink(tracking_uri, created_experiments=created) for _ in range(2)]
    searches: list[str] = []
    for sink in sinks:
        real = sink.runs.find_run

        def counted(experiment_id: str, record_id: str, real: Any = real) -> Any:
            searches.append(record_id)
            return real(experiment_id, record_id)

        monkeypatch.setattr(sink.runs, "find_run", counted)
    a, b = (
        Engine(ledger, sink, worker=f"w{i}", trust_new_experiments=True)  # as backfill's
        for i, sink in enumerate(sinks)
    )
    paths = make_records(workdir / "runs", "fresh", 3)
    first, second, third = (LocalRecord(p) for p in paths)

    with pytest.raises(LedgerError):  # a ledger failure ends the pass, as it would the daemon's
        a.sync(first)  # after creating the experiment and the run: the binding is lost
    assert searches == []  # the first try: nobody can have made a run for it
    assert b.sync(first).state == "synced"  # the other writer retries it
    assert searches == ["fresh-r0"]  # a run may exist: it is searched for, and adopted
    assert b.sync(second).state == "synced"
    assert searches == ["fresh-r0"]  # a new record in a new experiment: no search
    # a daemon's writer outlives any pass: others may have made runs in its experiments
    daemon = Engine(ledger, sinks[0], worker="daemon")
    assert daemon.sync(third).state == "synced"
    assert searches == ["fresh-r0", "fresh-r2"]
    runs = runs_by_record(MlflowClient(tracking_uri))  # raises on a duplicate run
    assert sorted(runs) == ["fresh-r0", "fresh-r1", "fresh-r2"]
    points = history(MlflowClient(tracking_uri), runs["fresh-r0"].info.run_id, "loss")
    assert [value for _step, _ts, value in points] == [s / 10 for s in range(1, POINTS + 1)]
    ledger.close()


def test_batches_sent_to_a_tracking_server_land_as_the_client_would_write_them(
    workdir: Path, mlflow_server: MlflowServerProcess
) -> None:
    """Over HTTP, batches go out as JSON built by syncd (see syncd.sink.rest_batch): the
    server must hold what MlflowClient would have written, non-finite values included, and
    a line that cannot be written is reported with its line while the rest lands."""
    import math

    from mlflow.tracking import MlflowClient

    experiment = unique_experiment("rest-batch")
    values = [0.5, math.nan, math.inf, -math.inf, -0.0, 1e308, 123456789.125]
    lines = [started(f"{experiment}-r", experiment, run_name="r", tags={"team": "é ✓"})]
    lines.append(line(1, "params", params={"lr": 0.01, "opt": "adam"}))
    for step, value in enumerate(values):
        spelled = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
        metric = value if math.isfinite(value) else spelled[str(value)]
        lines.append(line(2 + step, "metrics", step=step, metrics={"v": metric}))
    lines.append(line(2 + len(values), "tags", tags={"stage": "fit"}))
    lines.append(line(3 + len(values), "params", params={"lr": 0.02}))  # params are write-once
    lines.append(line(4 + len(values), "run_finished", status="FINISHED"))
    write_record(workdir / "runs" / "r", lines)
    settings = load_config(
        None,
        overrides={
            "roots": [str(workdir / "runs")],
            "tracking_uri": mlflow_server.uri,
            "state_dir": str(workdir / ".syncd"),
        },
        env={},
    )
    summary = backfill(settings)
    assert summary.with_errors == 1 and summary.metric_points == len(values)
    [error] = summary.errors  # the changed param: reported, the rest of the record lands
    assert error["line"] == len(values) + 4 and "cannot change" in error["reason"], error

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    [run] = runs_by_record(client, [experiment]).values()
    assert run.data.params == {"lr": "0.01", "opt": "adam"}
    assert run.data.tags["team"] == "é ✓" and run.data.tags["stage"] == "fit"
    # the same points written by MlflowClient itself (the SQL store keeps +-inf as +-max)
    from mlflow.entities import Metric

    by_client = client.create_run(run.info.experiment_id).info.run_id
    mirrored = history(client, run.info.run_id, "v")
    client.log_batch(
        by_client,
        metrics=[
            Metric("v", v, ts, step) for v, (step, ts, _) in zip(values, mirrored, strict=True)
        ],
    )
    got = [(s, "NaN" if v != v else v) for s, _ts, v in history(client, run.info.run_id, "v")]
    want = [(s, "NaN" if v != v else v) for s, _ts, v in history(client, by_client, "v")]
    assert got == want and len(got) == len(values)
    assert run.info.status == "FINISHED"
