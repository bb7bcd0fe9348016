"""Contention: N trainers at once on a fresh SQLite store, logging directly vs RunRecorder + daemon.

    uv run pytest tests/benchmarks/test_contention.py -m benchmark -s

For 8 and 32 concurrent trainers (SYNCD_BENCH_CONTENTION_STEPS steps of 4 metrics
each, default 100), started at the same instant on a store that does not exist yet:

- direct: each trainer logs with MLflow's fluent API into ``sqlite:///mlflow.db``,
  once on a store that does not exist yet (all create it at once) and once on a
  store already created and migrated (the logging cost under contention);
- recorder: each trainer logs with ``RunRecorder``, one ``syncd run`` mirrors the
  records into its own fresh store.

Reported: failed trainers, the slowest trainer's time inside logging calls, and
the time from the start gate until every point is in the store, against the
optimal single writer for the same data (``baseline_log_batch.py``: one process,
``log_batch`` in chunks of 1000, into a fresh copy of a migrated store).
Targets: 0 failed trainers with the recorder; logging >= 100x cheaper for the
trainers (slowest vs slowest); mirror complete within 2x the single writer's time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench_support import BASELINE_SCRIPT, HERE, Report, count_rows, env_int, run_timed
from daemon_helpers import SyncdProcess, wait_for

pytestmark = pytest.mark.timeout(1800)

TRAINER = HERE / "contention_trainer.py"
KEYS = 4


def run_trainers(
    mode: str, targets: list[str], steps: int, env: dict[str, str], cwd: Path
) -> tuple[list[dict[str, object]], float]:
    """Start every trainer, release them together; their results and the gate's time."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(TRAINER), mode, target, str(i), str(steps)],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, target in enumerate(targets)
    ]
    # the gate: every trainer has imported what it needs when it reads its line
    gate = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results: list[dict[str, object]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        try:
            results.append(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):  # the process itself died
            results.append({"logging_s": None, "error": f"exit {proc.returncode}: {err[-300:]}"})
    return results, gate


@pytest.mark.benchmark
@pytest.mark.parametrize("trainers", [8, 32])
def test_concurrent_trainers_direct_vs_recorder(
    trainers: int, tmp_path: Path, report: Report, bench_env: dict[str, str], fresh_store
) -> None:
    bench = f"7 contention x{trainers}"
    steps = env_int("SYNCD_BENCH_CONTENTION_STEPS", 100)
    points = trainers * steps * KEYS

    # direct: every trainer into one store that does not exist yet, then into one that does
    fresh_dir = tmp_path / "direct-fresh"
    fresh_dir.mkdir()
    fresh_uri = f"sqlite:///{fresh_dir / 'mlflow.db'}"
    fresh, _ = run_trainers("direct", [fresh_uri] * trainers, steps, bench_env, fresh_dir)
    fresh_failed = [str(r["error"]) for r in fresh if r["error"]]
    _db, direct_uri = fresh_store("direct.db")
    direct, _ = run_trainers("direct", [direct_uri] * trainers, steps, bench_env, tmp_path)
    direct_failed = [str(r["error"]) for r in direct if r["error"]]
    direct_slowest = max(float(str(r["logging_s"] or 0.0)) for r in direct)

    # recorder: records, and one daemon on its own fresh store
    rec_dir = tmp_path / "recorder"
    root = rec_dir / "runs"
    root.mkdir(parents=True)
    db = rec_dir / "mlflow.db"
    daemon = SyncdProcess(
        rec_dir, str(root), "--tracking-uri", f"sqlite:///{db}", "--state-dir",
        str(rec_dir / "state"), env=bench_env,
    )  # fmt: skip
    try:
        daemon.wait_ready(120)
        targets = [str(root / f"trainer-{i}") for i in range(trainers)]
        recorded, gate = run_trainers("recorder", targets, steps, bench_env, rec_dir)
        wait_for(lambda: db.exists() and count_rows(db) == points, 600, 0.05, "every point")
        mirrored_s = time.perf_counter() - gate
    finally:
        code = daemon.stop()
    recorder_failed = [str(r["error"]) for r in recorded if r["error"]]
    recorder_slowest = max(float(str(r["logging_s"] or 0.0)) for r in recorded)

    # the optimal single writer, same data, a migrated-empty store
    files = [str(p) for p in sorted(root.rglob("run_record.jsonl"))]
    single_db, single_uri = fresh_store("single.db")
    single = run_timed([sys.executable, str(BASELINE_SCRIPT), single_uri, *files], cwd=tmp_path, env=bench_env)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    assert count_rows(single_db) == points
    single_loop = float(json.loads(single.stdout.strip().splitlines()[-1])["loop_s"])

    cheaper = direct_slowest / max(recorder_slowest, 1e-9)
    report.add(bench, "data", f"{trainers} trainers x {steps} steps x {KEYS} metrics")
    report.add(bench, "direct, store not yet created: failed trainers", len(fresh_failed), "")
    if fresh_failed:
        report.add(bench, "direct, store not yet created: first failure", fresh_failed[0][:120])
    report.add(bench, "direct, existing store: failed trainers", len(direct_failed), "")
    if direct_failed:
        report.add(bench, "direct, existing store: first failure", direct_failed[0][:120])
    report.add(bench, "direct, existing store: slowest trainer's logging", direct_slowest, "s")
    report.add(
        bench, "recorder: failed trainers", len(recorder_failed), "", "0", not recorder_failed
    )
    report.add(bench, "recorder: slowest trainer's logging time", recorder_slowest, "s")
    report.add(bench, "logging cost, direct / recorder (slowest)", cheaper, "x", ">= 100x",
               cheaper >= 100)  # fmt: skip
    report.add(bench, "single writer (log_batch), whole process", single.wall_s, "s")
    report.add(bench, "single writer (log_batch), loop without imports", single_loop, "s")
    # the daemon was up before the gate: compared with the single writer's loop alone
    report.add(bench, "daemon: gate to every point mirrored", mirrored_s, "s",
               "<= 2x single writer's loop", mirrored_s <= 2 * single_loop)  # fmt: skip
    assert code == 0, daemon.logs()[-3000:]
    assert not recorder_failed, recorder_failed
    assert cheaper >= 100, f"logging only {cheaper:.0f}x cheaper"
    assert mirrored_s <= 2 * single_loop, (mirrored_s, single_loop)
