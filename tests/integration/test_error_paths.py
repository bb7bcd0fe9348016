"""Error paths an operator meets: schema guard, missing roots, bad reloads, IPv6 health,
a record_id claimed twice, event retention, redaction. Real stores and processes."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import SYNCD, SyncdProcess, free_port, wait_for
from daemon_helpers import run_syncd as _run_syncd
from helpers import history, line, run_backfill, runs_by_record, started, write_record

from syncd.ledger import Ledger, sync_events
from syncd.logging import redact_text

NEWER_SCHEMA = "f4a9b2c7d1e6"  # MLflow 3.18's head: unknown to the MLflow syncd runs on


def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    done = _run_syncd(*args, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def set_revision(db: Path, revision: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def revision_of(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT version_num FROM alembic_version").fetchone()[0])


@pytest.fixture
def one_record(workdir: Path) -> Path:
    return write_record(
        workdir / "runs" / "r",
        [started("r1"), line(1, "metrics", step=0, metrics={"loss": 0.5})],
    )


def test_a_store_from_a_newer_mlflow_is_refused_and_left_untouched(
    workdir: Path, tracking_uri: str, one_record: Path
) -> None:
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    set_revision(db, NEWER_SCHEMA)
    before = db.read_bytes()
    code, out, err = cli("backfill", "runs", "--tracking-uri", tracking_uri, cwd=workdir)
    assert code == 2, out + err
    assert NEWER_SCHEMA in err and "newer MLflow" in err and "Traceback" not in err
    from syncd.store_schema import mlflow_version

    assert mlflow_version() in err
    assert db.read_bytes() == before


def test_an_older_store_is_upgraded_only_when_asked_with_a_backup_first(
    workdir: Path, tracking_uri: str, one_record: Path, client: Any
) -> None:
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    head = revision_of(db)
    config = _get_alembic_config(tracking_uri)
    command.downgrade(config, "-1")  # a real store of the previous MLflow schema
    older = revision_of(db)
    assert older != head

    code, _, err = cli("backfill", "runs", "--tracking-uri", tracking_uri, cwd=workdir)
    assert code == 2 and "older schema" in err and "--upgrade-store" in err
    assert revision_of(db) == older  # never upgraded implicitly

    code, out, err = cli(
        "backfill", "runs", "--tracking-uri", tracking_uri, "--upgrade-store", cwd=workdir
    )
    assert code == 0, out + err
    assert revision_of(db) == head
    [backup] = db.parent.glob("mlflow.db.backup-*")
    assert revision_of(backup) == older
    assert len(history(client, runs_by_record(client)["r1"].info.run_id, "loss")) == 1


def test_the_daemon_waits_not_ready_on_a_foreign_schema_and_recovers(
    workdir: Path, tracking_uri: str, one_record: Path, client: Any
) -> None:
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    head = revision_of(db)
    set_revision(db, NEWER_SCHEMA)
    proc = SyncdProcess(workdir, "runs", "--tracking-uri", tracking_uri)
    try:
        wait_for(
            lambda: (
                (r := proc.health("/readyz"))[0] == 503
                and any(NEWER_SCHEMA in x for x in r[1]["reasons"])
                and r
            ),
            60,
            what="not ready naming the schema",
        )
        assert proc.health("/healthz")[0] == 200  # alive: it retries
        set_revision(db, head)  # the operator restored the store
        wait_for(lambda: "r1" in runs_by_record(client), 90, what="the record after the fix")
        wait_for(lambda: proc.health("/readyz")[0] == 200, 30, what="ready again")
    finally:
        proc.stop()


def test_run_refuses_a_missing_root_unless_asked_to_create_it(
    workdir: Path, tracking_uri: str
) -> None:
    missing = workdir / "mnt" / "runs"
    code, _, err = cli(
        "run", str(missing), "--tracking-uri", tracking_uri, "--health-addr", "off", cwd=workdir
    )
    assert code == 2 and str(missing) in err and "create_roots" in err
    assert not missing.exists()

    proc = SyncdProcess(
        workdir, str(missing), "--tracking-uri", tracking_uri, env={"SYNCD_CREATE_ROOTS": "true"}
    )
    try:
        proc.wait_ready()
        assert missing.is_dir()
    finally:
        proc.stop()


def test_a_reload_that_cannot_open_its_ledger_keeps_the_running_one(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    root = workdir / "runs"
    root.mkdir()
    config = workdir / "syncd.yaml"
    config.write_text(f"roots: [{root}]\ntracking_uri: {tracking_uri}\n")
    proc = SyncdProcess(workdir, "--config", str(config))
    try:
        proc.wait_ready()
        config.write_text(
            f"roots: [{root}]\ntracking_uri: {tracking_uri}\n"
            "ledger_url: sqlite:////nonexistent-dir/ledger.db\n"
        )
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_rejected" in proc.logs(), 30, what="reload_rejected")
        assert proc.proc.poll() is None
        write_record(root / "after", [started("after")])
        wait_for(lambda: "after" in runs_by_record(client), 30, what="sync after the reload")
        assert proc.health("/readyz")[0] == 200
    finally:
        proc.stop()


def test_health_endpoint_on_ipv6(workdir: Path, tracking_uri: str) -> None:
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"cannot bind ::1 here: {exc}")
    (workdir / "runs").mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [SYNCD, "run", "runs", "--tracking-uri", tracking_uri, "--health-addr", f"[::1]:{port}"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import urllib.request

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://[::1]:{port}/readyz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(ready, 60, what="/readyz over IPv6")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_a_record_id_claimed_by_a_second_file_is_held_back_naming_both(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    first = write_record(
        workdir / "runs" / "a", [started("same"), line(1, "metrics", metrics={"m": 1.0})]
    )
    second = write_record(
        workdir / "runs" / "b", [started("same"), line(1, "metrics", metrics={"m": 2.0})]
    )
    summary = run_backfill(workdir / "runs", tracking_uri)
    assert summary.blocked == 1 and not summary.clean
    [err] = summary.errors
    assert err["file"] == str(second)
    assert str(first) in err["reason"] and "record_id same" in err["reason"]
    run_id = runs_by_record(client)["same"].info.run_id
    assert [p[2] for p in history(client, run_id, "m")] == [1.0]  # not merged

    shutil.rmtree(first.parent)  # the first file is gone: the second may take over
    write_record(second.parent, [line(2, "metrics", step=1, metrics={"m": 3.0})], mode="a")
    summary = run_backfill(workdir / "runs", tracking_uri)
    assert summary.blocked == 0
    assert len(runs_by_record(client)) == 1


def test_sync_events_are_pruned_after_their_retention(workdir: Path, tracking_uri: str) -> None:
    write_record(workdir / "runs" / "r", [started("r1")])
    run_backfill(workdir / "runs", tracking_uri)
    ledger = Ledger(f"sqlite:///{workdir / '.syncd' / 'ledger.db'}", tracking_uri)
    with ledger.engine.begin() as conn:
        conn.execute(sync_events.update().values(at=time.time() - 40 * 86400))
    write_record(workdir / "runs" / "r2", [started("r2")])
    run_backfill(workdir / "runs", tracking_uri)
    assert ledger.prune_events(time.time() - 30 * 86400) >= 1
    assert all(e["at"] > time.time() - 86400 for e in ledger.recent_events(100))
    assert ledger.recent_events(100)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql://app:p@ss@db:5432/ledger", "p@ss"),
        ("host=db user=app sslpassword=k3y password=hunter2", "k3y"),
        ("host=db user=app sslpassword=k3y password=hunter2", "hunter2"),
        ("GET /api?api_key=abc123&x=1", "abc123"),
        ("config api_key: 'zz-top'", "zz-top"),
        ("MLFLOW_TRACKING_TOKEN token=t0k3n", "t0k3n"),
    ],
)
def test_redaction_covers_passwords_with_at_signs_and_key_value_secrets(
    text: str, secret: str
) -> None:
    assert secret not in redact_text(text)


def test_redaction_keeps_what_is_not_a_secret() -> None:
    text = "max_tokens=512 user@example.com http://host/a@b run_id=abc"
    assert redact_text(text) == text


def test_errors_building_the_client_are_mapped_not_internal(
    workdir: Path, one_record: Path
) -> None:
    blocker = workdir / "not-a-dir"
    blocker.write_text("")
    code, out, err = cli(
        "backfill", "runs", "--tracking-uri", f"sqlite:///{blocker}/mlflow.db", cwd=workdir
    )
    assert code != 0
    assert "internal error" not in err and "Traceback" not in err
    report = json.dumps([out, err])
    assert "mlflow.db" in report
