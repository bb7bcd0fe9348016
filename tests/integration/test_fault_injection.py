"""Fault injection with real processes: SIGKILLed syncd, a killed MLflow server, a full or
unusable state dir, a corrupt ledger, records replaced under the daemon's feet.

Every kill point comes from one seeded RNG (``SYNCD_FAULT_SEED``; the seed is in every
failure message). Kills fire on observable progress (ledger rows, MLflow metric rows,
artifact bytes) or at a time offset drawn from the RNG; nothing waits on a fixed sleep.
After the faults a clean ``syncd backfill`` must leave the mirror exact: one run per
record_id, exact metric point counts per key, params, tags, status and artifact bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import SYNCD, SyncdProcess, free_port, http_get, run_syncd, wait_for
from helpers import T0, line, runs_by_record
from mlflow_server import MlflowServerProcess, unique_experiment

from syncd import RunRecorder

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SYNCD_FAULT_SEED") or 20251201)
KILLS_PLANNED = {"store": 3, "checkpoint": 7, "artifacts": 5, "long_record": 5}


@contextmanager
def seeded(name: str) -> Iterator[random.Random]:
    """The scenario's RNG; any failure names the seed that reproduces it."""
    print(f"fault injection {name}: seed {SEED} (SYNCD_FAULT_SEED={SEED} reproduces it)")
    try:
        yield random.Random(f"{SEED}:{name}")
    except AssertionError as exc:
        raise AssertionError(f"[{name}, seed {SEED}: SYNCD_FAULT_SEED={SEED}] {exc}") from exc


# -- records and what MLflow must hold for them --------------------------------------


class Rec:
    """A record written line by line by the test (seq and timestamps kept here)."""

    def __init__(self, run_dir: Path, record_id: str, experiment: str = "faults") -> None:
        self.dir = run_dir
        self.path = run_dir / "run_record.jsonl"
        self.record_id = record_id
        self.seq = 0
        self.step = 0
        run_dir.mkdir(parents=True, exist_ok=True)
        self.lines = [
            line(0, "run_started", record_id=record_id, experiment=experiment, tags={"t": "0"})
        ]

    def add(self, etype: str, **fields: Any) -> None:
        self.seq += 1
        self.lines.append(line(self.seq, etype, **fields))

    def metrics(self, steps: int, keys: tuple[str, ...] = ("loss", "acc")) -> None:
        for _ in range(steps):
            value = 1.0 / (self.step + 1)
            self.add("metrics", step=self.step, metrics=dict.fromkeys(keys, value))
            self.step += 1

    def artifact(self, name: str, data: bytes, artifact_path: str | None = None) -> None:
        (self.dir / name).write_bytes(data)
        extra = {"artifact_path": artifact_path} if artifact_path else {}
        self.add("artifact", path=name, **extra)

    def text(self, start: int = 0) -> str:
        return "".join(self.lines[start:])

    def flush(self) -> None:
        """Append the lines the file does not hold yet."""
        have = self.path.read_text().count("\n") if self.path.exists() else 0
        with self.path.open("a") as fh:
            fh.write(self.text(have))


@dataclass
class Expect:
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: Counter[str] = field(default_factory=Counter)
    status: str = "RUNNING"
    artifacts: dict[str, bytes] = field(default_factory=dict)


def expected_from_files(*roots: Path) -> dict[str, Expect]:
    """What MLflow must hold: read from the complete lines of the final record files."""
    out: dict[str, Expect] = {}
    for root in roots:
        for path in sorted(root.rglob("run_record.jsonl")):
            text = path.read_text()
            complete = text[: text.rfind("\n") + 1]
            exp = Expect()
            rid = None
            for raw in complete.splitlines():
                ev = json.loads(raw)
                kind = ev["type"]
                if kind == "run_started":
                    rid = ev["record_id"]
                    exp.tags.update(ev.get("tags", {}))
                elif kind == "params":
                    exp.params.update({k: str(v) for k, v in ev["params"].items()})
                elif kind == "tags":
                    exp.tags.update(ev["tags"])
                elif kind == "metrics":
                    exp.points.update(ev["metrics"].keys())
                elif kind == "artifact":
                    name = Path(ev["path"]).name
                    key = f"{ev['artifact_path']}/{name}" if ev.get("artifact_path") else name
                    exp.artifacts[key] = (path.parent / ev["path"]).read_bytes()
                elif kind == "run_finished":
                    exp.status = ev["status"]
                elif kind == "run_resumed":
                    exp.status = "RUNNING"
            assert rid is not None, f"{path} has no run_started"
            out[rid] = exp
    return out


def mirror_problems(
    client: Any, expected: dict[str, Expect], workdir: Path, experiments: list[str] | None = None
) -> list[str]:
    """Every difference between MLflow and ``expected`` (empty: the mirror is exact)."""
    runs = runs_by_record(client, experiments)  # raises on a duplicate run for a record_id
    problems = []
    for rid, exp in expected.items():
        run = runs.get(rid)
        if run is None:
            problems.append(f"{rid}: no run")
            continue
        run_id = run.info.run_id
        if dict(run.data.params) != exp.params:
            problems.append(f"{rid}: params {dict(run.data.params)} != {exp.params}")
        tags = {k: run.data.tags.get(k) for k in exp.tags}
        if tags != exp.tags:
            problems.append(f"{rid}: tags {tags} != {exp.tags}")
        if run.info.status != exp.status:
            problems.append(f"{rid}: status {run.info.status} != {exp.status}")
        if set(run.data.metrics) != set(exp.points):
            problems.append(
                f"{rid}: metric keys {sorted(run.data.metrics)} != {sorted(exp.points)}"
            )
        for key, count in exp.points.items():
            points = client.get_metric_history(run_id, key)
            steps = Counter(p.step for p in points)
            if len(points) != count or len(steps) != count:
                problems.append(
                    f"{rid}: {key} has {len(points)} points ({len(steps)} steps), not {count}"
                )
        for key, data in exp.artifacts.items():
            dst = workdir / "downloads" / run_id
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True)
            try:
                got = Path(client.download_artifacts(run_id, key, str(dst))).read_bytes()
            except Exception as exc:
                problems.append(f"{rid}: artifact {key}: {exc}")
                continue
            if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
                problems.append(f"{rid}: artifact {key}: {len(got)} bytes, not the {len(data)}")
    return problems


def assert_exact(
    client: Any, expected: dict[str, Expect], workdir: Path, experiments: list[str] | None = None
) -> None:
    problems = mirror_problems(client, expected, workdir, experiments)
    assert not problems, "the mirror is not exact:\n" + "\n".join(problems[:20])


# -- observing and killing processes -------------------------------------------------


def sql_count(db: Path, query: str) -> int:
    """A read-only count from a SQLite file that another process writes; 0 if not there yet."""
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)) as conn:
            return int(conn.execute(query).fetchone()[0])
    except sqlite3.Error:
        return 0


def ledger_events(state: Path) -> int:
    return sql_count(state / "ledger.db", "SELECT count(*) FROM syncd_sync_events")


def metric_rows(store: Path) -> int:
    return sql_count(store, "SELECT count(*) FROM metrics")


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def torn_files(folder: Path, sizes: set[int]) -> list[Path]:
    """Artifact files whose size is none of the sources': caught half-written."""
    if not folder.exists():
        return []
    torn = []
    for path in folder.rglob("*.bin"):
        try:
            if path.stat().st_size not in sizes:
                torn.append(path)
        except FileNotFoundError:
            continue
    return torn


def syncd_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "MLFLOW_TRACKING"))}


def spawn(kind: str, root: Path, uri: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    """``syncd backfill`` or ``syncd run`` in the background, its output kept in ``log``."""
    args = [SYNCD, kind, str(root), "--tracking-uri", uri, "--state-dir", str(state)]
    if kind == "run":
        args += ["--health-addr", f"127.0.0.1:{free_port()}"]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*args, "--log-format", "json"],
            cwd=log.parent,
            env=syncd_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@dataclass
class KillLog:
    """Every kill delivered: where, how it was triggered, and what it left behind."""

    kills: list[dict[str, Any]] = field(default_factory=list)

    def count(self, category: str) -> int:
        return sum(1 for k in self.kills if k["category"] == category)


KILLS = KillLog()


def kill_when(
    proc: subprocess.Popen[bytes],
    progress: Callable[[], int],
    target: int,
    after_s: float,
    *,
    not_before: Callable[[], bool] = lambda: True,
) -> dict[str, Any] | None:
    """SIGKILL ``proc`` once ``progress() >= target`` or ``after_s`` seconds passed (both
    drawn from the RNG by the caller), counted from when ``not_before()`` first holds.
    None when the process ended by itself first (the kill missed)."""
    started = time.monotonic()
    armed: float | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if armed is None and not_before():
            armed = now
        if armed is not None:
            seen = progress()
            if seen >= target or now - armed >= after_s:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                trigger = "progress" if seen >= target else "time"
                return {"trigger": trigger, "at_s": round(now - started, 2), "progress": seen}
        if now - started > 120:
            proc.kill()
            proc.wait()
            raise AssertionError("a syncd process neither progressed nor ended in 120 s")
        time.sleep(0.005)
    return None


def clean_backfill(root: Path, uri: str, state: Path, cwd: Path) -> None:
    done = run_syncd(
        "backfill", str(root), "--tracking-uri", uri, "--state-dir", str(state), cwd=cwd
    )
    assert done.returncode == 0, (
        f"clean backfill failed ({done.returncode}):\n{done.stderr[-3000:]}"
    )


def verify_if_available(root: Path, uri: str, state: Path, cwd: Path) -> None:
    """``syncd verify`` agrees, where this syncd has the command."""
    if run_syncd("verify", "--help", cwd=cwd).returncode != 0:
        return
    done = run_syncd("verify", str(root), "--tracking-uri", uri, "--state-dir", str(state), cwd=cwd)
    assert done.returncode == 0, f"syncd verify: {done.returncode}\n{done.stdout}\n{done.stderr}"


def fresh_store(template: Path, folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "mlflow.db"
    shutil.copy(template, store)
    return store, f"sqlite:///{store}"


def mlflow_ahead_of_ledger(store: Path, state: Path, recs: dict[str, Rec]) -> int:
    """Records whose MLflow rows go past the ledger's checkpoint: the kill fell between a
    write and its checkpoint (a run created but not bound, or points not acknowledged)."""
    if not (state / "ledger.db").exists():
        return 0
    # Opened read-write (only read from): the killed writer may have left a hot journal,
    # which SQLite rolls back on the next open, and a read-only connection cannot.
    with closing(sqlite3.connect(store, timeout=5)) as mlf:
        run_of = dict(
            mlf.execute("SELECT value, run_uuid FROM tags WHERE key = 'syncd.record_id'").fetchall()
        )
        points = Counter(
            dict(mlf.execute("SELECT run_uuid, count(*) FROM metrics GROUP BY run_uuid").fetchall())
        )
    with closing(sqlite3.connect(state / "ledger.db", timeout=5)) as led:
        bound = {r for (r,) in led.execute("SELECT record_id FROM syncd_runs").fetchall()}
        seqs = dict(led.execute("SELECT record_id, seq FROM syncd_records").fetchall())
    ahead = 0
    for rid, run_uuid in run_of.items():
        rec = recs.get(rid)
        if rec is None:
            continue
        acked = sum(
            len(json.loads(raw)["metrics"])
            for raw in rec.lines[1 : max(0, seqs.get(rid, -1)) + 1]
            if '"type":"metrics"' in raw
        )
        if rid not in bound or points[run_uuid] > acked:
            ahead += 1
    return ahead


# -- 1. SIGKILLs of syncd backfill and syncd run ----------------------------------


def test_kills_during_store_creation(workdir: Path, mlflow_template: Path) -> None:
    """Killed while first touching a store: experiments, the artifact root, first runs.

    The stores are copies of a migrated template: a SIGKILL during MLflow's own first
    migration of a new SQLite file leaves a half-made store that every later run fails
    on ("table registered_models already exists", "duplicate column name:
    storage_location"): tracked separately (atomic store creation).
    """
    with seeded("store") as rng:
        root = workdir / "runs"
        recs = {}
        for i in range(6):
            rec = Rec(root / f"r{i}", f"store-{i}", experiment=f"exp-{i % 3}")
            rec.add("params", params={"lr": f"0.{i}", "depth": str(i)})
            rec.metrics(rng.randint(5, 40))
            rec.artifact("model.bin", rng.randbytes(rng.randint(50_000, 400_000)), "model")
            rec.add("run_finished", status=rng.choice(["FINISHED", "FAILED"]))
            rec.flush()
            recs[rec.record_id] = rec
        stores = []
        for i in range(KILLS_PLANNED["store"]):
            store, uri = fresh_store(mlflow_template, workdir / f"store{i}")
            state = workdir / f"state{i}"
            for _attempt in range(3):
                kind = rng.choice(["backfill", "run"])
                proc = spawn(kind, root, uri, state, workdir / f"store{i}.log")
                lock = store.with_name("mlflow.db.syncd-lock")  # the first write to the store
                kill = kill_when(
                    proc,
                    lambda store=store: metric_rows(store),  # type: ignore[misc]
                    rng.randint(1, 200),
                    rng.uniform(0.0, 1.0),
                    not_before=lock.exists,
                )
                if kill is not None:
                    KILLS.kills.append({"category": "store", "kind": kind, **kill})
                    break
            stores.append((store, uri, state))
        assert KILLS.count("store") >= KILLS_PLANNED["store"], KILLS.kills

        from mlflow.tracking import MlflowClient

        expected = expected_from_files(root)
        for _store, uri, state in stores:
            clean_backfill(root, uri, state, workdir)
            assert_exact(MlflowClient(uri), expected, workdir)
            verify_if_available(root, uri, state, workdir)
        print("store kills:", [k for k in KILLS.kills if k["category"] == "store"])


def test_kills_between_writes_and_checkpoints(workdir: Path, tracking_uri: str) -> None:
    """Many small records, growing between kills: kills land right after a checkpoint,
    with the next record's writes in flight."""
    store = Path(tracking_uri.removeprefix("sqlite:///"))
    state = workdir / "state"
    with seeded("checkpoint") as rng:
        root = workdir / "runs"
        recs: dict[str, Rec] = {}

        def new_record() -> None:
            rec = Rec(root / f"r{len(recs):03d}", f"ckpt-{len(recs)}")
            rec.add("params", params={"lr": str(rng.random()), "seed": str(len(recs))})
            rec.metrics(rng.randint(3, 30), keys=("loss", "acc", "auc"))
            rec.add("tags", tags={"phase": "train"})
            rec.flush()
            recs[rec.record_id] = rec

        for _ in range(30):
            new_record()
        ahead = 0
        attempts = 0
        while KILLS.count("checkpoint") < KILLS_PLANNED["checkpoint"] and attempts < 20:
            attempts += 1
            kind = rng.choice(["backfill", "run"])
            before = ledger_events(state)
            proc = spawn(kind, root, tracking_uri, state, workdir / "syncd.log")
            kill = kill_when(
                proc,
                lambda: ledger_events(state),
                before + rng.randint(1, 25),
                rng.uniform(0.0, 2.0),
                not_before=lambda: ledger_events(state) > before,  # noqa: B023 (this process committed)
            )
            if kill is not None:
                hit = mlflow_ahead_of_ledger(store, state, recs)
                ahead += hit
                KILLS.kills.append({"category": "checkpoint", "kind": kind, "ahead": hit, **kill})
            # the records grow between kills: new records, more points, some finish
            for _ in range(rng.randint(1, 3)):
                new_record()
            for rec in rng.sample(list(recs.values()), 4):
                if not rec.lines[-1].count('"run_finished"'):
                    rec.metrics(rng.randint(1, 10), keys=("loss", "acc", "auc"))
                    if rng.random() < 0.3:
                        rec.add("run_finished", status="FINISHED")
                    rec.flush()
        assert KILLS.count("checkpoint") >= KILLS_PLANNED["checkpoint"], KILLS.kills

        from mlflow.tracking import MlflowClient

        clean_backfill(root, tracking_uri, state, workdir)
        assert_exact(MlflowClient(tracking_uri), expected_from_files(root), workdir)
        verify_if_available(root, tracking_uri, state, workdir)
        print(
            f"checkpoint kills: {KILLS.count('checkpoint')}, leaving MLflow ahead of the"
            f" ledger in {ahead} records:",
            [k for k in KILLS.kills if k["category"] == "checkpoint"],
        )


def test_kills_during_artifact_uploads(workdir: Path, tracking_uri: str) -> None:
    """Records with artifacts of a few MB: kills fire as artifact bytes land."""
    store = Path(tracking_uri.removeprefix("sqlite:///"))
    state = workdir / "state"
    uploaded = store.parent / "mlartifacts"
    with seeded("artifacts") as rng:
        root = workdir / "runs"
        sizes = set()
        for i in range(5):
            rec = Rec(root / f"a{i}", f"art-{i}")
            rec.metrics(3)
            for j in range(2):
                data = rng.randbytes(rng.randint(1_500_000, 4_000_000))
                sizes.add(len(data))
                rec.artifact(f"blob{j}.bin", data, artifact_path="blobs" if j else None)
            rec.add("run_finished", status="FINISHED")
            rec.flush()
        total = sum(sizes)
        partial = 0
        attempts = 0
        while KILLS.count("artifacts") < KILLS_PLANNED["artifacts"] and attempts < 15:
            attempts += 1
            kind = rng.choice(["backfill", "run"])
            have = tree_bytes(uploaded)
            before = ledger_events(state)
            goal = have + rng.randint(1, max(1, (total - have) // 2))
            proc = spawn(kind, root, tracking_uri, state, workdir / "syncd.log")
            kill = kill_when(
                proc,
                # a file caught half-copied fires at once; else enough new bytes
                lambda: goal if torn_files(uploaded, sizes) else tree_bytes(uploaded),  # noqa: B023
                goal,
                rng.uniform(0.0, 1.5),
                not_before=lambda: ledger_events(state) > before,  # noqa: B023
            )
            if kill is not None:
                torn = torn_files(uploaded, sizes)
                partial += len(torn)
                KILLS.kills.append(
                    {"category": "artifacts", "kind": kind, "torn": len(torn), **kill}
                )
        assert KILLS.count("artifacts") >= KILLS_PLANNED["artifacts"], KILLS.kills

        from mlflow.tracking import MlflowClient

        clean_backfill(root, tracking_uri, state, workdir)
        assert_exact(MlflowClient(tracking_uri), expected_from_files(root), workdir)
        verify_if_available(root, tracking_uri, state, workdir)
        print(
            f"artifact kills: {KILLS.count('artifacts')}, torn artifact files seen right"
            f" after a kill: {partial}:",
            [k for k in KILLS.kills if k["category"] == "artifacts"],
        )


def test_kills_in_the_middle_of_a_long_record(workdir: Path, tracking_uri: str) -> None:
    """40,000 metric points in one record: kills fire on MLflow's metric row count."""
    store = Path(tracking_uri.removeprefix("sqlite:///"))
    state = workdir / "state"
    with seeded("long_record") as rng:
        root = workdir / "runs"
        rec = Rec(root / "long", "long-1")
        rec.add("params", params={"epochs": "20000"})
        rec.metrics(20_000)  # two keys: 40,000 points
        rec.add("run_finished", status="FINISHED")
        rec.flush()
        total = 40_000
        attempts = 0
        while KILLS.count("long_record") < KILLS_PLANNED["long_record"] and attempts < 15:
            attempts += 1
            kind = rng.choice(["backfill", "run"])
            have = metric_rows(store)
            proc = spawn(kind, root, tracking_uri, state, workdir / "syncd.log")
            kill = kill_when(
                proc,
                lambda: metric_rows(store),
                have + rng.randint(1, max(1, (total - have) // 3)),
                rng.uniform(0.0, 3.0),
                not_before=lambda: metric_rows(store) > have,  # noqa: B023
            )
            if kill is not None:
                KILLS.kills.append({"category": "long_record", "kind": kind, **kill})
        assert KILLS.count("long_record") >= KILLS_PLANNED["long_record"], KILLS.kills

        from mlflow.tracking import MlflowClient

        clean_backfill(root, tracking_uri, state, workdir)
        assert_exact(MlflowClient(tracking_uri), expected_from_files(root), workdir)
        verify_if_available(root, tracking_uri, state, workdir)
        print("long record kills:", [k for k in KILLS.kills if k["category"] == "long_record"])


# -- 3. the state dir unusable or full; 4. the ledger corrupt -------------------------


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single ``syncd: ...`` line a failed command printed, with no traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.startswith("syncd: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def small_records(root: Path, prefix: str, count: int, rng: random.Random) -> None:
    for i in range(count):
        rec = Rec(root / f"{prefix}{i}", f"{prefix}-{i}")
        rec.add("params", params={"i": str(i)})
        rec.metrics(rng.randint(2, 20))
        rec.artifact("notes.txt", rng.randbytes(2000))
        rec.add("run_finished", status="FINISHED")
        rec.flush()


def test_state_dir_that_is_a_file_is_a_clear_error(workdir: Path, tracking_uri: str) -> None:
    """A regular file where the state dir should be: fails for root too (ENOTDIR)."""
    from mlflow.tracking import MlflowClient

    with seeded("state_file") as rng:
        root = workdir / "runs"
        small_records(root, "sf", 3, rng)
        state = workdir / "state"
        state.write_text("not a folder\n")
        done = run_syncd(
            "backfill",
            str(root),
            "--tracking-uri",
            tracking_uri,
            "--state-dir",
            str(state),
            cwd=workdir,
        )
        assert done.returncode == 2
        message = one_line_error(done)
        assert str(state) in message and "not a directory" in message, message
        assert runs_by_record(MlflowClient(tracking_uri)) == {}  # nothing written

        state.unlink()  # the condition lifted
        clean_backfill(root, tracking_uri, state, workdir)
        assert_exact(MlflowClient(tracking_uri), expected_from_files(root), workdir)


def _no_room_for_files() -> None:
    """In the child: every file write fails with EFBIG (RLIMIT_FSIZE 0), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_full_state_dir_fails_clearly_and_a_later_backfill_is_exact(
    workdir: Path, tracking_uri: str
) -> None:
    """No byte can be written (RLIMIT_FSIZE 0 in the child, SIGXFSZ ignored: EFBIG)."""
    from mlflow.tracking import MlflowClient

    with seeded("state_full") as rng:
        root = workdir / "runs"
        small_records(root, "full", 4, rng)
        state = workdir / "state"
        done = subprocess.run(
            [
                SYNCD,
                "backfill",
                str(root),
                "--tracking-uri",
                tracking_uri,
                "--state-dir",
                str(state),
            ],
            cwd=workdir,
            env=syncd_env(),
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_no_room_for_files,
            check=False,
        )
        assert done.returncode != 0
        message = one_line_error(done)
        assert str(state / "ledger.db") in message and "full or read-only" in message, message
        assert runs_by_record(MlflowClient(tracking_uri)) == {}

        clean_backfill(root, tracking_uri, state, workdir)  # the limit lifted
        assert_exact(MlflowClient(tracking_uri), expected_from_files(root), workdir)


def test_corrupt_ledger_names_the_file_and_the_way_out(workdir: Path, tracking_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    with seeded("ledger_corrupt") as rng:
        root = workdir / "runs"
        small_records(root, "lc", 4, rng)
        state = workdir / "state"
        clean_backfill(root, tracking_uri, state, workdir)
        client = MlflowClient(tracking_uri)
        run_ids = {rid: run.info.run_id for rid, run in runs_by_record(client).items()}
        ledger = state / "ledger.db"
        with ledger.open("r+b") as fh:  # the first pages overwritten with garbage
            fh.write(rng.randbytes(rng.randint(2, 4) * 4096))

        done = run_syncd(
            "backfill",
            str(root),
            "--tracking-uri",
            tracking_uri,
            "--state-dir",
            str(state),
            cwd=workdir,
        )
        assert done.returncode == 1
        message = one_line_error(done)
        assert str(ledger) in message and "corrupt" in message, message
        assert "delete it" in message and "syncd.record_id" in message, message

        for rec_dir in sorted(root.iterdir())[:2]:  # the records grew meanwhile
            with (rec_dir / "run_record.jsonl").open("a") as fh:
                seq = (rec_dir / "run_record.jsonl").read_text().count("\n")
                fh.write(line(seq, "tags", tags={"after": "corruption"}))
        ledger.unlink()
        clean_backfill(root, tracking_uri, state, workdir)
        assert_exact(client, expected_from_files(root), workdir)
        adopted = {rid: run.info.run_id for rid, run in runs_by_record(client).items()}
        assert adopted == run_ids  # every run adopted by its syncd.record_id, none duplicated


# -- 5. faults under a running daemon: MLflow killed, the ledger failing, records rewritten --


def wait_exact(
    client: Any,
    expected: dict[str, Expect],
    workdir: Path,
    timeout: float,
    experiments: list[str] | None = None,
) -> None:
    """Poll until the mirror is exact; a duplicate run fails at once (it never goes away)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            problems = mirror_problems(client, expected, workdir, experiments)
        except OSError as exc:  # the server not answering yet
            problems = [f"MLflow: {exc}"]
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the mirror is not exact after {timeout}s:\n" + "\n".join(problems[:20])
            )
        time.sleep(0.5)


class Appender:
    """A training job in a thread: metrics for every recorder at a steady pace, one step at
    a time, until stopped: the stream a fault lands in the middle of."""

    def __init__(self, recorders: list[RunRecorder], every_s: float = 0.05) -> None:
        self.recorders = recorders
        self.every_s = every_s
        self.step = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="appender", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for i, rec in enumerate(self.recorders):
                    rec.log_metrics(
                        {"loss": 1 / (self.step + 1), "acc": i + self.step / 1000}, self.step
                    )
                self.step += 1
                self._stop.wait(self.every_s)  # the job's pace, not a synchronisation
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Appender:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert self.error is None, f"the appender failed: {self.error!r}"


def readyz(syncd: SyncdProcess) -> tuple[int, list[str]]:
    code, body = syncd.health("/readyz")
    return code, list(body.get("reasons", []))


def test_mlflow_server_killed_and_restarted_under_the_daemon(
    workdir: Path, mlflow_template: Path
) -> None:
    """A real ``mlflow server`` (SQLite, served artifacts) is SIGKILLed, process group and
    all, while ``syncd run`` mirrors records that keep growing; it comes back on the same
    port and store. /readyz is 503 for as long as it is down and 200 after, the daemon
    never exits, and every record lands exactly once; ``syncd verify`` agrees."""
    from mlflow.tracking import MlflowClient

    with seeded("server_kill") as rng:
        server = MlflowServerProcess(workdir / "server", mlflow_template)
        server.start()
        syncd: SyncdProcess | None = None
        try:
            root = workdir / "runs"
            state = workdir / "state"
            recorders = []
            for i in range(3):
                rec = RunRecorder(root / f"job{i}", experiment="killed-server").start()
                rec.log_params({"lr": f"0.0{i + 1}", "job": str(i)})
                (rec.run_dir / "config.json").write_text(json.dumps({"job": i}))
                rec.log_artifact(rec.run_dir / "config.json", artifact_path="config")
                recorders.append(rec)
            syncd = SyncdProcess(
                workdir, str(root), "--tracking-uri", server.uri, "--state-dir", str(state)
            )
            syncd.wait_ready()
            with Appender(recorders) as job:
                # the kill: on the server's metric rows or a time offset, both seeded
                target = rng.randint(30, 300)
                after_s = rng.uniform(0.5, 3.0)
                wait_for(lambda: metric_rows(server.db) > 0, 60, what="first points in MLflow")
                armed = time.monotonic()
                wait_for(
                    lambda: metric_rows(server.db) >= target or time.monotonic() - armed > after_s,
                    60,
                    what="the kill point",
                )
                assert server.proc is not None
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
                server.proc = None
                killed_at = {"rows": metric_rows(server.db), "step": job.step}
                print(
                    f"mlflow server SIGKILLed at {killed_at} (target {target} rows, {after_s:.2f} s)"
                )

                wait_for(lambda: readyz(syncd)[0] == 503, 30, what="/readyz 503 with MLflow down")
                codes, reasons = [], set()
                deadline = time.monotonic() + 30
                while job.step < killed_at["step"] + 40:  # the job goes on during the outage
                    assert time.monotonic() < deadline, "the appender stalled"
                    code, why = readyz(syncd)
                    codes.append(code)
                    reasons.update(why)
                    assert syncd.proc.poll() is None, syncd.logs()[-5000:]
                    time.sleep(0.1)
                assert set(codes) == {503}, f"/readyz while MLflow was down: {Counter(codes)}"
                assert any(r.startswith("MLflow unreachable") for r in reasons), reasons
                assert syncd.health("/healthz")[0] == 200

                server.start()  # same port, same store, same artifacts
                wait_for(lambda: readyz(syncd)[0] == 200, 90, what="/readyz 200 after the restart")
                steps_after = job.step
                wait_for(lambda: job.step >= steps_after + 10, 30, what="appends after the restart")
            for rec in recorders:
                (rec.run_dir / "model.bin").write_bytes(rng.randbytes(rng.randint(10_000, 200_000)))
                rec.log_artifact(rec.run_dir / "model.bin", artifact_path="model")
                rec.finish(rng.choice(["FINISHED", "FAILED"]))

            client = MlflowClient(server.uri)
            wait_exact(client, expected_from_files(root), workdir, 90)
            assert syncd.proc.poll() is None, "the daemon exited"
            assert syncd.health("/readyz")[0] == 200
            assert syncd.stop() == 0
            done = run_syncd(
                "verify",
                str(root),
                "--tracking-uri",
                server.uri,
                "--state-dir",
                str(state),
                cwd=workdir,
            )
            assert done.returncode == 0, (
                f"syncd verify: {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        finally:
            if syncd is not None:
                syncd.kill()
                print(syncd.logs()[-10000:])  # shown when the test fails
            server.stop()


# SIGXFSZ ignored, then the syncd script exec'd: an ignored disposition survives exec, so
# a file size limit set later from outside makes writes fail with EFBIG instead of killing.
_IGNORE_SIGXFSZ_AND_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
    " os.execv(sys.argv[1], sys.argv[1:])"
)


class PipedDaemon:
    """``syncd run`` whose logs come through a pipe (a file size limit on the process must
    not silence it), started with SIGXFSZ ignored."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _IGNORE_SIGXFSZ_AND_EXEC,
                SYNCD,
                "run",
                *args,
                "--health-addr",
                f"127.0.0.1:{self.port}",
                "--log-format",
                "json",
            ],
            cwd=workdir,
            env=syncd_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="syncd-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def health(self, path: str) -> tuple[int, dict[str, Any]]:
        code, body = http_get(f"http://127.0.0.1:{self.port}{path}")
        return code, json.loads(body)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for raw in list(self.lines):
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
        return out

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"syncd exited with {self.proc.returncode}:\n{self.logs()}")
        return True

    def logs(self) -> str:
        return "".join(self.lines)[-10000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)


def test_daemon_whose_ledger_fills_up_stays_up_and_recovers(
    workdir: Path, mlflow_server: MlflowServerProcess
) -> None:
    """``syncd run`` whose ledger writes start failing (RLIMIT_FSIZE 0 set on the running
    process, SIGXFSZ ignored: every file write is EFBIG, as on a full disk) while records
    grow. MLflow is a server in another process, so only the ledger fails. /readyz turns
    503 naming the ledger, /healthz stays 200, the daemon stays up and keeps retrying
    (MLflow may get writes ahead of the ledger meanwhile); once the limit is lifted it
    recovers by itself and every record lands exactly once."""
    from mlflow.tracking import MlflowClient

    with seeded("daemon_state_full") as rng:
        experiment = unique_experiment("ledger-full")
        root = workdir / "runs"
        state = workdir / "state"
        ledger = state / "ledger.db"
        client = MlflowClient(mlflow_server.uri)
        recorders = []
        for i in range(2):
            rec = RunRecorder(root / f"job{i}", experiment=experiment).start()
            rec.log_params({"job": str(i)})
            for step in range(rng.randint(3, 10)):
                rec.log_metrics({"loss": 1 / (step + 1)}, step=step)
            recorders.append(rec)
        syncd = PipedDaemon(
            workdir, str(root), "--tracking-uri", mlflow_server.uri, "--state-dir", str(state)
        )
        try:
            wait_for(lambda: syncd.alive() and syncd.health("/readyz")[0] == 200, 60, what="ready")
            wait_exact(client, expected_from_files(root), workdir, 60, [experiment])

            soft, hard = resource.prlimit(syncd.proc.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(syncd.proc.pid, resource.RLIMIT_FSIZE, (0, hard))
            # the jobs go on: more points, and a run born while the ledger is full
            late = RunRecorder(root / "late", experiment=experiment).start()
            recorders.append(late)
            failures_before = len(syncd.events("ledger_failed"))
            step = 100
            healthz: list[int] = []

            def ledger_failing_twice() -> bool:
                nonlocal step
                for rec in recorders:
                    rec.log_metrics({"loss": 1 / step}, step=step)
                step += 1
                healthz.append(syncd.health("/healthz")[0])
                syncd.alive()
                return len(syncd.events("ledger_failed")) >= failures_before + 2

            wait_for(ledger_failing_twice, 60, 0.2, "two failed ledger writes")
            code, body = syncd.health("/readyz")
            assert code == 503, body
            named = [r for r in body["reasons"] if r.startswith("ledger failing")]
            assert named and str(ledger) in named[0], body["reasons"]
            assert "full or read-only" in named[0], named
            assert set(healthz) == {200}, f"/healthz while the ledger failed: {Counter(healthz)}"
            assert body["sink_up"] is True, body  # MLflow itself is fine

            resource.prlimit(syncd.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))  # lifted
            wait_for(
                lambda: syncd.alive() and syncd.health("/readyz")[0] == 200,
                60,
                what="/readyz 200 once the ledger can be written again",
            )
            assert syncd.events("ledger_recovered"), syncd.logs()
            for rec in recorders:
                rec.log_metrics({"loss": 0.0}, step=step)
                rec.finish()
            wait_exact(client, expected_from_files(root), workdir, 60, [experiment])
            syncd.alive()
            assert syncd.stop() == 0
        finally:
            syncd.stop()
            print(syncd.logs())  # shown when the test fails


def test_a_run_resolved_again_after_its_binding_was_lost_is_adopted(tracking_uri: str) -> None:
    """The sink created the run, then the ledger could not keep the binding (the daemon's
    ledger full above): resolving the record again adopts that run instead of creating a
    second one, even in an experiment the same sink created."""
    from mlflow.tracking import MlflowClient

    from syncd.projection import RECORD_ID_TAG, RunSpec
    from syncd.sink import MlflowSink

    sink = MlflowSink(tracking_uri)
    spec = RunSpec("lost-binding", "fresh-exp", "r", T0, {RECORD_ID_TAG: "lost-binding"}, None)
    first = sink.resolve_run(spec, None)
    again = sink.resolve_run(spec, None)
    assert first.created and not again.created
    assert again.run_id == first.run_id
    assert list(runs_by_record(MlflowClient(tracking_uri))) == ["lost-binding"]


Points = Counter[tuple[int, int, float]]  # (step, timestamp, value) -> how many times


def points_in(text: str) -> dict[str, Points]:
    """Metric points per key that the complete lines of a record's text call for."""
    out: dict[str, Points] = {}
    for raw in text[: text.rfind("\n") + 1].splitlines():
        event = json.loads(raw)
        if event["type"] == "metrics":
            for key, value in event["metrics"].items():
                out.setdefault(key, Counter())[
                    (event.get("step", 0), event["ts"], float(value))
                ] += 1
    return out


def points_of_run(client: Any, run_id: str, keys: set[str]) -> dict[str, Points]:
    return {
        key: Counter((p.step, p.timestamp, p.value) for p in client.get_metric_history(run_id, key))
        for key in keys
    }


def test_records_truncated_replaced_or_recreated_under_the_daemon(
    workdir: Path, tracking_uri: str
) -> None:
    """Records rewritten while ``syncd run`` follows them. docs/record-format.md: when a file
    no longer starts with what was already synced, syncd logs why and projects it again
    from the start, and the writes are idempotent. MLflow never deletes what was written.
    So, per sub-case, with one run per record_id throughout:

    (a) truncated to a shorter valid prefix, then regrown with different lines (a1: the
        daemon sees the shorter file first; a2: truncated and regrown in one go, longer
        than before): the record_id keeps its run (same run id); every metric point of
        the final file is in it exactly once; its params, tags (a later value wins) and
        status (the final ``run_finished``) are the final file's. The points of the lines
        the truncation dropped were already written and may stay: the run holds the
        final file's points plus, at most once each, those dropped points, and nothing
        else. (So ``syncd verify`` may report extra points here; it is not asserted.)
    (b) replaced by an atomic rename with a record of a NEW record_id: the new record_id
        gets a new run holding exactly the new file's points, params and status; the old
        record_id's run is left as it was (its points unchanged, no second run).
    (c) deleted (the daemon marks it gone) and recreated under the same name with the
        SAME record_id, as a resumed job rewriting its whole record (the same events,
        serialised differently, then ``run_resumed``, more points, ``run_finished``):
        the same run continues (same run id) and holds exactly the final file's points,
        the re-projected ones not twice.
    In every sub-case the daemon logs ``record_replaced`` for the file and stays up.
    """
    from mlflow.tracking import MlflowClient

    root = workdir / "runs"
    state = workdir / "state"

    def regrow(rec: Rec, keep: int, steps: range, base: float, status: str) -> str:
        """The first ``keep`` lines of ``rec``, then different lines (own values, later ts)."""
        lines = rec.lines[:keep]
        seq = keep - 1
        for step in steps:
            seq += 1
            ts = T0 + 3_600_000 + seq * 1000
            lines.append(line(seq, "metrics", ts, step=step, metrics={"loss": base + step}))
        lines.append(line(seq + 1, "tags", T0 + 3_600_000, tags={"phase": "regrown"}))
        lines.append(line(seq + 2, "run_finished", T0 + 3_700_000, status=status))
        return "".join(lines)

    a1 = Rec(root / "a1", "shrunk-then-regrown")
    a1.add("params", params={"lr": "0.1"})
    a1.metrics(10, keys=("loss",))
    a1.add("tags", tags={"phase": "old"})
    a2 = Rec(root / "a2", "rewritten-in-place")
    a2.add("params", params={"lr": "0.2"})
    a2.metrics(8, keys=("loss",))
    a2.add("run_finished", status="FINISHED")
    b_old = Rec(root / "b", "replaced-old")
    b_old.add("params", params={"v": "1"})
    b_old.metrics(6)
    b_old.add("run_finished", status="FINISHED")
    c = Rec(root / "c", "recreated")
    c.add("params", params={"lr": "0.3"})
    c.metrics(6)
    for rec in (a1, a2, b_old, c):
        rec.flush()
    old_text = {rec.record_id: rec.text() for rec in (a1, a2, b_old, c)}

    client = MlflowClient(tracking_uri)
    syncd = SyncdProcess(
        workdir, str(root), "--tracking-uri", tracking_uri, "--state-dir", str(state)
    )
    try:
        syncd.wait_ready()
        wait_exact(client, expected_from_files(root), workdir, 60)
        run_ids = {rid: run.info.run_id for rid, run in runs_by_record(client).items()}

        def logged(event: str, path: Path) -> bool:
            assert syncd.proc.poll() is None, f"syncd exited:\n{syncd.logs()[-5000:]}"
            return any(
                e.get("event") == event and e.get("file") == str(path) for e in syncd.log_events()
            )

        # (a1) truncated to a valid prefix; once the daemon saw it, regrown differently
        a1_final = regrow(a1, 6, range(4, 12), 100.0, "FAILED")
        os.truncate(a1.path, len("".join(a1.lines[:6]).encode()))
        wait_for(lambda: logged("record_replaced", a1.path), 30, what="a1 seen shorter")
        with a1.path.open("a") as fh:
            fh.write(a1_final[len("".join(a1.lines[:6])) :])
        # (a2) truncated and regrown in one go, longer than before
        a2_final = regrow(a2, 5, range(3, 13), 200.0, "KILLED")
        with a2.path.open("r+") as fh:
            fh.truncate(len("".join(a2.lines[:5])))
            fh.seek(0, os.SEEK_END)
            fh.write(a2_final[len("".join(a2.lines[:5])) :])
        # (b) replaced by an atomic rename: a record with a new record_id
        b_new = Rec(workdir / "staging", "replaced-new")
        b_new.add("params", params={"v": "2"})
        b_new.metrics(4, keys=("loss", "auc"))
        b_new.add("run_finished", status="FINISHED")
        tmp = b_old.path.with_name("run_record.jsonl.tmp")
        tmp.write_text(b_new.text())
        os.replace(tmp, b_old.path)
        # (c) deleted; once the daemon saw it gone, rewritten whole by the resumed job
        c.path.unlink()
        wait_for(lambda: logged("record_gone", c.path), 30, what="c seen gone")
        c_final = "".join(json.dumps(json.loads(raw)) + "\n" for raw in c.lines)
        synced_lines = len(c.lines)
        c.add("run_resumed")
        c.metrics(4)
        c.add("run_finished", status="FINISHED")
        c_final += c.text(synced_lines)
        c.path.write_text(c_final)

        rids = ("shrunk-then-regrown", "rewritten-in-place", "replaced-new", "recreated")
        finals = {
            rid: (root / d / "run_record.jsonl").read_text()
            for rid, d in zip(rids, ("a1", "a2", "b", "c"), strict=True)
        }
        assert (
            finals["shrunk-then-regrown"] == a1_final and finals["rewritten-in-place"] == a2_final
        )
        expected = expected_from_files(root)
        assert set(expected) == set(rids)

        def problems() -> list[str]:
            out = []
            runs = runs_by_record(client)  # raises on a second run for a record_id
            want_ids = {**run_ids}
            want_ids.pop("replaced-old")
            for rid in ("shrunk-then-regrown", "rewritten-in-place", "recreated"):
                if runs[rid].info.run_id != want_ids[rid]:
                    out.append(f"{rid}: run {runs[rid].info.run_id}, not {want_ids[rid]}")
            if "replaced-new" not in runs:
                return [*out, "replaced-new: no run"]
            if runs["replaced-new"].info.run_id == run_ids["replaced-old"]:
                out.append("replaced-new: written into the old record's run")
            # (b), (c): exact; (a): the final file's points once each, plus dropped ones
            out += mirror_problems(
                client, {k: expected[k] for k in ("replaced-new", "recreated")}, workdir
            )
            for rid in ("shrunk-then-regrown", "rewritten-in-place"):
                run, exp = runs[rid], expected[rid]
                if dict(run.data.params) != exp.params:
                    out.append(f"{rid}: params {dict(run.data.params)} != {exp.params}")
                if {k: run.data.tags.get(k) for k in exp.tags} != exp.tags:
                    out.append(f"{rid}: tags {dict(run.data.tags)} lack {exp.tags}")
                if run.info.status != exp.status:
                    out.append(f"{rid}: status {run.info.status} != {exp.status}")
                final, before = points_in(finals[rid]), points_in(old_text[rid])
                have = points_of_run(client, run.info.run_id, set(final) | set(before))
                for key in set(final) | set(before):
                    want = final.get(key, Counter())
                    dropped = before.get(key, Counter()) - want  # lines the truncation cut
                    got = have[key]
                    if want - got:
                        out.append(f"{rid}: {key} lacks {sorted(want - got)[:5]}")
                    if (got - want) - dropped:
                        out.append(
                            f"{rid}: {key} has duplicates or points no version of the file"
                            f" held: {sorted((got - want) - dropped)[:5]}"
                        )
            old = runs["replaced-old"]
            old_points = points_of_run(client, old.info.run_id, {"loss", "acc"})
            if old_points != points_in(old_text["replaced-old"]) or old.info.status != "FINISHED":
                out.append("replaced-old: its run was changed")
            return out

        deadline = time.monotonic() + 60
        while found := problems():
            assert time.monotonic() < deadline, (
                "the mirror is not what the files say:\n" + "\n".join(found)
            )
            time.sleep(0.5)
        for rec in (a1, a2, b_old, c):
            assert logged("record_replaced", rec.path), f"no record_replaced for {rec.path}"
        assert syncd.stop() == 0
    finally:
        syncd.kill()
        print(syncd.logs()[-10000:])  # shown when the test fails
