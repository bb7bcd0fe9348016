"""S3 faults under backfill: moto's server behind the fault-injecting proxy (real HTTP).

The root's ``endpoint_url`` is the proxy, so every request syncd sends to S3
crosses it; the test's own uploads and deletions go to moto directly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from daemon_helpers import wait_for
from fault_proxy import Fault, FaultProxy
from helpers import artifact_files, history, line, runs_by_record, started
from moto_s3 import Bucket

from syncd.backfill import backfill
from syncd.config import Root, load_config
from syncd.sources.s3 import client_for

SLOW_DOWN = (
    "application/xml",
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>injected</RequestId></Error>",
)


@pytest.fixture
def s3_proxy(bucket: Bucket) -> Iterator[FaultProxy]:
    """A fault proxy in front of the test's moto server, passing through."""
    port = urlsplit(bucket.endpoint).port
    assert port is not None
    with FaultProxy(port) as proxy:
        yield proxy


def settings_for(root: dict[str, Any], tracking_uri: str, workdir: Path) -> Any:
    return load_config(
        None,
        overrides={
            "roots": [root],
            "tracking_uri": tracking_uri,
            "state_dir": str(workdir / ".syncd"),
            "timeouts.http": 5,
        },
        env={},
    )


def record_text(record_id: str, steps: int) -> str:
    lines = [started(record_id, experiment="s3f")]
    for step in range(steps):
        lines.append(line(len(lines), "metrics", metrics={"loss": float(step)}, step=step))
    return "".join(lines)


def retry_attempts(client: Any) -> list[int]:
    """RetryAttempts of every S3 call the client completes from now on."""
    attempts: list[int] = []

    def hook(parsed: dict[str, Any], **_kw: Any) -> None:
        attempts.append(int(parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0)))

    client.meta.events.register("after-call.s3", hook)
    return attempts


def test_throttled_gets_and_lists_are_retried_to_an_exact_mirror(
    bucket: Bucket, s3_proxy: FaultProxy, tracking_uri: str, client: Any, workdir: Path
) -> None:
    steps = {"rec-0": 3, "rec-1": 5, "rec-2": 8}
    for n, (record_id, count) in enumerate(steps.items()):
        bucket.put(f"runs/{n}/run_record.jsonl", record_text(record_id, count))
    bucket.put("runs/2/model.bin", b"weights")
    bucket.put(
        "runs/2/run_record.jsonl",
        record_text("rec-2", 8) + line(9, "artifact", path="model.bin"),
    )
    root = {"path": bucket.uri("runs"), "endpoint_url": s3_proxy.url}
    s3_proxy.fail_with_503(every=2, methods=("GET",), reply=SLOW_DOWN)
    attempts = retry_attempts(client_for(Root(**root), 5.0))

    summary = backfill(settings_for(root, tracking_uri, workdir))

    assert summary.clean, summary.errors
    assert summary.synced == 3 and summary.metric_points == sum(steps.values())
    throttled = s3_proxy.fault_count(Fault.ERROR_503)
    assert throttled >= 3  # the listing and the record reads were throttled
    assert sum(attempts) == throttled, (attempts, throttled)  # each one retried, once
    runs = runs_by_record(client)
    assert set(runs) == set(steps)
    for record_id, count in steps.items():
        points = history(client, runs[record_id].info.run_id, "loss")
        assert [(s, v) for s, _t, v in points] == [(s, float(s)) for s in range(count)]
    assert artifact_files(client, runs["rec-2"].info.run_id) == ["model.bin"]
    again = backfill(settings_for(root, tracking_uri, workdir))
    assert again.clean and again.unchanged == 3
    print(f"throttled {throttled} of {sum(s3_proxy.calls.values())} calls; all retried")


def test_an_object_deleted_between_list_and_get_is_reported_gone(
    bucket: Bucket, s3_proxy: FaultProxy, tracking_uri: str, client: Any, workdir: Path
) -> None:
    for name in ("a", "b", "c"):
        bucket.put(f"runs/{name}/run_record.jsonl", record_text(f"rec-{name}", 2))
    root = {"path": bucket.uri("runs"), "endpoint_url": s3_proxy.url}
    # The listing goes through; the first GET of b's record is held until b is deleted.
    hold = s3_proxy.stall(path=r"/runs/b/run_record\.jsonl$", methods=("GET",))
    done: list[Any] = []
    worker = threading.Thread(
        target=lambda: done.append(backfill(settings_for(root, tracking_uri, workdir)))
    )
    worker.start()
    try:
        wait_for(lambda: s3_proxy.held == 1, 30, 0.02, "the GET of b held")
        bucket.delete("runs/b/run_record.jsonl")
    finally:
        s3_proxy.remove(hold)
        worker.join(60)
    [summary] = done

    assert summary.records == 3 and summary.synced == 2 and summary.gone == 1
    assert summary.clean, summary.errors  # exit 0: a record deleted under syncd is no error
    assert set(runs_by_record(client)) == {"rec-a", "rec-c"}
    bucket.put("runs/b/run_record.jsonl", record_text("rec-b", 2))  # written again
    again = backfill(settings_for(root, tracking_uri, workdir))
    assert again.clean and again.unchanged == 2 and again.metric_points == 2
    assert len(history(client, runs_by_record(client)["rec-b"].info.run_id, "loss")) == 2


def test_an_object_moved_to_another_key_continues_its_run(
    bucket: Bucket, s3_proxy: FaultProxy, tracking_uri: str, client: Any, workdir: Path
) -> None:
    root = {"path": bucket.uri("runs"), "endpoint_url": s3_proxy.url}
    bucket.put("runs/a/run_record.jsonl", record_text("rec-m", 3))
    bucket.put("runs/other/run_record.jsonl", record_text("rec-o", 1))
    assert backfill(settings_for(root, tracking_uri, workdir)).synced == 2
    [run_id] = [r.info.run_id for k, r in runs_by_record(client).items() if k == "rec-m"]
    # Moved (S3 has no rename: copy, then delete) and grown on the way.
    bucket.put("runs/b/run_record.jsonl", record_text("rec-m", 5))
    bucket.delete("runs/a/run_record.jsonl")

    summary = backfill(settings_for(root, tracking_uri, workdir))

    assert summary.clean and summary.blocked == 0, summary.errors
    runs = runs_by_record(client)
    assert set(runs) == {"rec-m", "rec-o"} and runs["rec-m"].info.run_id == run_id
    assert [s for s, _t, _v in history(client, run_id, "loss")] == [0, 1, 2, 3, 4]
    assert runs["rec-m"].data.tags["syncd.source"] == bucket.uri("runs/b/run_record.jsonl")


def test_a_copy_under_another_key_is_still_held_back(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    root = {"path": bucket.uri("runs")}
    bucket.put("runs/a/run_record.jsonl", record_text("rec-m", 3))
    backfill(settings_for(root, tracking_uri, workdir))
    bucket.put("runs/b/run_record.jsonl", record_text("rec-m", 5))  # the first one stays

    summary = backfill(settings_for(root, tracking_uri, workdir))

    assert summary.blocked == 1
    [err] = summary.errors
    assert "already used by s3://" in err["reason"] and err["file"].endswith("b/run_record.jsonl")
    assert len(history(client, runs_by_record(client)["rec-m"].info.run_id, "loss")) == 3


EXPIRED_TOKEN = (
    "application/xml",
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
    b"<Message>The provided token has expired.</Message>"
    b"<RequestId>injected</RequestId></Error>",
)


def test_credentials_expiring_between_a_record_and_its_artifact_skip_nothing(
    bucket: Bucket, s3_proxy: FaultProxy, tracking_uri: str, client: Any, workdir: Path
) -> None:
    """The record is read, then S3 answers ExpiredToken for its artifact: the record waits
    at its checkpoint (no line is skipped) and, once S3 answers again, lands whole."""
    root = {"path": bucket.uri("runs"), "endpoint_url": s3_proxy.url}
    bucket.put("runs/a/model.bin", b"weights")
    bucket.put(
        "runs/a/run_record.jsonl", record_text("rec-a", 3) + line(4, "artifact", path="model.bin")
    )
    bucket.put("runs/b/run_record.jsonl", record_text("rec-b", 2))
    s3_proxy.fail_with(400, "Bad Request", EXPIRED_TOKEN, path=r"/runs/a/model\.bin$")

    summary = backfill(settings_for(root, tracking_uri, workdir))

    assert summary.waiting == 1 and summary.synced == 1, summary.as_dict()
    assert not summary.clean  # exit 1: one record could not be read whole
    [err] = summary.errors
    assert err["file"] == bucket.uri("runs/a/run_record.jsonl")
    # The artifact is asked with a HEAD first: S3's answer has no body, so no error code.
    assert "expired or invalid credentials" in err["reason"], err
    assert "Traceback" not in err["reason"] and "Errno" not in err["reason"]
    assert len(history(client, runs_by_record(client)["rec-b"].info.run_id, "loss")) == 2

    s3_proxy.pass_through()
    again = backfill(settings_for(root, tracking_uri, workdir))

    assert again.clean, again.errors
    runs = runs_by_record(client)
    assert set(runs) == {"rec-a", "rec-b"}
    run_a = runs["rec-a"].info.run_id
    assert [s for s, _t, _v in history(client, run_a, "loss")] == [0, 1, 2]
    assert artifact_files(client, run_a) == ["model.bin"]
    assert len(history(client, runs["rec-b"].info.run_id, "loss")) == 2
