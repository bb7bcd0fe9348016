"""A fleet: three `syncd run` over shared roots, one PostgreSQL ledger, one `mlflow server`.

PostgreSQL (127.0.0.1:5432) is the MLflow backend store and the shared ledger; the
shared roots are a local folder standing in for shared storage, or an
``s3://bucket/prefix`` on moto's server where each record is written locally and
uploaded whole after every change (as a writer on S3 does). The three daemons start at the
same instant, records grow while they run, and one daemon is SIGKILLed while it
holds a record's lease. Every record must be mirrored exactly once (one run per
record, exact metric points, artifacts, parent links), the survivors must keep
running, and each record's lines must have been committed once: no chunk is
projected by two daemons.
"""

from __future__ import annotations

import json
import re
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import SyncdProcess, wait_for
from helpers import artifact_files, line, runs_by_record, started
from mlflow_server import MlflowServerProcess, unique_experiment
from moto_s3 import Bucket
from pg import throwaway_database

from syncd.backfill import sink_key
from syncd.ledger import SYNCED, Ledger, leases

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(240)]

PARENTS = 3
CHILDREN = 2  # per parent
ROUNDS = 6
STEPS_PER_ROUND = 150
KEYS = ("loss", "acc")
LEASE_TTL = 4.0
S3_POLL = 0.3  # seconds between listings of the s3:// root


@pytest.fixture
def ledger_url() -> Iterator[str]:
    with throwaway_database("syncd_fleet_ledger") as url:
        yield url


@pytest.fixture
def pg_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServerProcess]:
    """`mlflow server` on a throwaway PostgreSQL database, proxied artifacts, a free port."""
    with throwaway_database("syncd_fleet_mlflow") as url:
        server = MlflowServerProcess(tmp_path_factory.mktemp("pg-mlflow"), backend_store_uri=url)
        server.start()
        try:
            yield server
        finally:
            server.stop()


class Record:
    """One training run's record file, appended to in rounds like a trainer would."""

    def __init__(
        self,
        root: Path,
        record_id: str,
        experiment: str,
        parent: str | None,
        bucket: Bucket | None = None,
    ) -> None:
        self.dir = root / record_id
        self.dir.mkdir(parents=True)
        self.path = self.dir / "run_record.jsonl"
        self.record_id = record_id
        self.bucket = bucket  # None: the shared folder is the root; else uploaded whole
        self.key = f"{root.name}/{record_id}"
        self.uri = bucket.uri(f"{self.key}/run_record.jsonl") if bucket else self.path.as_uri()
        self.seq = 0
        extra = {"parent_record_id": parent} if parent else {}
        self._append([started(record_id, experiment, **extra)])

    def _append(self, lines: list[str]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
        if self.bucket is not None:
            self.bucket.put(f"{self.key}/run_record.jsonl", self.path.read_bytes())

    def grow(self, round_: int) -> None:
        lines = []
        for i in range(STEPS_PER_ROUND):
            self.seq += 1
            step = round_ * STEPS_PER_ROUND + i
            lines.append(
                line(self.seq, "metrics", step=step, metrics=dict.fromkeys(KEYS, step / 7))
            )
        if round_ == 2:
            (self.dir / "model.txt").write_text(f"weights of {self.record_id}\n")
            if self.bucket is not None:  # the file first, then the line that names it
                self.bucket.put(f"{self.key}/model.txt", (self.dir / "model.txt").read_bytes())
            self.seq += 1
            lines.append(line(self.seq, "artifact", path="model.txt"))
        self._append(lines)

    def finish(self) -> None:
        self.seq += 1
        self._append([line(self.seq, "run_finished", status="FINISHED")])


def pid_of(worker: str | None) -> int | None:
    match = re.match(r"[^:]+:(\d+):", worker or "")
    return int(match.group(1)) if match else None


@pytest.mark.parametrize(
    "storage",
    [
        "local",
        # 40 to 75 s of work on a loaded 2-core host, after 20 to 60 s of fixture set-up
        pytest.param("s3", marks=pytest.mark.timeout(180)),
    ],
)
def test_three_daemons_share_the_work_and_survive_a_kill(
    tmp_path: Path,
    ledger_url: str,
    pg_mlflow_server: MlflowServerProcess,
    storage: str,
    request: pytest.FixtureRequest,
) -> None:
    from mlflow.tracking import MlflowClient

    sa = pytest.importorskip("sqlalchemy")
    experiment = unique_experiment(f"fleet-{storage}")
    root = tmp_path / "shared"
    bucket: Bucket | None = request.getfixturevalue("bucket") if storage == "s3" else None
    # the daemons' root: the shared folder, or the same prefix on S3
    watched = bucket.uri(root.name) if bucket else str(root)
    records: list[Record] = []
    for p in range(PARENTS):  # children first: they are linked once their parent is bound
        for c in range(CHILDREN):
            records.append(Record(root, f"p{p}-c{c}", experiment, f"p{p}", bucket))
    for p in range(PARENTS):
        records.append(Record(root, f"p{p}", experiment, None, bucket))

    daemons: list[SyncdProcess] = []
    for n in range(3):
        folder = tmp_path / f"host{n}"
        folder.mkdir()
        config = folder / "syncd.yaml"
        config.write_text(
            json.dumps(  # YAML is a superset of JSON
                {
                    "tracking_uri": pg_mlflow_server.uri,
                    "ledger_url": ledger_url,
                    "state_dir": str(folder / "state"),
                    "roots": [{"path": watched}],
                    "writer": {"concurrency": 2, "lease_ttl": LEASE_TTL},
                    "watch": {"rescan_interval": 2.0, "s3_poll_interval": S3_POLL},
                }
            )
        )
        daemons.append(SyncdProcess(folder, "--config", str(config)))
    # the three were started together (one Popen after another): all must come up
    try:
        for daemon in daemons:
            daemon.wait_ready(90)
        victim, survivors = daemons[0], daemons[1:]
        ledger = Ledger(ledger_url, sink_key(pg_mlflow_server.uri))

        def applied_events() -> int:
            with ledger.engine.connect() as conn:
                return int(
                    conn.exec_driver_sql(
                        "SELECT count(*) FROM syncd_sync_events WHERE kind = 'applied'"
                    ).scalar_one()
                )

        def victim_lease() -> str | None:
            with ledger.engine.connect() as conn:
                held = conn.execute(sa.select(leases.c.source, leases.c.owner)).all()
            return next((src for src, owner in held if pid_of(owner) == victim.proc.pid), None)

        orphaned: str | None = None  # the record the victim was writing when it died
        for round_ in range(ROUNDS):
            before = applied_events()
            for record in records:
                record.grow(round_)
            if round_ == ROUNDS // 2:
                orphaned = wait_for(victim_lease, 30, 0.002, "the victim holding a lease")
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(10)
                killed_at = max((e["id"] for e in ledger.events_of(orphaned)), default=0)
            # the next round lands while the daemons work on this one
            wait_for(lambda b=before: applied_events() > b, 60, 0.05, f"progress in round {round_}")
        for record in records:
            record.finish()

        def all_synced() -> bool:
            rows = ledger.all_records()
            return all(
                (row := rows.get(r.uri)) is not None
                and row.state == SYNCED
                and row.offset == r.path.stat().st_size
                for r in records
            )

        wait_for(all_synced, 120, 0.25, "every record synced to its end")
        for daemon in survivors:
            assert daemon.proc.poll() is None, f"a survivor exited:\n{daemon.logs()[-5000:]}"
            assert daemon.get("/readyz")[0] == 200

        # MLflow: one run per record, exact points, artifacts, parent links
        client = MlflowClient(tracking_uri=pg_mlflow_server.uri)
        runs = runs_by_record(client, [experiment])  # a second run of a record fails here
        assert sorted(runs) == sorted(r.record_id for r in records)
        points = ROUNDS * STEPS_PER_ROUND
        for record in records:
            run = runs[record.record_id]
            for key in KEYS:
                assert len(client.get_metric_history(run.info.run_id, key)) == points
            assert "model.txt" in artifact_files(client, run.info.run_id)
            assert run.info.status == "FINISHED"
            if "-c" in record.record_id:
                parent = runs[record.record_id.split("-")[0]]
                assert run.data.tags.get("mlflow.parentRunId") == parent.info.run_id

        # the ledger: each record bound once, each line committed once, work shared
        writers_of: dict[str, set[int | None]] = {}
        for record in records:
            events = ledger.events_of(record.uri)
            assert [e["kind"] for e in events].count("bound") == 1, events
            applied = [e for e in events if e["kind"] == "applied"]
            assert sum(e["metric_points"] for e in applied) == points * len(KEYS), applied
            writers_of[record.record_id] = {pid_of(e["worker"]) for e in applied}
        daemons_that_wrote = Counter(pid for pids in writers_of.values() for pid in pids)
        survivor_pids = {d.proc.pid for d in survivors}
        assert survivor_pids <= set(daemons_that_wrote), daemons_that_wrote
        # the record the victim held was taken over and finished by a survivor
        assert orphaned is not None
        after_kill = [e for e in ledger.events_of(orphaned) if e["id"] > killed_at]
        assert {pid_of(e["worker"]) for e in after_kill if e["kind"] == "applied"} <= survivor_pids
        assert any(e["kind"] == "applied" for e in after_kill), after_kill
        ledger.close()
        for daemon in survivors:
            assert daemon.stop(signal.SIGTERM, timeout=60) == 0
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.kill()
            print(f"--- daemon {daemon.proc.pid}\n{daemon.logs()[-6000:]}")
