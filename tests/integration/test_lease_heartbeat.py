"""A held lease outlives one long call: the heartbeat renews it while the call runs.

Two workers (engines with their own `MlflowSink`) share one ledger and write to a
real `mlflow server` through the fault proxy. The first worker's artifact upload
is stalled for several lease ttls (one call, well within its deadline). While it
is stalled the lease stays the first worker's, the second worker never takes the
record over, and when the upload goes through the record is mirrored once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from daemon_helpers import wait_for
from fault_proxy import FaultProxy
from helpers import artifact_files, line, runs_by_record, started, write_record
from mlflow_server import unique_experiment

from syncd.engine import Engine, Outcome
from syncd.ledger import SYNCED, Ledger
from syncd.sink import MlflowSink
from syncd.sources.local import LocalRecord

pytestmark = pytest.mark.slow

TTL = 1.5  # seconds: far below the stalled upload
STALL = 4 * TTL
STEPS = 50
UPLOAD = r"/mlflow-artifacts/artifacts/.*/model\.bin$"


def test_a_stalled_upload_keeps_its_lease_and_nothing_is_written_twice(
    tmp_path: Path, fault_proxy: FaultProxy
) -> None:
    from mlflow.tracking import MlflowClient

    experiment = unique_experiment("heartbeat")
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "model.bin").write_bytes(b"w" * 100_000)
    lines = [started("hb-1", experiment)]
    lines += [line(1 + s, "metrics", step=s, metrics={"loss": 1 / (s + 1)}) for s in range(STEPS)]
    lines.append(line(STEPS + 1, "artifact", path="model.bin"))
    lines.append(line(STEPS + 2, "run_finished", status="FINISHED"))
    path = write_record(run_dir, lines)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", "sink")

    def worker(name: str) -> Engine:
        return Engine(ledger, MlflowSink(fault_proxy.url), worker=name, lease_ttl=TTL)

    first, second = worker("host:1:/w0"), worker("host:2:/w0")
    fault_proxy.stall(seconds=STALL, path=UPLOAD, methods=("PUT",))
    done: list[Outcome] = []
    record = LocalRecord(path)
    writing = threading.Thread(target=lambda: done.append(first.sync(record)))
    writing.start()
    try:
        wait_for(lambda: fault_proxy.held == 1, 60, 0.02, "the first worker's upload stalled")
        stalled_at = time.monotonic()
        # the other worker keeps asking for the record while the upload is held
        tries: list[Outcome] = []
        other = LocalRecord(path)
        while fault_proxy.held and time.monotonic() - stalled_at < STALL - 0.5:
            tries.append(second.sync(other))
            time.sleep(0.1)  # pacing between attempts, as the daemon's retry queue does
        other.close()
        held_for = time.monotonic() - stalled_at
        assert held_for > 2 * TTL, f"the upload was held only {held_for:.1f}s"
        assert tries and all(t.busy and t.skipped for t in tries), tries
        lease = ledger.lease_of(record.uri)
        assert lease is not None and lease[0] == first.worker  # still the first worker's
        writing.join(60)
    finally:
        fault_proxy.release()
        writing.join(60)
        record.close()
    assert done and done[0].state == SYNCED and not done[0].busy, done
    assert first.heartbeat.renewals >= 2  # renewed while the single call ran
    assert ledger.lease_of(record.uri) is None  # released at the end

    events = ledger.events_of(record.uri)
    assert {e["worker"] for e in events} == {first.worker}, events
    assert [e["kind"] for e in events].count("bound") == 1
    assert sum(e["metric_points"] for e in events if e["kind"] == "applied") == STEPS
    client = MlflowClient(tracking_uri=fault_proxy.url)
    runs = runs_by_record(client, [experiment])
    assert list(runs) == ["hb-1"]
    run_id = runs["hb-1"].info.run_id
    assert len(client.get_metric_history(run_id, "loss")) == STEPS
    assert artifact_files(client, run_id) == ["model.bin"]
    assert runs["hb-1"].info.status == "FINISHED"
    ledger.close()
