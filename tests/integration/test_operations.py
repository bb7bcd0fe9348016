"""Operator tasks against real SQLite MLflow stores: containment, resync, status, artifact root."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import run_syncd as _run_syncd
from helpers import artifact_files, history, line, run_backfill, runs_by_record, started
from helpers import write_record as write

import syncd.engine
from syncd.ledger import FAILED, SYNCED, Ledger


def run_syncd(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    done = _run_syncd(*args, cwd=cwd or Path.cwd())
    return done.returncode, done.stdout, done.stderr


def metric_lines(first_seq: int, steps: range) -> list[str]:
    return [
        line(first_seq + i, "metrics", step=step, metrics={"loss": 1.0 / (step + 1)})
        for i, step in enumerate(steps)
    ]


def test_a_record_that_breaks_the_engine_fails_alone_and_is_retried(
    workdir: Path, tracking_uri: str, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = write(workdir / "runs" / "a_bad", [started("bad"), *metric_lines(1, range(3))])
    write(workdir / "runs" / "b_good", [started("good"), *metric_lines(1, range(3))])
    real_plan = syncd.engine.plan_writes

    def plan_or_break(events: Any, **kw: Any) -> Any:
        if kw["path"] == str(bad):
            raise RecursionError("maximum recursion depth exceeded while decoding")
        return real_plan(events, **kw)

    monkeypatch.setattr(syncd.engine, "plan_writes", plan_or_break)
    summary = run_backfill(workdir / "runs", tracking_uri)
    assert (summary.synced, summary.failed) == (1, 1)
    assert not summary.clean
    [err] = summary.errors
    assert err["file"] == str(bad) and err["reason"].startswith("RecursionError")
    assert set(runs_by_record(client)) == {"good"}

    monkeypatch.setattr(syncd.engine, "plan_writes", real_plan)
    summary = run_backfill(workdir / "runs", tracking_uri)  # the file did not change
    assert summary.synced == 2 and summary.failed == 0 and summary.clean
    runs = runs_by_record(client)
    assert len(history(client, runs["bad"].info.run_id, "loss")) == 3


def test_status_shows_every_sink_without_a_tracking_uri(
    workdir: Path, tracking_uri: str, mlflow_template: Path
) -> None:
    other_db = workdir / "other" / "mlflow.db"
    other_db.parent.mkdir()
    shutil.copy(mlflow_template, other_db)
    other_uri = f"sqlite:///{other_db}"
    write(workdir / "runs" / "r", [started("r1"), "{oops\n"])
    state = workdir / "state"
    for uri in (tracking_uri, other_uri):
        code, _, _ = run_syncd("backfill", "runs", "--tracking-uri", uri, "--state-dir", str(state))
        assert code == 1

    code, out, err = run_syncd("status", "--state-dir", str(state), "--json")
    assert code == 1, err
    report = json.loads(out)
    assert sorted(s["sink"] for s in report["sinks"]) == sorted([tracking_uri, other_uri])
    for sink in report["sinks"]:
        assert sink["records"]["error"] == 1
        assert sink["records_with_errors"][0]["errors"][0]["line"] == 2

    code, out, _ = run_syncd("status", "--state-dir", str(state))
    assert out.count("line 2: invalid JSON") == 2 and other_uri in out and tracking_uri in out

    code, out, _ = run_syncd(
        "status", "--state-dir", str(state), "--tracking-uri", other_uri, "--json"
    )
    report = json.loads(out)
    assert [s["sink"] for s in report["sinks"]] == [other_uri] and report["sink"] == other_uri


def test_resync_after_an_mlflow_restore_brings_back_what_was_lost(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    run_dir = workdir / "runs" / "r"
    (run_dir / "report.txt").parent.mkdir(parents=True)
    (run_dir / "report.txt").write_text("final report\n")
    path = write(run_dir, [started("r1"), *metric_lines(1, range(5))])
    run_backfill(workdir / "runs", tracking_uri)
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    backup = workdir / "backup.db"
    shutil.copy(db, backup)  # the backup holds the run and 5 points

    write(
        run_dir,
        [
            *metric_lines(6, range(5, 10)),
            line(11, "artifact", path="report.txt"),
            line(12, "run_finished", status="FINISHED"),
        ],
        mode="a",
    )
    run_backfill(workdir / "runs", tracking_uri)
    run_id = runs_by_record(client)["r1"].info.run_id
    expected = history(client, run_id, "loss")
    assert len(expected) == 10

    shutil.copy(backup, db)  # MLflow restored from the backup: 5 points, no artifact
    assert len(history(client, run_id, "loss")) == 5
    run_backfill(workdir / "runs", tracking_uri)  # a plain pass trusts the ledger
    assert len(history(client, run_id, "loss")) == 5

    code, out, err = run_syncd(
        "resync", str(path), "--tracking-uri", tracking_uri, "--state-dir", str(workdir / ".syncd")
    )
    assert code == 0, out + err
    runs = runs_by_record(client)  # raises on a duplicate
    assert runs["r1"].info.run_id == run_id
    assert history(client, run_id, "loss") == expected
    assert runs["r1"].info.status == "FINISHED"
    assert artifact_files(client, run_id) == ["report.txt"]

    code, _, _ = run_syncd(  # again: idempotent
        "resync", "runs", "--tracking-uri", tracking_uri, "--state-dir", str(workdir / ".syncd")
    )
    assert code == 0
    assert history(client, run_id, "loss") == expected
    assert len(runs_by_record(client)) == 1


def test_artifacts_land_beside_the_sqlite_store_whatever_the_working_directory(
    workdir: Path, mlflow_template: Path, client: Any
) -> None:
    store = workdir / "data" / "mlflow.db"
    store.parent.mkdir()
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    run_dir = workdir / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "model.txt").write_text("weights\n")
    write(run_dir, [started("r1"), line(1, "artifact", path="model.txt")])

    code, _, err = run_syncd(
        "backfill",
        str(workdir / "runs"),
        "--tracking-uri",
        f"sqlite:///{store}",
        "--state-dir",
        str(workdir / "state"),
        "--log-format",
        "json",
        cwd=elsewhere,
    )
    assert code == 0, err
    assert not (elsewhere / "mlruns").exists()
    uploaded = list((store.parent / "mlartifacts").rglob("model.txt"))
    assert len(uploaded) == 1 and uploaded[0].read_text() == "weights\n"
    logged = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert any(
        e.get("event") == "artifact_root" and e["path"] == str(store.parent / "mlartifacts")
        for e in logged
    )
    from mlflow.tracking import MlflowClient

    mirror = MlflowClient(tracking_uri=f"sqlite:///{store}")
    [run] = mirror.search_runs([mirror.get_experiment_by_name("exp").experiment_id])
    assert artifact_files(mirror, run.info.run_id) == ["model.txt"]
    default = mirror.get_experiment("0")
    assert default.artifact_location.startswith(str(store.parent / "mlartifacts"))


def test_a_ledger_from_the_first_schema_is_upgraded_in_place(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    path = write(workdir / "runs" / "r", [started("r1"), *metric_lines(1, range(2))])
    run_backfill(workdir / "runs", tracking_uri)
    ledger_db = workdir / ".syncd" / "ledger.db"
    with sqlite3.connect(ledger_db) as conn:  # back to schema 1
        for column in ("attempts", "next_attempt_at", "version", "tail", "etag"):
            conn.execute(f'ALTER TABLE syncd_records DROP COLUMN "{column}"')
        conn.execute("DROP TABLE syncd_leases")  # added later too
        conn.execute("DROP TABLE syncd_run_intents")
        conn.execute('ALTER TABLE syncd_sync_events DROP COLUMN "worker"')
        conn.execute("DROP TABLE syncd_alembic_version")  # made before migrations existed

    write(path.parent, metric_lines(3, range(2, 4)), mode="a")
    summary = run_backfill(workdir / "runs", tracking_uri)
    assert summary.synced == 1 and summary.metric_points == 2
    ledger = Ledger(f"sqlite:///{ledger_db}", tracking_uri)
    row = ledger.get_record(path.as_uri())
    assert row is not None and row.state == SYNCED and row.version >= 2
    run_id = runs_by_record(client)["r1"].info.run_id
    assert len(history(client, run_id, "loss")) == 4


def test_a_failed_record_shows_in_status_with_its_reason(
    workdir: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(workdir / "runs" / "r", [started("r1")])

    def broken(*_a: Any, **_kw: Any) -> Any:
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(syncd.engine, "plan_writes", broken)
    summary = run_backfill(workdir / "runs", tracking_uri)
    assert summary.failed == 1
    ledger = Ledger(f"sqlite:///{workdir / '.syncd' / 'ledger.db'}", tracking_uri)
    [rec] = ledger.summary()["records_with_errors"]
    assert rec["source"] == path.as_uri() and rec["state"] == FAILED
    assert rec["reason"] == "MemoryError: cannot allocate" and rec["attempts"] == 1


def test_the_ledger_knows_its_newest_migration() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import syncd.ledger

    config = Config()
    config.set_main_option(
        "script_location", str(Path(syncd.ledger.__file__).parent / "ledger_migrations")
    )
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head == syncd.ledger.LEDGER_SCHEMA_HEAD
