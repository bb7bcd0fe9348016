"""The spool uploader of syncd:s3:// roots, against moto's server."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from moto_s3 import Bucket, free_port

from syncd.uri_store import derived_experiment_id
from syncd.uri_upload import SpoolUploader, make_client, spool_dir

RUN = "exp/run-1234abcd"


def put_keys(client: Any) -> list[str]:
    """Keys of every PutObject ``client`` sends from now on, in order."""
    keys: list[str] = []

    def hook(params: dict[str, Any], **_kw: Any) -> None:
        keys.append(str(params["Key"]))

    client.meta.events.register("provide-client-params.s3.PutObject", hook)
    return keys


def uploader(spool: Path, bucket: Bucket, client: Any = None) -> SpoolUploader:
    return SpoolUploader(spool, bucket.name, "runs", client=client or make_client())


def write(path: Path, data: bytes, mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as fh:
        fh.write(data)


def test_the_record_object_grows_by_whole_lines_only(bucket: Bucket, tmp_path: Path) -> None:
    record = tmp_path / RUN / "run_record.jsonl"
    write(record, b'{"n":1}\n{"n":2}\n{"n":')
    up = uploader(tmp_path, bucket)
    assert up.upload_pass() == 1
    first = bucket.get(f"runs/{RUN}/run_record.jsonl")
    assert first == b'{"n":1}\n{"n":2}\n'

    assert up.upload_pass() == 0  # the partial line alone is not a change
    write(record, b'3}\n{"n":4}\n', "ab")
    assert up.upload_pass() == 1
    second = bucket.get(f"runs/{RUN}/run_record.jsonl")
    assert second.startswith(first) and second.endswith(b"\n")
    assert second.count(b"\n") == 4
    assert up.upload_pass() == 0


def test_a_runs_files_go_up_before_its_record(bucket: Bucket, tmp_path: Path) -> None:
    run = tmp_path / RUN
    write(run / "artifacts" / "reports" / "report.txt", b"report")
    write(run / "models" / "m-1" / "MLmodel", b"flavors: {}")
    write(run / "run_record.jsonl", b'{"n":1}\n')
    write(tmp_path / "experiments.json", b'{"experiments": {}}')
    client = make_client()
    keys = put_keys(client)
    uploader(tmp_path, bucket, client).upload_pass()
    assert keys[:3] == [
        f"runs/{RUN}/artifacts/reports/report.txt",
        f"runs/{RUN}/models/m-1/MLmodel",
        f"runs/{RUN}/run_record.jsonl",
    ]
    assert bucket.get(f"runs/{RUN}/artifacts/reports/report.txt") == b"report"

    # a file changed later goes up again, still before the record that grew
    keys.clear()
    write(run / "artifacts" / "reports" / "report.txt", b"report, revised")
    write(run / "run_record.jsonl", b'{"n":2}\n', "ab")
    uploader(tmp_path, bucket, client).upload_pass()
    assert keys == [f"runs/{RUN}/artifacts/reports/report.txt", f"runs/{RUN}/run_record.jsonl"]


def test_failures_are_kept_for_a_later_pass_and_never_raised(
    bucket: Bucket, tmp_path: Path
) -> None:
    write(tmp_path / RUN / "run_record.jsonl", b'{"n":1}\n')
    down = SpoolUploader(
        tmp_path, bucket.name, "runs", client=_client_at(f"http://127.0.0.1:{free_port()}")
    )
    assert down.run_pass() is False
    assert down.last_error and "Connect" in down.last_error
    assert not down.flush(timeout=5)

    # another uploader on the same spool (a later process) sends it, then nothing more
    client = make_client()
    keys = put_keys(client)
    assert uploader(tmp_path, bucket, client).run_pass() is True
    assert keys == [f"runs/{RUN}/run_record.jsonl"]
    keys.clear()
    assert uploader(tmp_path, bucket, client).upload_pass() == 0


def _client_at(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=1, retries={"mode": "standard", "max_attempts": 1})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def test_hosts_sharing_a_prefix_merge_their_experiments(bucket: Bucket, tmp_path: Path) -> None:
    def experiments(*names: str) -> bytes:
        exps = {derived_experiment_id(n): {"name": n, "dir": n, "tags": {}} for n in names}
        return json.dumps({"experiments": exps}).encode()

    write(tmp_path / "a" / "experiments.json", experiments("Default", "shared", "only-a"))
    write(tmp_path / "b" / "experiments.json", experiments("Default", "shared", "only-b"))
    uploader(tmp_path / "a", bucket).upload_pass()
    uploader(tmp_path / "b", bucket).upload_pass()
    merged = json.loads(bucket.get("runs/experiments.json"))["experiments"]
    assert sorted(e["name"] for e in merged.values()) == ["Default", "only-a", "only-b", "shared"]
    assert derived_experiment_id("shared") == derived_experiment_id("shared")
    assert derived_experiment_id("shared") != derived_experiment_id("only-a")


def test_hosts_merging_at_the_same_moment_lose_no_experiment(
    bucket: Bucket, tmp_path: Path
) -> None:
    """Every host reads experiments.json before any writes it back: the worst interleaving."""
    hosts = 6
    barrier = threading.Barrier(hosts, timeout=60)
    names = [f"only-{i}" for i in range(hosts)]

    def host(i: int) -> None:
        spool = tmp_path / f"host-{i}"
        exps = {derived_experiment_id(n): {"name": n, "dir": n, "tags": {}} for n in [names[i]]}
        write(spool / "experiments.json", json.dumps({"experiments": exps}).encode())
        client = make_client()
        reads = []

        def after_get(**_kw: Any) -> None:
            reads.append(1)
            if len(reads) == 1:  # the first read of each host: all read the same version
                barrier.wait()

        client.meta.events.register("after-call.s3.GetObject", after_get)
        up = uploader(spool, bucket, client)
        up.upload_pass()
        assert json.loads((spool / ".upload-state.json").read_text())["files"]["experiments.json"]

    with ThreadPoolExecutor(hosts) as pool:
        for future in [pool.submit(host, i) for i in range(hosts)]:
            future.result()
    merged = json.loads(bucket.get("runs/experiments.json"))["experiments"]
    assert sorted(e["name"] for e in merged.values()) == sorted(names)


def test_a_store_without_conditional_writes_still_gets_the_merge(
    bucket: Bucket, tmp_path: Path
) -> None:
    from botocore.exceptions import ClientError

    client = make_client()

    def refuse_conditions(params: dict[str, Any], **_kw: Any) -> None:
        if "IfMatch" in params or "IfNoneMatch" in params:
            error = {"Error": {"Code": "NotImplemented", "Message": "no"}}
            raise ClientError(error, "PutObject")  # type: ignore[arg-type]

    client.meta.events.register("provide-client-params.s3.PutObject", refuse_conditions)
    bucket.put("runs/experiments.json", json.dumps({"experiments": {"9": {"name": "old"}}}))
    exps = {derived_experiment_id("new"): {"name": "new", "dir": "new", "tags": {}}}
    write(tmp_path / "experiments.json", json.dumps({"experiments": exps}).encode())
    assert uploader(tmp_path, bucket, client).upload_pass() == 1
    merged = json.loads(bucket.get("runs/experiments.json"))["experiments"]
    assert sorted(e["name"] for e in merged.values()) == ["new", "old"]


def test_the_spool_is_keyed_by_bucket_and_prefix(tmp_path: Path) -> None:
    env = {"SYNCD_SPOOL_DIR": str(tmp_path)}
    assert spool_dir("b", "runs/x", env) == tmp_path / "b" / "runs" / "x"
    assert spool_dir("b", "", env) == tmp_path / "b"
    assert spool_dir("b", "runs", {}).parts[-3:] == ("syncd-spool", "b", "runs")


def test_the_upload_spool_command_sends_what_is_pending(
    bucket: Bucket, tmp_path: Path, monkeypatch: Any
) -> None:
    from typer.testing import CliRunner

    from syncd.cli import app

    monkeypatch.setenv("SYNCD_SPOOL_DIR", str(tmp_path))
    write(tmp_path / bucket.name / "runs" / RUN / "run_record.jsonl", b'{"n":1}\n')
    uri = f"syncd:s3://{bucket.name}/runs"

    with monkeypatch.context() as down:
        down.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        failed = CliRunner().invoke(app, ["upload-spool", uri])
    assert failed.exit_code == 1 and "the spool keeps it" in failed.stderr

    sent = CliRunner().invoke(app, ["upload-spool", uri])
    assert sent.exit_code == 0, sent.stderr
    assert "uploaded 1 object" in sent.stdout
    assert bucket.get(f"runs/{RUN}/run_record.jsonl") == b'{"n":1}\n'
    again = CliRunner().invoke(app, ["upload-spool", bucket.uri("runs")])
    assert "uploaded 0 object" in again.stdout

    missing = CliRunner().invoke(app, ["upload-spool", f"s3://{bucket.name}/nothing-here"])
    assert missing.exit_code == 2 and "no spool" in missing.stderr
