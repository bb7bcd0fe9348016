"""Speed and memory targets, measured side by side in one run.

    uv run pytest tests/benchmarks -m benchmark -s

Each test asserts its target (a regression fails the run) and adds its figures
to the session report: a table at the end of the run, and JSON at
$SYNCD_BENCH_REPORT (default: bench-report.json in the session's pytest tmp dir).

Sizes can be scaled with environment variables (the defaults are the targets'):
SYNCD_BENCH_RECORDER_CALLS (100000), SYNCD_BENCH_BACKFILL_RECORDS (18),
SYNCD_BENCH_BACKFILL_STEPS (2500), SYNCD_BENCH_BACKFILL_ROUNDS (2),
SYNCD_BENCH_DAEMON_APPENDS (200), SYNCD_BENCH_SMALL_RECORDS (10000).
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bench_support import (
    BASELINE_SCRIPT,
    SYNCD,
    Report,
    Timed,
    count_rows,
    env_int,
    make_tree,
    parse_json_summary,
    percentile,
    run_timed,
    run_with_peak_rss,
)
from daemon_helpers import SyncdProcess, wait_for

from syncd import RunRecorder

pytestmark = pytest.mark.timeout(1800)

METRIC_KEYS = ("loss", "acc", "lr", "grad_norm")


# -- 1. the writer ---------------------------------------------------------------------


@pytest.mark.benchmark
def test_recorder_log_metrics_cost(tmp_path: Path, report: Report) -> None:
    """RunRecorder.log_metrics (3 keys) <= 20 us per call, mean over 100k calls."""
    bench = "1 recorder"
    calls = env_int("SYNCD_BENCH_RECORDER_CALLS", 100_000)
    warmup, sample = 1000, 20_000
    rng = random.Random(7)
    values = [
        (rng.uniform(0.05, 2.5), rng.uniform(0.3, 0.99), 10 ** rng.uniform(-5, -2))
        for _ in range(max(calls, sample))
    ]
    perf_ns = time.perf_counter_ns
    with RunRecorder(tmp_path / "run", experiment="bench", run_name="recorder") as rec:
        log = rec.log_metrics
        for i in range(warmup):
            loss, acc, lr = values[i]
            log({"loss": loss, "acc": acc, "lr": lr}, step=i)
        started = perf_ns()
        for i in range(calls):
            loss, acc, lr = values[i]
            log({"loss": loss, "acc": acc, "lr": lr}, step=warmup + i)
        loop_ns = perf_ns() - started
        per_call: list[int] = []
        for i in range(sample):
            loss, acc, lr = values[i]
            t0 = perf_ns()
            log({"loss": loss, "acc": acc, "lr": lr}, step=warmup + calls + i)
            per_call.append(perf_ns() - t0)
    lines = (tmp_path / "run" / "run_record.jsonl").read_bytes().count(b"\n")
    assert lines == 1 + warmup + calls + sample + 1  # started, metrics..., finished

    mean_us = loop_ns / calls / 1000
    per_call.sort()
    report.add(bench, "log_metrics mean", mean_us, "us/call", "<= 20 us", mean_us <= 20)
    report.add(bench, "calls timed (whole loop)", calls, "calls")
    for pct in (50, 99):
        report.add(
            bench, f"p{pct} ({sample:,}-call sample)", percentile(per_call, pct) / 1000, "us"
        )
    report.add(bench, f"max ({sample:,}-call sample)", per_call[-1] / 1000, "us")
    assert mean_us <= 20, f"log_metrics costs {mean_us:.2f} us per call (target <= 20 us)"


# -- 2. backfill against the hand-written log_batch loop -------------------------------


@dataclass
class _Load:
    tool: str  # "baseline" or "syncd"
    wall_s: float
    inner_s: float  # baseline: its loop without imports; syncd: the summary's duration
    metric_rows: int
    runs: int


def _load_once(
    tool: str, n: int, root: Path, files: list[str], workdir: Path, env: dict[str, str], fresh_store
) -> _Load:
    """One whole process of ``tool`` loading every record into its own fresh store."""
    db, uri = fresh_store(f"{tool}-{n}.db")
    cwd = workdir / f"{tool}-{n}"
    cwd.mkdir()
    if tool == "baseline":
        done = run_timed([sys.executable, str(BASELINE_SCRIPT), uri, *files], cwd=cwd, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        inner = json.loads(done.stdout.strip().splitlines()[-1])
        inner_s, points = float(inner["loop_s"]), int(inner["metric_points"])
    else:
        done = run_timed(
            [SYNCD, "backfill", str(root), "--tracking-uri", uri, "--state-dir", str(cwd / "state"),
             "--json"],
            cwd=cwd,
            env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        summary = parse_json_summary(done.stdout)
        assert summary["synced"] == len(files), summary
        inner_s, points = float(summary["duration_s"]), int(summary["metric_points"])
    rows = count_rows(db)
    assert rows == points, (tool, rows, points)
    print(f"  [2 backfill] {tool} run {n}: {done.wall_s:.2f} s wall, {inner_s:.2f} s in-process")
    return _Load(tool, done.wall_s, inner_s, rows, count_rows(db, "runs"))


@pytest.mark.benchmark
def test_backfill_throughput_vs_log_batch(
    tmp_path: Path, report: Report, bench_env: dict[str, str], fresh_store
) -> None:
    """`syncd backfill` >= 0.9x the metric points/s of the best hand-written loop.

    Both tools load the same records, each run a whole process on its own fresh copy
    of the migrated-empty store, interleaved baseline, syncd, syncd, baseline (so a
    drift in machine load hits both alike). Throughput = metric points / wall seconds;
    the target is judged on each tool's best run, the mean is reported too.
    """
    bench = "2 backfill"
    records = env_int("SYNCD_BENCH_BACKFILL_RECORDS", 18)
    steps = env_int("SYNCD_BENCH_BACKFILL_STEPS", 2500)
    rounds = env_int("SYNCD_BENCH_BACKFILL_ROUNDS", 2)
    root = tmp_path / "runs"
    points = make_tree(root, records=records, steps=steps, metric_keys=METRIC_KEYS, experiments=2)
    files = [str(p) for p in sorted(root.rglob("run_record.jsonl"))]
    assert len(files) == records
    print(f"\n  [{bench}] {records} records x {steps} steps x {len(METRIC_KEYS)} metrics")

    order = [
        t for r in range(rounds) for t in (("baseline", "syncd"), ("syncd", "baseline"))[r % 2]
    ]
    loads = [_load_once(t, n, root, files, tmp_path, bench_env, fresh_store) for n, t in enumerate(order)]  # fmt: skip
    base = [x for x in loads if x.tool == "baseline"]
    sync = [x for x in loads if x.tool == "syncd"]

    def walls(xs: list[_Load]) -> str:
        return " / ".join(f"{x.wall_s:.2f}" for x in xs)

    best_base, best_sync = min(x.wall_s for x in base), min(x.wall_s for x in sync)
    base_tput, sync_tput = points / best_base, points / best_sync
    ratio = sync_tput / base_tput
    mean_ratio = (sum(x.wall_s for x in base) / len(base)) / (
        sum(x.wall_s for x in sync) / len(sync)
    )
    report.add(
        bench, "data (same records for both)",
        f"{records} records x {steps} steps x {len(METRIC_KEYS)} metrics + params, tags",
    )  # fmt: skip
    report.add(bench, "metric points", points, "points")
    report.add(bench, "run order", ", ".join(order))
    report.add(bench, "baseline wall per run (whole process)", walls(base), "s")
    report.add(bench, "baseline loop only per run (no imports)",
               " / ".join(f"{x.inner_s:.2f}" for x in base), "s")  # fmt: skip
    report.add(bench, "syncd wall per run (whole process)", walls(sync), "s")
    report.add(bench, "syncd in-process duration per run",
               " / ".join(f"{x.inner_s:.2f}" for x in sync), "s")  # fmt: skip
    report.add(bench, "baseline throughput (best wall)", base_tput, "points/s")
    report.add(bench, "baseline throughput (best loop only)",
               points / min(x.inner_s for x in base), "points/s")  # fmt: skip
    report.add(bench, "syncd throughput (best wall)", sync_tput, "points/s")
    report.add(bench, "syncd / baseline throughput (best)", ratio, "x", ">= 0.9x", ratio >= 0.9)
    report.add(bench, "syncd / baseline throughput (mean)", mean_ratio, "x")
    rows_ok = all(x.metric_rows == points and x.runs == records for x in loads)
    report.add(
        bench, "metric rows / runs in every store",
        " ; ".join(sorted({f"{x.metric_rows:,} / {x.runs}" for x in loads})), "",
        f"{points:,} / {records}", rows_ok,
    )  # fmt: skip

    assert rows_ok, loads
    assert ratio >= 0.9, (
        f"syncd backfill reached {sync_tput:,.0f} points/s, {ratio:.2f}x the hand-written"
        f" log_batch loop ({base_tput:,.0f} points/s); target >= 0.9x"
    )


# -- 3. the daemon: append-to-visible latency ------------------------------------------


class _Poller(threading.Thread):
    """Polls the MLflow SQLite store (read-only) and notes when each (record, step) of
    the probe metric first becomes visible."""

    QUERY = (
        "select t.value, m.step from metrics m join tags t"
        " on t.run_uuid = m.run_uuid and t.key = 'syncd.record_id'"
        " where m.key = 'latency_probe'"
    )

    def __init__(self, db: Path, interval: float) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.interval = interval
        self.seen: dict[tuple[str, int], float] = {}
        self.polls = 0
        self.poll_seconds = 0.0
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            while not self._halt.is_set():
                started = time.perf_counter()
                try:
                    rows = conn.execute(self.QUERY).fetchall()
                except sqlite3.OperationalError:
                    self.errors += 1
                    rows = []
                now = time.perf_counter()
                for record_id, step in rows:
                    self.seen.setdefault((record_id, step), now)
                self.polls += 1
                self.poll_seconds += now - started
                self._halt.wait(self.interval)
        finally:
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _runs_visible(db: Path, record_ids: list[str]) -> bool:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("select value from tags where key = 'syncd.record_id'").fetchall()
    return set(record_ids) <= {r[0] for r in rows}


@pytest.mark.benchmark
def test_daemon_append_to_visible_latency(
    tmp_path: Path, report: Report, bench_env: dict[str, str], fresh_store
) -> None:
    """`syncd run`: p50 <= 0.5 s and p99 <= 1 s from append to row in MLflow."""
    bench = "3 daemon"
    appends = env_int("SYNCD_BENCH_DAEMON_APPENDS", 200)
    n_records, poll_interval = 3, 0.01
    db, uri = fresh_store("mlflow.db")
    root = tmp_path / "live"
    root.mkdir()
    proc = SyncdProcess(
        tmp_path, str(root), "--tracking-uri", uri, "--state-dir", str(tmp_path / "state"),
        env=bench_env,
    )  # fmt: skip
    recorders: list[RunRecorder] = []
    poller = _Poller(db, poll_interval)
    try:
        started = time.perf_counter()
        proc.wait_ready(timeout=90)
        ready_s = time.perf_counter() - started
        recorders = [
            RunRecorder(root / f"job-{i}", experiment="bench-live", run_name=f"job-{i}").start()
            for i in range(n_records)
        ]
        ids = [r.record_id for r in recorders]
        wait_for(lambda: _runs_visible(db, ids), 30, 0.05, "the live runs in MLflow")
        poller.start()

        rng = random.Random(3)
        appended: dict[tuple[str, int], float] = {}
        t_first = time.perf_counter()
        for i in range(appends):
            rec, step = recorders[i % n_records], i // n_records
            rec.log_metrics({"latency_probe": rng.random(), "loss": 1.0 / (step + 1)}, step=step)
            appended[(rec.record_id, step)] = time.perf_counter()
            time.sleep(rng.uniform(0.05, 0.1))
        append_span = time.perf_counter() - t_first
        wait_for(
            lambda: all(k in poller.seen for k in appended), 30, 0.05, "every append in MLflow"
        )
    finally:
        poller.stop()
        for rec in recorders:
            rec.finish()
        code = proc.stop()
    assert code == 0, proc.logs()[-3000:]

    lat = sorted(poller.seen[k] - t for k, t in appended.items())
    p50, p90, p99 = (percentile(lat, p) for p in (50, 90, 99))
    report.add(bench, "start to /readyz 200", ready_s, "s")
    report.add(
        bench, "appends (records x interval)",
        f"{appends} ({n_records} records, every 50-100 ms, {append_span:.1f} s)",
    )  # fmt: skip
    report.add(bench, "latency p50", p50, "s", "<= 0.5 s", p50 <= 0.5)
    report.add(bench, "latency p90", p90, "s")
    report.add(bench, "latency p99", p99, "s", "<= 1 s", p99 <= 1.0)
    report.add(bench, "latency max", lat[-1], "s")
    report.add(
        bench, "db poll interval / mean poll", f"{poll_interval * 1000:.0f} ms"
        f" / {poller.poll_seconds / max(poller.polls, 1) * 1000:.2f} ms", "",
    )  # fmt: skip
    assert p50 <= 0.5 and p99 <= 1.0, f"latency p50 {p50:.3f} s, p99 {p99:.3f} s"


# -- 4. and 5. 10,000 small records: memory, then the unchanged re-run ------------------


@dataclass
class SmallBackfill:
    folder: Path
    root: Path
    db: Path
    args: list[str]
    records: int
    points: int
    generate_s: float
    first: Timed
    summary: dict[str, object]


@pytest.fixture(scope="session")
def small_backfill(
    tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path, bench_env: dict[str, str]
) -> SmallBackfill:
    """10,000 small records (started, params, 5 metrics events, finished), backfilled
    once by `syncd backfill` in a wrapper process that reports the peak RSS."""
    records = env_int("SYNCD_BENCH_SMALL_RECORDS", 10_000)
    folder = tmp_path_factory.mktemp("small")
    root = folder / "runs"
    started = time.perf_counter()
    points = make_tree(
        root, records=records, steps=5, metric_keys=("loss", "acc"), experiments=10,
        fanout=100, seed=1, tags_event=False,
    )  # fmt: skip
    generate_s = time.perf_counter() - started
    db = folder / "mlflow.db"
    shutil.copy(mlflow_template, db)
    args = [SYNCD, "backfill", str(root), "--tracking-uri", f"sqlite:///{db}",
            "--state-dir", str(folder / "state"), "--json"]  # fmt: skip
    print(f"\n  [4 10k records] backfilling {records:,} records ({points:,} points) ...")
    first = run_with_peak_rss(args, cwd=folder, env=bench_env)
    summary = parse_json_summary(first.stdout) if first.returncode in (0, 1) else {}
    return SmallBackfill(folder, root, db, args, records, points, generate_s, first, summary)


@pytest.mark.benchmark
def test_small_records_backfill_memory(report: Report, small_backfill: SmallBackfill) -> None:
    """10,000 small records backfilled in <= 300 MB peak RSS."""
    bench = "4 10k records"
    sb = small_backfill
    assert sb.first.returncode == 0, sb.first.stderr[-3000:]
    rows = count_rows(sb.db)
    runs = count_rows(sb.db, "runs")
    rss = sb.first.peak_rss_mb
    assert rss is not None
    report.add(bench, "records (started, params, 5 metrics, finished)", sb.records, "records")
    report.add(bench, "peak RSS of syncd backfill", rss, "MB", "<= 300 MB", rss <= 300)
    report.add(bench, "wall (whole process)", sb.first.wall_s, "s")
    report.add(bench, "records/s", sb.records / sb.first.wall_s, "records/s")
    report.add(bench, "runs / metric rows in MLflow", f"{runs:,} / {rows:,}", "",
               f"{sb.records:,} / {sb.points:,}", runs == sb.records and rows == sb.points)  # fmt: skip
    assert sb.summary["synced"] == sb.records, sb.summary
    assert (runs, rows) == (sb.records, sb.points)
    assert rss <= 300, f"syncd backfill peaked at {rss:.0f} MB RSS (target <= 300 MB)"


def _rerun(sb: SmallBackfill, env: dict[str, str]) -> tuple[Timed, dict[str, Any]]:
    done = run_timed(sb.args, cwd=sb.folder, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = parse_json_summary(done.stdout)
    assert summary["unchanged"] == sb.records and summary["events"] == 0, summary
    return done, summary


@pytest.mark.benchmark
def test_unchanged_rerun_skips_unread(
    report: Report, small_backfill: SmallBackfill, bench_env: dict[str, str]
) -> None:
    """A re-run over the unchanged 10,000-record tree takes <= 2 s and reads no record.

    Three kinds of re-run, all over the same unchanged tree and ledger:
    - right after (4), with the page cache as the long backfill left it. On a VM
      whose host pages out file pages idle for a minute (DAMON ``pageout``), this
      one also measures re-reading Python's own modules from disk: reported, and
      the target is not judged on it;
    - under ``strace -f``: the proof that no record file is opened;
    - three more, page cache warm: the target is judged on their median.
    """
    bench = "5 re-run"
    sb = small_backfill
    assert sb.first.returncode == 0, sb.first.stderr[-3000:]
    first, first_summary = _rerun(sb, bench_env)
    report.add(bench, "1st re-run right after (4), wall", first.wall_s, "s")
    report.add(bench, "1st re-run in-process duration", float(first_summary["duration_s"]), "s")
    report.add(
        bench, "unchanged / events (--json)",
        f"{first_summary['unchanged']:,} / {first_summary['events']}", "", f"{sb.records:,} / 0",
        True,
    )  # fmt: skip

    strace = shutil.which("strace")
    opened: int | None = None
    if strace:
        trace = sb.folder / "rerun.strace"
        traced = run_timed(
            [strace, "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace), *sb.args],
            cwd=sb.folder,
            env=bench_env,
        )
        assert traced.returncode == 0, traced.stderr[-3000:]
        calls = trace.read_text().splitlines()
        opened = sum('run_record.jsonl"' in c for c in calls)
        ledger_opened = any("ledger.db" in c for c in calls)
        report.add(bench, "openat of run_record.jsonl (strace -f)", opened, "", "== 0",
                   opened == 0)  # fmt: skip
        report.add(bench, "open/openat calls traced in all", len(calls), "calls")
        report.add(bench, "wall under strace (not judged)", traced.wall_s, "s")
        assert ledger_opened, "strace saw no open of the ledger: the trace is not trustworthy"
    else:
        report.note("strace not found: 'no record read' rests on the --json summary only")

    warm = [_rerun(sb, bench_env) for _ in range(3)]
    walls = [done.wall_s for done, _ in warm]
    median = sorted(walls)[1]
    report.add(bench, "warm re-runs, wall (x3)", " / ".join(f"{w:.2f}" for w in walls), "s")
    report.add(
        bench, "warm re-runs in-process (x3)",
        " / ".join(f"{s['duration_s']:.2f}" for _, s in warm), "s",
    )  # fmt: skip
    report.add(bench, "warm re-run wall, median", median, "s", "<= 2 s", median <= 2.0)

    assert opened in (None, 0), f"{opened} record files were opened by the re-run"
    assert median <= 2.0, f"a re-run takes {median:.2f} s (median of 3; target <= 2 s)"


# -- 6. verify over the 10,000 small records ---------------------------------------------


@pytest.mark.benchmark
def test_verify_small_records(
    report: Report, small_backfill: SmallBackfill, bench_env: dict[str, str]
) -> None:
    """`syncd verify` over the 10,000 backfilled records: every record clean, <= 300 MB."""
    bench = "6 verify"
    sb = small_backfill
    assert sb.first.returncode == 0, sb.first.stderr[-3000:]
    args = [SYNCD, "verify", str(sb.root), "--tracking-uri", f"sqlite:///{sb.db}",
            "--state-dir", str(sb.folder / "state"), "--json"]  # fmt: skip
    before = (sb.db.stat().st_mtime_ns, (sb.folder / "state" / "ledger.db").stat().st_mtime_ns)
    print(f"\n  [{bench}] verifying {sb.records:,} records ...")
    done = run_with_peak_rss(args, cwd=sb.folder, env=bench_env)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    doc = parse_json_summary(done.stdout)
    rss = done.peak_rss_mb
    assert rss is not None
    report.add(bench, "records verified / clean", f"{doc['records']:,} / {doc['clean']:,}", "",
               f"{sb.records:,} / {sb.records:,}",
               doc["records"] == doc["clean"] == sb.records)  # fmt: skip
    report.add(bench, "wall (whole process)", done.wall_s, "s")
    report.add(bench, "in-process duration", float(doc["duration_s"]), "s")
    report.add(bench, "records/s", sb.records / done.wall_s, "records/s")
    report.add(bench, "peak RSS of syncd verify", rss, "MB", "<= 300 MB", rss <= 300)
    after = (sb.db.stat().st_mtime_ns, (sb.folder / "state" / "ledger.db").stat().st_mtime_ns)
    assert after == before, "verify modified the MLflow store or the ledger"
    assert doc["records"] == doc["clean"] == sb.records, doc
    assert rss <= 300, f"syncd verify peaked at {rss:.0f} MB RSS (target <= 300 MB)"
