"""`syncd run` following s3:// roots (moto's server as the endpoint), as a real subprocess."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import SyncdProcess, wait_for
from helpers import history, line, runs_by_record, started, write_record
from moto_s3 import CREDENTIALS, Bucket, MotoServer

pytestmark = pytest.mark.slow

POLL = 1.5  # seconds between listings in these tests


def record_text(record_id: str, steps: int) -> str:
    lines = [started(record_id, experiment="s3d")]
    for step in range(steps):
        lines.append(line(len(lines), "metrics", metrics={"loss": float(step)}, step=step))
    return "".join(lines)


def daemon_env(endpoint: str) -> dict[str, str]:
    return {
        **CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "SYNCD_WATCH__S3_POLL_INTERVAL": str(POLL),
        "SYNCD_TIMEOUTS__HTTP": "3",
    }


def start_daemon(workdir: Path, tracking_uri: str, endpoint: str, *roots: str) -> SyncdProcess:
    return SyncdProcess(
        workdir,
        *roots,
        "--tracking-uri",
        tracking_uri,
        "--state-dir",
        str(workdir / ".syncd"),
        env=daemon_env(endpoint),
    )


def points(client: Any, record_id: str) -> int:
    run = runs_by_record(client).get(record_id)
    return len(history(client, run.info.run_id, "loss")) if run else -1


def test_daemon_picks_up_new_and_grown_records_within_two_polls(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    bucket.put("runs/old/run_record.jsonl", record_text("rec-old", 2))
    proc = start_daemon(workdir, tracking_uri, bucket.endpoint, bucket.uri("runs"))
    try:
        proc.wait_ready()
        wait_for(lambda: points(client, "rec-old") == 2, 30, 0.1, "the existing record")

        uploaded = time.monotonic()
        bucket.put("runs/new/run_record.jsonl", record_text("rec-new", 3))
        wait_for(lambda: points(client, "rec-new") == 3, 2 * POLL + 1.0, 0.05, "a new record")
        new_after = time.monotonic() - uploaded

        uploaded = time.monotonic()
        bucket.put("runs/new/run_record.jsonl", record_text("rec-new", 6))
        wait_for(lambda: points(client, "rec-new") == 6, 2 * POLL + 1.0, 0.05, "growth")
        grown_after = time.monotonic() - uploaded

        code, body = proc.health("/readyz")
        assert code == 200, body
        assert proc.stop() == 0
    finally:
        proc.kill()
    print(f"new record visible after {new_after:.2f}s, growth after {grown_after:.2f}s")
    assert points(client, "rec-old") == 2  # nothing written twice


def test_endpoint_down_and_back_up_while_a_local_root_keeps_syncing(
    tracking_uri: str, client: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto_s3 import CLEARED

    from syncd.sources.s3 import forget_clients

    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    server = MotoServer(env=CREDENTIALS)
    server.start()
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    forget_clients()
    bucket = Bucket(server.url)
    bucket.put("runs/a/run_record.jsonl", record_text("rec-a", 1))
    local = workdir / "local"
    write_record(local / "one", [started("rec-local-1", experiment="s3d")])
    root = bucket.uri("runs")
    proc = start_daemon(workdir, tracking_uri, server.url, root, str(local))
    try:
        proc.wait_ready()
        wait_for(lambda: points(client, "rec-a") == 1, 30, 0.1, "the S3 record")

        server.stop()

        def root_reported() -> Any:
            code, body = proc.health("/readyz")
            named = [r for r in body["reasons"] if root in r and "unreachable" in r]
            return code == 503 and named

        wait_for(root_reported, 30, 0.2, "/readyz naming the root")
        _, metrics = proc.get("/metrics")
        assert f'syncd_root_up{{root="{root}"}} 0.0' in metrics
        errors = [e for e in proc.log_events() if e.get("event") == "root_unavailable"]
        assert errors and all(e["root"] == root for e in errors)

        write_record(local / "two", [started("rec-local-2", experiment="s3d")])
        wait_for(lambda: "rec-local-2" in runs_by_record(client), 30, 0.1, "the local root")

        server.start()  # same port, empty: the writer uploads again
        bucket = Bucket(server.url, name=bucket.name)
        bucket.put("runs/a/run_record.jsonl", record_text("rec-a", 3))
        wait_for(lambda: proc.health("/readyz")[0] == 200, 60, 0.2, "/readyz recovered")
        wait_for(lambda: points(client, "rec-a") == 3, 30, 0.1, "the S3 record after recovery")
        assert any(e.get("event") == "root_recovered" for e in proc.log_events())
        assert proc.stop() == 0
    finally:
        proc.kill()
        server.stop()
        forget_clients()


def test_a_missing_bucket_is_reported_and_other_roots_work(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    bucket.put("runs/a/run_record.jsonl", record_text("rec-a", 1))
    missing = "s3://no-such-bucket-for-syncd/runs"
    proc = start_daemon(workdir, tracking_uri, bucket.endpoint, missing, bucket.uri("runs"))
    try:
        wait_for(lambda: points(client, "rec-a") == 1, 30, 0.1, "the good root")

        def reported() -> Any:
            code, body = proc.health("/readyz")
            return code == 503 and [r for r in body["reasons"] if missing in r]

        [reason] = wait_for(reported, 30, 0.2, "/readyz naming the missing bucket")
        assert "bucket does not exist" in reason
        assert proc.stop() == 0
    finally:
        proc.kill()
