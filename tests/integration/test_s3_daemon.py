"""`syncd run` following s3:// roots (moto's server as the endpoint), as a real subprocess."""

from __future__ import annotations

import signal
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


def strict_server_with_a_user() -> tuple[MotoServer, dict[str, str]]:
    """A moto server that checks credentials, and the keys of a user allowed s3:*."""
    import boto3

    # The first three requests (the IAM setup below) are let through unsigned.
    server = MotoServer(env={**CREDENTIALS, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    server.start()
    iam = boto3.session.Session(**_session_keys(CREDENTIALS)).client("iam", endpoint_url=server.url)
    iam.create_user(UserName="syncd")
    policy = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",'
    iam.put_user_policy(
        UserName="syncd", PolicyName="s3", PolicyDocument=policy + ' "Resource": "*"}]}'
    )
    key = iam.create_access_key(UserName="syncd")["AccessKey"]
    return server, {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


def _session_keys(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": "us-east-1",
    }


def write_credentials(path: Path, keys: dict[str, str]) -> None:
    path.write_text(
        "[default]\n"
        f"aws_access_key_id = {keys['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {keys['AWS_SECRET_ACCESS_KEY']}\n"
    )


def test_invalid_credentials_name_the_root_and_a_reload_with_valid_ones_recovers(
    bucket: Bucket,
    tracking_uri: str,
    client: Any,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3

    strict, keys = strict_server_with_a_user()
    try:
        s3 = boto3.session.Session(**_session_keys(keys)).client("s3", endpoint_url=strict.url)
        s3.create_bucket(Bucket="strict-runs")
        s3.put_object(
            Bucket="strict-runs", Key="runs/s/run_record.jsonl", Body=record_text("rec-s", 2)
        )
        bucket.put("runs/a/run_record.jsonl", record_text("rec-a", 1))
        local = workdir / "local"
        write_record(local / "one", [started("rec-local-1", experiment="s3d")])
        strict_root = "s3://strict-runs/runs"
        config = workdir / "syncd.yaml"
        config.write_text(
            "roots:\n"
            f"  - {{path: '{strict_root}', endpoint_url: '{strict.url}'}}\n"
            f"  - '{bucket.uri('runs')}'\n"
            f"  - '{local}'\n"
        )
        credentials = workdir / "credentials"
        write_credentials(credentials, {**keys, "AWS_ACCESS_KEY_ID": "AKIAEXPIREDEXPIRED00"})
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)  # the daemon reads its keys from the credentials file
        env = {**daemon_env(bucket.endpoint), "AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        proc = SyncdProcess(
            workdir,
            "--config",
            str(config),
            "--tracking-uri",
            tracking_uri,
            "--state-dir",
            str(workdir / ".syncd"),
            env=env,
        )
        try:

            def root_reported() -> Any:
                code, body = proc.health("/readyz")
                return code == 503 and [r for r in body["reasons"] if strict_root in r]

            [reason] = wait_for(root_reported, 30, 0.2, "/readyz naming the strict root")
            assert "access key is not valid" in reason
            _, metrics = proc.get("/metrics")
            assert f'syncd_root_up{{root="{strict_root}"}} 0.0' in metrics
            # The other roots keep syncing: the S3 one and the local one, old and new records.
            wait_for(lambda: points(client, "rec-a") == 1, 30, 0.1, "the other S3 root")
            bucket.put("runs/b/run_record.jsonl", record_text("rec-b", 2))
            write_record(local / "two", [started("rec-local-2", experiment="s3d")])
            wait_for(lambda: points(client, "rec-b") == 2, 30, 0.1, "a new S3 record")
            wait_for(lambda: "rec-local-2" in runs_by_record(client), 30, 0.1, "the local root")
            assert "rec-s" not in runs_by_record(client)

            write_credentials(credentials, keys)  # rotated: valid keys, then a reload
            proc.send(signal.SIGHUP)
            wait_for(lambda: points(client, "rec-s") == 2, 30, 0.1, "the strict root's record")
            wait_for(lambda: proc.health("/readyz")[0] == 200, 30, 0.2, "/readyz recovered")
            assert "AKIAEXPIRED" not in proc.logs()  # keys are never logged
            code = proc.stop()
            assert code == 0, proc.logs()[-4000:]
        finally:
            proc.kill()
    finally:
        strict.stop()


EXPIRED_TOKEN = (
    "application/xml",
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
    b"<Message>The provided token has expired.</Message>"
    b"<RequestId>injected</RequestId></Error>",
)


def test_expired_credentials_name_the_root_and_it_recovers_once_they_work_again(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    """S3 answers ExpiredToken (400) for one root, through a proxy in front of moto."""
    from urllib.parse import urlsplit

    from fault_proxy import Fault, FaultProxy
    from helpers import artifact_files

    other = Bucket(bucket.endpoint)
    bucket.put("runs/a/run_record.jsonl", record_text("rec-a", 2))
    other.put("runs/o/run_record.jsonl", record_text("rec-o", 1))
    expiring, steady = bucket.uri("runs"), other.uri("runs")
    with FaultProxy(int(urlsplit(bucket.endpoint).port or 0)) as proxy:
        config = workdir / "syncd.yaml"
        config.write_text(
            f"roots:\n  - {{path: '{expiring}', endpoint_url: '{proxy.url}'}}\n  - '{steady}'\n"
        )
        proc = SyncdProcess(
            workdir,
            "--config",
            str(config),
            "--tracking-uri",
            tracking_uri,
            "--state-dir",
            str(workdir / ".syncd"),
            env=daemon_env(bucket.endpoint),
        )
        try:
            wait_for(lambda: points(client, "rec-a") == 2, 30, 0.1, "the root before expiry")
            wait_for(lambda: points(client, "rec-o") == 1, 30, 0.1, "the other root")

            proxy.fail_with(400, "Bad Request", EXPIRED_TOKEN)  # every request of the root
            bucket.put("runs/a/run_record.jsonl", record_text("rec-a", 5))  # grown meanwhile
            bucket.put("runs/b/model.bin", b"weights" * 1000)
            bucket.put(
                "runs/b/run_record.jsonl",
                record_text("rec-b", 3) + line(4, "artifact", path="model.bin"),
            )

            def root_reported() -> Any:
                code, body = proc.health("/readyz")
                return code == 503 and [r for r in body["reasons"] if expiring in r]

            [reason] = wait_for(root_reported, 30, 0.2, "/readyz naming the expired root")
            assert "credentials have expired" in reason and "ExpiredToken" in reason, reason
            _, metrics = proc.get("/metrics")
            assert f'syncd_root_up{{root="{expiring}"}} 0.0' in metrics
            assert f'syncd_root_up{{root="{steady}"}} 1.0' in metrics
            errors = [e for e in proc.log_events() if e.get("event") == "root_unavailable"]
            assert errors and all(e["root"] == expiring for e in errors)
            assert all("credentials have expired" in e["error"] for e in errors), errors
            assert "Traceback" not in proc.logs()

            other.put("runs/p/run_record.jsonl", record_text("rec-p", 4))  # the other root goes on
            wait_for(lambda: points(client, "rec-p") == 4, 30, 0.1, "the other root, meanwhile")
            assert points(client, "rec-a") == 2 and "rec-b" not in runs_by_record(client)
            assert proxy.fault_count(Fault.ERROR) >= 1

            proxy.pass_through()  # renewed: S3 accepts the requests again
            wait_for(lambda: proc.health("/readyz")[0] == 200, 60, 0.2, "/readyz recovered")
            wait_for(lambda: points(client, "rec-a") == 5, 30, 0.1, "the grown record")
            wait_for(lambda: points(client, "rec-b") == 3, 30, 0.1, "the new record")
            runs = runs_by_record(client)  # raises on a second run for a record
            assert set(runs) == {"rec-a", "rec-b", "rec-o", "rec-p"}
            wait_for(
                lambda: artifact_files(client, runs["rec-b"].info.run_id) == ["model.bin"],
                30,
                0.1,
                "the new record's artifact",
            )
            _, metrics = proc.get("/metrics")
            assert f'syncd_root_up{{root="{expiring}"}} 1.0' in metrics
            assert any(e.get("event") == "root_recovered" for e in proc.log_events())
            assert proc.stop() == 0
        finally:
            proc.kill()
    for record_id, count in {"rec-a": 5, "rec-b": 3, "rec-o": 1, "rec-p": 4}.items():
        steps = [s for s, _t, _v in history(client, runs[record_id].info.run_id, "loss")]
        assert steps == list(range(count)), (record_id, steps)  # every point exactly once


def test_a_rewritten_credentials_file_is_read_on_the_next_poll_after_a_refusal(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After S3 blamed the credentials, the poller reads the chain again: no reload needed."""
    import boto3

    from syncd.config import Root
    from syncd.s3_poller import S3Poller
    from syncd.sources.s3 import forget_clients

    strict, keys = strict_server_with_a_user()
    try:
        s3 = boto3.session.Session(**_session_keys(keys)).client("s3", endpoint_url=strict.url)
        s3.create_bucket(Bucket="strict-runs")
        s3.put_object(
            Bucket="strict-runs", Key="runs/s/run_record.jsonl", Body=record_text("rec-s", 1)
        )
        credentials = workdir / "credentials"
        write_credentials(credentials, {**keys, "AWS_ACCESS_KEY_ID": "AKIAEXPIREDEXPIRED00"})
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        forget_clients()
        root = Root(path="s3://strict-runs/runs", endpoint_url=strict.url)
        noticed: list[str] = []
        status: list[str | None] = []
        poller = S3Poller(
            [root],
            noticed.append,
            interval=1.0,
            timeout=5.0,
            on_status=lambda _root, error: status.append(error),
        )

        poller.poll(root)
        assert status[-1] is not None and "access key is not valid" in status[-1]
        assert noticed == []

        write_credentials(credentials, keys)  # rotated by whatever renews the file
        poller.poll(root)
        assert status[-1] is None
        assert noticed == ["s3://strict-runs/runs/s/run_record.jsonl"]
    finally:
        strict.stop()
        forget_clients()


def upload_folder(bucket: Bucket, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            bucket.put(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def test_daemon_follows_snapshot_dvclive_and_tensorboard_roots_on_s3(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    """Derived roots on S3: each run directory is mirrored, and a file re-uploaded or
    grown on S3 is picked up on the next poll, nothing written twice."""
    import json

    import yaml
    from helpers import REPO

    dvclive = pytest.importorskip("dvclive")
    tensorboardX = pytest.importorskip("tensorboardX")
    from syncd.snapshot.tensorboard import frames

    stage = REPO / "examples" / "snapshots" / "stages" / "2025-11-20_seasonal_fit"
    upload_folder(bucket, stage, "stages/fit")

    scratch = workdir / "scratch"
    live = dvclive.Live(str(scratch / "dvc"), save_dvc_exp=False, resume=False)
    live.log_params({"lr": 0.01})
    for step in range(3):
        live.log_metric("loss", 1.0 / (step + 1), timestamp=True)
        live.next_step()
    upload_folder(bucket, scratch / "dvc", "dvc/ranker")

    writer = tensorboardX.SummaryWriter(str(scratch / "tb"))
    for step in range(4):
        writer.add_scalar("acc", 0.5 + step / 10, step, walltime=1_700_000_000.0 + step)
    writer.close()
    (events,) = (scratch / "tb").glob("events.out.tfevents.*")
    full = events.read_bytes()
    _records, _used = frames(full)
    cut = len(full) - 20  # inside the last frame: the last point waits for its bytes
    bucket.put(f"tb/exp1/{events.name}", full[:cut])

    config = workdir / "syncd.yaml"
    mapping = REPO / "examples" / "mappings" / "stage_dir.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "roots": [
                    {"path": bucket.uri("stages"), "format": "snapshot", "mapping": str(mapping)},
                    {"path": bucket.uri("dvc"), "format": "dvclive", "experiment": "dvc"},
                    {"path": bucket.uri("tb"), "format": "tensorboard", "experiment": "tb"},
                ]
            }
        )
    )
    proc = start_daemon(workdir, tracking_uri, bucket.endpoint, "--config", str(config))

    def one(experiment: str) -> Any:
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id]) if exp else []
        return found[0] if len(found) == 1 else None

    def values(experiment: str, key: str) -> list[float]:
        run = one(experiment)
        return [v for _s, _t, v in history(client, run.info.run_id, key)] if run else []

    try:
        proc.wait_ready()
        wait_for(lambda: one("seasonal_forecast") is not None, 60, 0.1, "the snapshot run")
        wait_for(lambda: len(values("dvc", "loss")) == 3, 60, 0.1, "the DVCLive run")
        wait_for(lambda: len(values("tb", "acc")) == 3, 60, 0.1, "the TensorBoard run")
        snap = one("seasonal_forecast")
        assert snap.data.tags["syncd.source"] == bucket.uri("stages/fit/metadata.yaml")
        assert snap.data.tags["git_dirty"] == "false"

        # re-uploaded snapshot, grown TSV, grown event file
        meta = yaml.safe_load((stage / "metadata.yaml").read_text())
        meta["git_dirty"] = True
        bucket.put("stages/fit/metadata.yaml", yaml.safe_dump(meta))
        live = dvclive.Live(str(scratch / "dvc"), save_dvc_exp=False, resume=True)
        for _ in range(2):
            live.log_metric("loss", 1.0 / (live.step + 1), timestamp=True)
            live.next_step()
        upload_folder(bucket, scratch / "dvc", "dvc/ranker")
        bucket.put(f"tb/exp1/{events.name}", full)

        wait_for(
            lambda: one("seasonal_forecast").data.tags["git_dirty"] == "true",
            4 * POLL + 10,
            0.1,
            "the re-uploaded snapshot",
        )
        wait_for(lambda: len(values("dvc", "loss")) == 5, 4 * POLL + 10, 0.1, "the grown TSV")
        wait_for(lambda: len(values("tb", "acc")) == 4, 4 * POLL + 10, 0.1, "the grown file")
        assert proc.stop() == 0
    finally:
        proc.kill()
    # the same runs, each point once
    assert one("seasonal_forecast").info.run_id == snap.info.run_id
    rows = (scratch / "dvc" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    assert values("dvc", "loss") == [float(r.split("\t")[2]) for r in rows]
    assert values("tb", "acc") == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert json.loads((scratch / "dvc" / "metrics.json").read_text())["step"] == 4


def test_daemon_ends_an_idle_dvclive_run_on_s3_and_reopens_it_when_it_grows(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    import yaml

    dvclive = pytest.importorskip("dvclive")
    scratch = workdir / "scratch" / "dvc"
    live = dvclive.Live(str(scratch), save_dvc_exp=False, resume=False)
    for step in range(3):
        live.log_metric("loss", 1.0 / (step + 1), timestamp=True)
        live.next_step()
    upload_folder(bucket, scratch, "dvc/ranker")
    config = workdir / "syncd.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "roots": [
                    {
                        "path": bucket.uri("dvc"),
                        "format": "dvclive",
                        "experiment": "dvc",
                        "finish_after_idle": 3,
                    }
                ],
                "watch": {"rescan_interval": 0.5},
            }
        )
    )
    proc = start_daemon(workdir, tracking_uri, bucket.endpoint, "--config", str(config))

    def run() -> Any:
        exp = client.get_experiment_by_name("dvc")
        found = client.search_runs([exp.experiment_id]) if exp else []
        return found[0] if found else None

    def last_ts() -> int:
        rows = (scratch / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
        return int(rows[-1].split("\t")[0])

    def points() -> int:
        return len(history(client, run().info.run_id, "loss")) if run() else 0

    try:
        proc.wait_ready()
        wait_for(lambda: run() and run().info.status == "FINISHED", 60, 0.1, "the idle end")
        assert run().info.end_time == last_ts() and points() == 3

        live.log_metric("loss", 0.1, timestamp=True)
        live.next_step()
        upload_folder(bucket, scratch, "dvc/ranker")
        wait_for(lambda: points() == 4, 4 * POLL + 10, 0.1, "the new point")
        wait_for(lambda: run().info.status == "FINISHED", 60, 0.1, "the second idle end")
        assert run().info.end_time == last_ts()
        assert proc.stop() == 0
    finally:
        proc.kill()
    assert points() == 4
