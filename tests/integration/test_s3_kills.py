"""``syncd run`` over an s3:// root (moto's server), SIGKILLed mid-sync and restarted.

The writer is the project's RunRecorder, writing each record locally and
uploading the whole object after every change (as a writer on S3 does), with
file and folder artifacts uploaded before the line that names them. While the
daemon syncs, the records keep growing; it is SIGKILLed at moments picked from
what it is doing (an artifact being staged, ledger rows, MLflow metric rows),
never on a fixed sleep, and restarted each time. At the end the mirror must be
exact: one run per record, every point once, every artifact once with the same
bytes, children linked to their parent, and no staging folder left behind.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import SYNCD, SyncdProcess, run_syncd, wait_for
from helpers import artifact_files, runs_by_record
from moto_s3 import CREDENTIALS, Bucket
from test_fault_injection import ledger_events, metric_rows, seeded

from syncd import RunRecorder
from syncd.artifacts import STAGE_PREFIX

pytestmark = pytest.mark.slow

POLL = 0.5  # seconds between listings
KILLS = 3
EXPERIMENT = "s3-kills"


@dataclass
class Writer:
    """One record written by RunRecorder in a local folder and uploaded whole to S3."""

    bucket: Bucket
    local: Path
    prefix: str  # key prefix of the run directory
    recorder: RunRecorder
    points: Counter[str] = field(default_factory=Counter)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # MLflow path -> bytes
    step: int = 0

    def upload_record(self) -> None:
        self.bucket.put(f"{self.prefix}/run_record.jsonl", self.recorder.path.read_bytes())

    def grow(self, steps: int) -> None:
        for _ in range(steps):
            self.recorder.log_metrics({"loss": 1.0 / (self.step + 1), "acc": self.step}, self.step)
            self.points.update(("loss", "acc"))
            self.step += 1
        self.upload_record()

    def add_file(self, name: str, data: bytes) -> None:
        (self.local / name).write_bytes(data)
        self.bucket.put(f"{self.prefix}/{name}", data)
        self.recorder.log_artifact(name)
        self.artifacts[name] = data
        self.upload_record()

    def add_folder(self, name: str, files: dict[str, bytes], artifact_path: str) -> None:
        for rel, data in files.items():
            (self.local / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.local / name / rel).write_bytes(data)
            self.bucket.put(f"{self.prefix}/{name}/{rel}", data)
            self.artifacts[f"{artifact_path}/{rel}"] = data
        self.recorder.log_artifact(name, artifact_path=artifact_path)
        self.upload_record()


def stage_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob(f"{STAGE_PREFIX}*"))


def start(workdir: Path, tracking_uri: str, root: str, endpoint: str, tmp: Path) -> SyncdProcess:
    env = {
        **CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "SYNCD_WATCH__S3_POLL_INTERVAL": str(POLL),
        "SYNCD_TIMEOUTS__HTTP": "5",
        "TMPDIR": str(tmp),  # where artifacts are staged
    }
    return SyncdProcess(
        workdir,
        root,
        "--tracking-uri",
        tracking_uri,
        "--state-dir",
        str(workdir / ".syncd"),
        env=env,
    )


def mirror_problems(client: Any, writers: dict[str, Writer], parent: str, dl: Path) -> list[str]:
    """Every way MLflow differs from what the writers wrote (empty: exact)."""
    runs = runs_by_record(client, [EXPERIMENT])  # raises on a second run for a record_id
    problems = []
    for rid, w in writers.items():
        run = runs.get(rid)
        if run is None:
            problems.append(f"{rid}: no run")
            continue
        run_id = run.info.run_id
        if run.info.status != "FINISHED":
            problems.append(f"{rid}: status {run.info.status}")
        for key, count in w.points.items():
            history = client.get_metric_history(run_id, key)
            steps = {p.step for p in history}
            if len(history) != count or len(steps) != count:
                problems.append(
                    f"{rid}: {key}: {len(history)} points, {len(steps)} steps != {count}"
                )
        files = artifact_files(client, run_id)
        if files != sorted(w.artifacts):
            problems.append(f"{rid}: artifacts {files} != {sorted(w.artifacts)}")
            continue
        for path, data in w.artifacts.items():
            dst = dl / run_id
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True)
            got = Path(client.download_artifacts(run_id, path, str(dst))).read_bytes()
            if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
                problems.append(f"{rid}: artifact {path}: {len(got)} bytes, not the {len(data)}")
        want_parent = runs[parent].info.run_id if rid != parent and parent in runs else None
        if run.data.tags.get("mlflow.parentRunId") != want_parent:
            problems.append(f"{rid}: parent {run.data.tags.get('mlflow.parentRunId')}")
    return problems


def test_sigkilled_daemon_over_an_s3_root_leaves_an_exact_mirror(
    bucket: Bucket, tracking_uri: str, client: Any, workdir: Path
) -> None:
    store = Path(tracking_uri.removeprefix("sqlite:///"))
    state = workdir / ".syncd"
    tmp = workdir / "tmp"
    tmp.mkdir()
    root = bucket.uri("runs")
    began = time.monotonic()
    with seeded("s3_kills") as rng:
        writers: dict[str, Writer] = {}

        def new_writer(name: str, parent: str | None = None) -> Writer:
            local = workdir / "writer" / name
            recorder = RunRecorder(local, experiment=EXPERIMENT, run_name=name, parent=parent)
            w = Writer(bucket, local, f"runs/{name}", recorder.start())
            recorder.log_params({"name": name, "lr": rng.random()})
            w.grow(rng.randint(3, 10))
            writers[recorder.record_id] = w
            return w

        sweep = new_writer("sweep")
        parent = sweep.recorder.record_id
        trials = [new_writer(f"trial-{i}", parent) for i in range(3)]
        for i, w in enumerate(trials):
            w.add_file("model.bin", rng.randbytes(rng.randint(500_000, 2_000_000)))
            if i % 2 == 0:
                files = {f"shard-{j}.bin": rng.randbytes(300_000) for j in range(2)}
                w.add_folder("ckpt", {**files, "meta/info.txt": b"epoch 0\n"}, "checkpoints")

        added = 0

        def grow_one() -> None:
            """One writer change: more points, now and then a new file or folder artifact."""
            nonlocal added
            w = rng.choice([*trials, sweep])
            if rng.random() < 0.15:
                added += 1
                if added % 2:
                    w.add_file(f"extra-{added}.bin", rng.randbytes(rng.randint(200_000, 1_500_000)))
                else:
                    files = {f"part-{j}.bin": rng.randbytes(200_000) for j in range(3)}
                    w.add_folder(f"eval-{added}", files, f"eval/{added}")
            else:
                w.grow(rng.randint(1, 20))

        triggers = rng.sample(["stage", "ledger", "metrics"], KILLS)
        kills: list[dict[str, Any]] = []
        for trigger in triggers:
            proc = start(workdir, tracking_uri, root, bucket.endpoint, tmp)
            try:
                proc.wait_ready()
                leftover = [d for d in stage_dirs(tmp) if f"{proc.proc.pid}-" not in d.name]
                assert leftover == [], f"stale staging folders after a restart: {leftover}"
                events, rows = ledger_events(state), metric_rows(store)
                ledger_goal, rows_goal = events + rng.randint(1, 12), rows + rng.randint(1, 60)
                due = {
                    "stage": lambda: bool(stage_dirs(tmp)),
                    "ledger": lambda: ledger_events(state) >= ledger_goal,  # noqa: B023
                    "metrics": lambda: metric_rows(store) >= rows_goal,  # noqa: B023
                }[trigger]
                fired = kill_while_growing(
                    proc,
                    due,
                    lambda: ledger_events(state) > events,  # noqa: B023 (this process wrote)
                    grow_one,
                    rng.uniform(2.0, 5.0),
                )
                kills.append(
                    {
                        "at_s": round(time.monotonic() - began, 1),
                        "planned": trigger,
                        "fired_by": fired,
                        "ledger_rows": ledger_events(state) - events,
                        "stage_dirs_left": len(stage_dirs(tmp)),
                    }
                )
            finally:
                proc.kill()
        for w in writers.values():  # the writers finish; the last upload of each record
            w.grow(1)
            w.recorder.finish()
            w.upload_record()

        proc = start(workdir, tracking_uri, root, bucket.endpoint, tmp)
        try:
            proc.wait_ready()
            assert [d for d in stage_dirs(tmp) if f"{proc.proc.pid}-" not in d.name] == []
            dl = workdir / "downloads"
            restarted = time.monotonic() - began
            wait_for(
                lambda: not mirror_problems(client, writers, parent, dl),
                45,
                0.5,
                "an exact mirror after the restarts",
            )
            assert proc.stop(signal.SIGTERM) == 0
        finally:
            proc.kill()

        problems = mirror_problems(client, writers, parent, workdir / "downloads")
        assert not problems, problems
        assert stage_dirs(tmp) == []  # nothing staged is left behind
        assert len(kills) == KILLS and all(k["fired_by"] for k in kills), kills
        done = run_syncd(
            "verify", root, "--tracking-uri", tracking_uri, "--state-dir", str(state), cwd=workdir
        )
        assert done.returncode == 0, done.stdout + done.stderr
    print(
        f"s3 kills: {kills}; last restart at {restarted:.1f}s,"
        f" all done in {time.monotonic() - began:.1f}s ({SYNCD})"
    )


def kill_while_growing(
    proc: SyncdProcess,
    due: Callable[[], bool],
    writing: Callable[[], bool],
    grow: Callable[[], None],
    after_s: float,
) -> str:
    """Grow the records while ``proc`` syncs; SIGKILL it once ``due()`` holds, else
    ``after_s`` seconds after ``writing()`` first held. Returns what fired the kill."""
    armed: float | None = None
    next_growth = time.monotonic()
    deadline = time.monotonic() + 60
    while True:
        assert proc.proc.poll() is None, f"syncd exited by itself:\n{proc.logs()[-3000:]}"
        now = time.monotonic()
        if now >= next_growth:
            grow()
            next_growth = now + 0.2
        if armed is None and writing():
            armed = now
        fired = "condition" if due() else ("time" if armed and now - armed >= after_s else "")
        if fired:
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait()
            return fired
        assert now < deadline, f"syncd did no work in 60 s:\n{proc.logs()[-3000:]}"
        time.sleep(0.005)
