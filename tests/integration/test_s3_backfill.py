"""Backfill from s3:// roots, against moto's server (a real HTTP S3 endpoint).

Runs are read back with MlflowClient from a real SQLite store. S3 requests are
counted with a botocore hook on syncd's own client.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import artifact_files, history, line, runs_by_record, started, write_record
from moto_s3 import Bucket, count_calls

from syncd.backfill import Summary, backfill
from syncd.config import Root, load_config
from syncd.ledger import LEDGER_SCHEMA_HEAD
from syncd.sources.s3 import client_for


def settings_for(roots: list[Any], tracking_uri: str, workdir: Path, **extra: Any) -> Any:
    return load_config(
        None,
        overrides={
            "roots": roots,
            "tracking_uri": tracking_uri,
            "state_dir": str(workdir / ".syncd"),
            **extra,
        },
        env={},
    )


def sync(roots: list[Any], tracking_uri: str, workdir: Path) -> Summary:
    return backfill(settings_for(roots, tracking_uri, workdir))


def record_text(record_id: str, steps: range, *, finished: bool = False, **kw: Any) -> str:
    lines = [started(record_id, experiment="s3exp", **kw)]
    for step in steps:
        lines.append(line(len(lines), "metrics", metrics={"loss": 1.0 / (step + 1)}, step=step))
    if finished:
        lines.append(line(len(lines), "run_finished", status="FINISHED"))
    return "".join(lines)


def syncd_client(bucket: Bucket) -> Any:
    return client_for(Root(path=bucket.uri("runs")), 30.0)


def get_ranges(client: Any) -> list[tuple[int, int]]:
    """Byte ranges of every GetObject the client sends from now on."""
    ranges: list[tuple[int, int]] = []

    def hook(params: dict[str, Any], **_kw: Any) -> None:
        first, _, last = str(params.get("Range", "bytes=0-")).removeprefix("bytes=").partition("-")
        ranges.append((int(first), int(last) if last else -1))

    client.meta.events.register("provide-client-params.s3.GetObject", hook)
    return ranges


def test_backfill_from_s3_with_artifacts_mixed_with_a_local_root(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    bucket.put("runs/a/run_record.jsonl", record_text("rec-a", range(5), finished=True))
    art = [
        line(1, "artifact", path="model.bin"),
        line(2, "artifact", path="reports", artifact_path="reports"),
    ]
    bucket.put("runs/b/run_record.jsonl", started("rec-b", experiment="s3exp") + "".join(art))
    bucket.put("runs/b/model.bin", b"weights")
    bucket.put("runs/b/reports/index.html", b"<html/>")
    bucket.put("runs/b/reports/img/plot.png", b"png")
    bucket.put("elsewhere/run_record.jsonl", record_text("rec-outside", range(1)))
    write_record(workdir / "local" / "c", [started("rec-c", experiment="s3exp")])

    summary = sync([bucket.uri("runs"), str(workdir / "local")], tracking_uri, workdir)

    assert summary.clean, summary.errors
    assert summary.records == 3 and summary.synced == 3
    runs = runs_by_record(client)
    assert set(runs) == {"rec-a", "rec-b", "rec-c"}
    a = runs["rec-a"]
    assert a.info.status == "FINISHED"
    assert [v for _s, _t, v in history(client, a.info.run_id, "loss")] == [
        1.0 / (s + 1) for s in range(5)
    ]
    assert a.data.tags["syncd.source"] == f"s3://{bucket.name}/runs/a/run_record.jsonl"
    assert artifact_files(client, runs["rec-b"].info.run_id) == [
        "model.bin",
        "reports/img/plot.png",
        "reports/index.html",
    ]
    assert summary.artifacts == 2


def test_unchanged_objects_are_skipped_without_a_get(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    for n in range(3):
        bucket.put(f"runs/{n}/run_record.jsonl", record_text(f"rec-{n}", range(3)))
    assert sync([bucket.uri("runs")], tracking_uri, workdir).synced == 3
    calls = count_calls(syncd_client(bucket))
    again = sync([bucket.uri("runs")], tracking_uri, workdir)
    assert again.unchanged == 3 and again.clean
    assert calls == {"ListObjectsV2": 1}


def test_growth_by_reupload_fetches_only_the_new_bytes(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    key = "runs/g/run_record.jsonl"
    first = record_text("rec-g", range(3000))  # ~200 KB: bigger than the first-line check
    bucket.put(key, first)
    sync([bucket.uri("runs")], tracking_uri, workdir)
    grown = first + "".join(
        line(3001 + i, "metrics", metrics={"loss": 0.5}, step=3000 + i) for i in range(10)
    )
    bucket.put(key, grown)
    ranges = get_ranges(syncd_client(bucket))

    summary = sync([bucket.uri("runs")], tracking_uri, workdir)

    assert summary.clean and summary.metric_points == 10
    old = len(first.encode())
    fetched = sum(last - start + 1 for start, last in ranges)
    new_reads = [(s, e) for s, e in ranges if s >= old]
    assert new_reads and sum(e - s + 1 for s, e in new_reads) >= len(grown) - old
    # Beyond the new bytes: only the continuity checks (first line, the last line's tail).
    assert fetched - (len(grown.encode()) - old) <= 64 * 1024 + 4096 + 1
    assert fetched < old
    run = runs_by_record(client)["rec-g"]
    assert len(history(client, run.info.run_id, "loss")) == 3010


def test_partial_last_line_waits_for_the_next_upload(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    key = "runs/p/run_record.jsonl"
    text = record_text("rec-p", range(2))
    partial = line(3, "metrics", metrics={"loss": 9.0}, step=9)
    bucket.put(key, text + partial[:20])
    assert sync([bucket.uri("runs")], tracking_uri, workdir).metric_points == 2
    bucket.put(key, text + partial)
    assert sync([bucket.uri("runs")], tracking_uri, workdir).metric_points == 1
    run = runs_by_record(client)["rec-p"]
    assert [s for s, _t, _v in history(client, run.info.run_id, "loss")] == [0, 1, 9]


def test_replaced_object_is_projected_again_from_the_start(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path, capsys: Any
) -> None:
    key = "runs/r/run_record.jsonl"
    bucket.put(key, record_text("rec-old", range(4)))
    sync([bucket.uri("runs")], tracking_uri, workdir)
    bucket.put(key, record_text("rec-new", range(2), finished=True))

    summary = sync([bucket.uri("runs")], tracking_uri, workdir)

    assert summary.clean and summary.metric_points == 2
    runs = runs_by_record(client)
    assert set(runs) == {"rec-old", "rec-new"}
    assert runs["rec-new"].info.status == "FINISHED"
    assert len(history(client, runs["rec-new"].info.run_id, "loss")) == 2
    assert len(history(client, runs["rec-old"].info.run_id, "loss")) == 4
    captured = capsys.readouterr()
    assert "record_replaced" in captured.out + captured.err
    # A replay of the same object changes nothing.
    assert sync([bucket.uri("runs")], tracking_uri, workdir).unchanged == 1


def test_artifact_key_outside_the_run_prefix_is_refused_and_reported(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    bucket.put("runs/other/secret.txt", b"secret")
    text = started("rec-x", experiment="s3exp") + line(1, "artifact", path="../other/secret.txt")
    bucket.put("runs/x/run_record.jsonl", text + line(2, "artifact", path="/etc/passwd"))

    summary = sync([bucket.uri("runs")], tracking_uri, workdir)

    assert summary.with_errors == 1
    reasons = {(e["line"], e["reason"]) for e in summary.errors}
    assert any(n == 2 and "leaves the run directory" in r for n, r in reasons), reasons
    assert any(n == 3 and "absolute" in r for n, r in reasons), reasons
    assert artifact_files(client, runs_by_record(client)["rec-x"].info.run_id) == []


@pytest.mark.slow
def test_poll_over_a_thousand_objects_gets_nothing(
    bucket: Bucket, tracking_uri: str, workdir: Path
) -> None:
    # 1,000 record objects: a few full records, the rest with no complete line yet
    # (so the first pass is quick); the second pass must cost one LIST and no GET.
    for n in range(1000):
        body = record_text(f"rec-{n}", range(1)) if n < 5 else '{"v":1,"seq":0,"ty'
        bucket.put(f"runs/{n:04d}/run_record.jsonl", body)
    first = sync([bucket.uri("runs")], tracking_uri, workdir)
    assert first.records == 1000 and first.synced == 5 and first.pending == 995
    calls = count_calls(syncd_client(bucket))

    again = sync([bucket.uri("runs")], tracking_uri, workdir)

    assert again.unchanged == 1000
    assert calls == {"ListObjectsV2": 1}


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        ("missing-bucket", "the bucket does not exist"),
        ("bad-endpoint", "endpoint unreachable"),
    ],
)
def test_a_failing_s3_root_is_named_and_other_roots_still_sync(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path, make: str, expected: str
) -> None:
    write_record(workdir / "local" / "c", [started("rec-c", experiment="s3exp")])
    if make == "missing-bucket":
        broken: Any = "s3://no-such-bucket-here/runs"
    else:
        broken = {"path": bucket.uri("runs"), "endpoint_url": "http://127.0.0.1:9"}
    settings = settings_for(
        [broken, str(workdir / "local")], tracking_uri, workdir, **{"timeouts.http": 2}
    )

    summary = backfill(settings)

    assert summary.roots_failed == 1 and not summary.clean
    [err] = summary.errors
    assert err["file"].startswith("s3://") and expected in err["reason"]
    assert set(runs_by_record(client)) == {"rec-c"}


def test_bad_credentials_are_reported_for_the_root(
    tracking_uri: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto_s3 import CLEARED, MotoServer

    from syncd.sources.s3 import forget_clients

    # A moto server that checks credentials: the test keys are unknown to its IAM.
    strict = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    strict.start()
    try:
        for name in CLEARED:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        forget_clients()
        settings = settings_for(
            [{"path": "s3://some-bucket/runs", "endpoint_url": strict.url}], tracking_uri, workdir
        )
        summary = backfill(settings)
    finally:
        strict.stop()
        forget_clients()
    [err] = summary.errors
    assert summary.roots_failed == 1
    assert "s3://some-bucket/runs" in err["reason"]
    assert "access key" in err["reason"] or "access denied" in err["reason"], err
    assert "wrong" not in json.dumps(summary.as_dict()).replace("AKIAWRONG", "")


def test_verify_reads_s3_records(bucket: Bucket, tracking_uri: str, workdir: Path) -> None:
    from syncd.verify import verify_records

    bucket.put("runs/v/run_record.jsonl", record_text("rec-v", range(3), finished=True))
    bucket.put("runs/w/run_record.jsonl", record_text("rec-w", range(2)))
    settings = settings_for([bucket.uri("runs")], tracking_uri, workdir)
    backfill(settings)
    bucket.put("runs/w/run_record.jsonl", record_text("rec-w", range(4)))  # grown, not synced

    totals, results = verify_records(settings)
    by_file = {r.file: r for r in results}

    assert totals.records == 2
    assert by_file[bucket.uri("runs/v/run_record.jsonl")].differences == []
    assert by_file[bucket.uri("runs/w/run_record.jsonl")].differences != []


def test_resync_of_an_s3_root_after_an_mlflow_restore_brings_back_what_was_lost(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    from typer.testing import CliRunner

    from syncd.cli import app

    key = "runs/r/run_record.jsonl"
    bucket.put("runs/r/report.txt", b"final report\n")
    bucket.put(key, record_text("rec-r", range(5)))
    bucket.put("runs/s/run_record.jsonl", record_text("rec-s", range(2)))
    assert sync([bucket.uri("runs")], tracking_uri, workdir).clean
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    backup = workdir / "backup.db"
    shutil.copy(db, backup)  # the backup holds the runs and 5 + 2 points

    grown = record_text("rec-r", range(10)) + line(11, "artifact", path="report.txt")
    bucket.put(key, grown + line(12, "run_finished", status="FINISHED"))
    assert sync([bucket.uri("runs")], tracking_uri, workdir).metric_points == 5
    run_id = runs_by_record(client)["rec-r"].info.run_id
    expected = history(client, run_id, "loss")
    assert len(expected) == 10

    shutil.copy(backup, db)  # MLflow restored from the backup: 5 points, no artifact
    assert len(history(client, run_id, "loss")) == 5
    assert sync([bucket.uri("runs")], tracking_uri, workdir).unchanged == 2  # trusts the ledger

    state = ["--tracking-uri", tracking_uri, "--state-dir", str(workdir / ".syncd")]
    done = CliRunner().invoke(app, ["resync", bucket.uri("runs"), *state, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["records"] == 2
    runs = runs_by_record(client)  # raises on a duplicate run
    assert set(runs) == {"rec-r", "rec-s"} and runs["rec-r"].info.run_id == run_id
    assert history(client, run_id, "loss") == expected
    assert runs["rec-r"].info.status == "FINISHED"
    assert artifact_files(client, run_id) == ["report.txt"]
    assert len(history(client, runs["rec-s"].info.run_id, "loss")) == 2

    again = CliRunner().invoke(app, ["resync", bucket.uri("runs/r"), *state])  # idempotent
    assert again.exit_code == 0, again.output
    assert history(client, run_id, "loss") == expected
    assert len(runs_by_record(client)) == 2


def test_verify_compares_the_artifacts_of_s3_records(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    from urllib.parse import unquote, urlsplit

    from typer.testing import CliRunner

    from syncd.cli import app

    bucket.put("runs/v/model.bin", b"weights" * 100)
    bucket.put("runs/v/reports/index.html", b"<html/>")
    bucket.put("runs/v/reports/img/plot.png", b"png" * 10)
    arts = [
        line(3, "artifact", path="model.bin", artifact_path="model"),
        line(4, "artifact", path="reports/", artifact_path="reports"),
    ]
    bucket.put("runs/v/run_record.jsonl", record_text("rec-v", range(2)) + "".join(arts))
    bucket.put("runs/w/run_record.jsonl", record_text("rec-w", range(2)))
    assert sync([bucket.uri("runs")], tracking_uri, workdir).clean
    state = ["--tracking-uri", tracking_uri, "--state-dir", str(workdir / ".syncd")]

    complete = CliRunner().invoke(app, ["verify", bucket.uri("runs"), *state])
    assert complete.exit_code == 0, complete.output
    assert "mirror complete: 2 records verified, 2 clean" in complete.output

    run = runs_by_record(client)["rec-v"]
    stored = Path(unquote(urlsplit(run.info.artifact_uri).path))
    (stored / "model" / "model.bin").unlink()  # lost from the artifact store
    (stored / "reports" / "img" / "plot.png").write_bytes(b"png")  # altered: another size
    differs = CliRunner().invoke(app, ["verify", bucket.uri("runs"), *state])

    assert differs.exit_code == 1, differs.output
    shown = bucket.uri("runs/v/run_record.jsonl")
    assert f"{shown}: artifact 'model/model.bin' (expected 700 bytes, found none)" in differs.output
    assert (
        f"{shown}: artifact 'reports/img/plot.png' size (expected 30 bytes, found 3 bytes)"
        in differs.output
    )
    assert "reports/index.html" not in differs.output  # untouched: no difference
    assert "2 records verified, 1 clean, 1 with 2 differences" in differs.output


def test_the_ledger_keeps_an_objects_etag_beside_its_size_and_last_modified(
    bucket: Bucket, tracking_uri: str, workdir: Path
) -> None:
    from syncd.ledger import Ledger

    key = "runs/e/run_record.jsonl"
    bucket.put(key, record_text("rec-e", range(3)))
    assert sync([bucket.uri("runs")], tracking_uri, workdir).synced == 1
    head = bucket.client.head_object(Bucket=bucket.name, Key=key)

    ledger = Ledger(f"sqlite:///{workdir / '.syncd' / 'ledger.db'}", tracking_uri)
    row = ledger.get_record(bucket.uri(key))
    ledger.close()

    assert row is not None and row.etag == head["ETag"].strip('"')
    assert row.mtime_ns == int(head["LastModified"].timestamp()) * 1_000_000_000
    assert row.size == head["ContentLength"]


def test_a_ledger_of_schema_3_with_s3_records_is_upgraded_and_writes_nothing_twice(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    """Schema 3 folded the ETag into mtime_ns. After the upgrade each S3 record is looked
    at once more (its prefix checked) and settled with its ETag; nothing is written twice."""
    import hashlib
    import sqlite3

    for name in ("a", "b"):
        bucket.put(f"runs/{name}/run_record.jsonl", record_text(f"rec-{name}", range(3)))
    assert sync([bucket.uri("runs")], tracking_uri, workdir).synced == 2
    db = workdir / ".syncd" / "ledger.db"
    with sqlite3.connect(db) as conn:  # back to schema 3, as that syncd wrote it
        for source, etag in conn.execute("SELECT source, etag FROM syncd_records").fetchall():
            mark = int(hashlib.sha256(etag.encode()).hexdigest()[:8], 16) % 1_000_000_000
            conn.execute(
                "UPDATE syncd_records SET mtime_ns = mtime_ns + ? WHERE source = ?",
                (mark, source),
            )
        conn.execute('ALTER TABLE syncd_records DROP COLUMN "etag"')
        conn.execute("DROP TABLE syncd_run_intents")  # schema 5
        conn.execute("UPDATE syncd_alembic_version SET version_num = '0003'")
    bucket.put("runs/b/run_record.jsonl", record_text("rec-b", range(5)))  # grown meanwhile

    calls = count_calls(syncd_client(bucket))
    upgraded = sync([bucket.uri("runs")], tracking_uri, workdir)

    assert upgraded.clean, upgraded.errors
    assert upgraded.metric_points == 2  # only b's new points: a is checked, not written again
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM syncd_alembic_version").fetchall() == [
            (LEDGER_SCHEMA_HEAD,)
        ]
        assert all(etag for (etag,) in conn.execute("SELECT etag FROM syncd_records"))
    runs = runs_by_record(client)
    assert len(history(client, runs["rec-a"].info.run_id, "loss")) == 3
    assert len(history(client, runs["rec-b"].info.run_id, "loss")) == 5
    assert calls["GetObject"] >= 1  # the one look at each record after the upgrade

    calls.clear()
    again = sync([bucket.uri("runs")], tracking_uri, workdir)
    assert again.unchanged == 2 and again.clean
    assert calls == {"ListObjectsV2": 1}  # settled with the ETag: no GET, no HEAD
