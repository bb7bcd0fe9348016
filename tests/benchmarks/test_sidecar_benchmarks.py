"""13. Sidecar import: ``syncd backfill --format tensorboard`` vs the hand-written peer
(``baseline_tensorboard.py``: read the event files, decode the scalars, ``log_batch``)
on the same TensorBoard runs, each a whole process on its own fresh copy of a
migrated-empty SQLite store, interleaved peer, syncd, syncd, peer.

Target: >= 0.9x the peer's metric points/s (as for event records, benchmark 2), with
every point in every store. syncd translates each run folder into a derived v1 record
(kept beside the ledger) and projects that, so the target covers the translation. The
wall time of an unchanged second pass over the same folders is reported too.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench_support import (
    HERE,
    SYNCD,
    Report,
    count_rows,
    env_int,
    parse_json_summary,
    run_timed,
)

tensorboardX = pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")

pytestmark = pytest.mark.benchmark

PEER = HERE / "baseline_tensorboard.py"
KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")
EXPERIMENT = "tensorboard"
BENCH = "13 tensorboard"


@dataclass
class _Load:
    tool: str
    wall_s: float
    metric_rows: int
    runs: int
    unchanged_s: float | None = None  # syncd: an unchanged second pass over the same folders


def _write_runs(root: Path, runs: int, steps: int) -> int:
    """``runs`` folders, each one event file written by tensorboardX; the files are
    dated a day back so both tools see finished runs (syncd ends a folder idle for
    ``finish_after_idle``)."""
    t0 = 1_700_000_000.0
    for r in range(runs):
        folder = root / f"run-{r:03d}"
        writer = tensorboardX.SummaryWriter(str(folder))
        for step in range(steps):
            for k, key in enumerate(KEYS):
                writer.add_scalar(key, 1.0 / (step + k + r + 1), step, walltime=t0 + step)
        writer.close()
    old = os.path.getmtime(root) - 86_400
    for path in root.rglob("events.out.tfevents.*"):
        os.utime(path, (old, old))
    return runs * steps * len(KEYS)


def _load(tool: str, n: int, root: Path, tmp: Path, env: dict[str, str], fresh_store) -> _Load:  # type: ignore[no-untyped-def]
    db, uri = fresh_store(f"tb-{tool}-{n}.db")
    cwd = tmp / f"{tool}-{n}"
    cwd.mkdir()
    if tool == "peer":
        dirs = [str(p) for p in sorted(root.iterdir())]
        done = run_timed([sys.executable, str(PEER), uri, EXPERIMENT, *dirs], cwd=cwd, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        args = [SYNCD, "backfill", str(root), "--format", "tensorboard", "--tracking-uri", uri,
                "--state-dir", str(cwd / "state"), "--json"]  # fmt: skip
        done = run_timed(args, cwd=cwd, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = parse_json_summary(done.stdout)
        assert not summary["errors"], summary
    rows, run_count = count_rows(db), count_rows(db, "runs")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (finished,) = conn.execute("select count(*) from runs where status = 'FINISHED'").fetchone()
    assert finished == run_count, f"{tool}: {finished} of {run_count} runs FINISHED"
    unchanged = None
    if tool == "syncd":
        again = run_timed(args, cwd=cwd, env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert parse_json_summary(again.stdout)["metric_points"] == 0
        unchanged = again.wall_s
    print(f"  [{BENCH}] {tool} run {n}: {done.wall_s:.2f} s wall"
          + (f", unchanged second pass {unchanged:.2f} s" if unchanged is not None else ""))  # fmt: skip
    return _Load(tool, done.wall_s, rows, run_count, unchanged)


def test_tensorboard_import_vs_hand_written_peer(
    tmp_path: Path, report: Report, bench_env: dict[str, str], fresh_store
) -> None:
    runs = env_int("SYNCD_BENCH_TB_RUNS", 16)
    steps = env_int("SYNCD_BENCH_TB_STEPS", 2000)
    root = tmp_path / "logs"
    points = _write_runs(root, runs, steps)
    order = ["peer", "syncd", "syncd", "peer"]
    loads = [_load(t, n, root, tmp_path, bench_env, fresh_store) for n, t in enumerate(order)]
    best = {t: min(x.wall_s for x in loads if x.tool == t) for t in ("peer", "syncd")}
    ratio = best["peer"] / best["syncd"]
    rows_ok = all(x.metric_rows == points and x.runs == runs for x in loads)
    report.add(BENCH, "data (same event files for both)",
               f"{runs} runs x {steps} steps x {len(KEYS)} scalars, tensorboardX")  # fmt: skip
    report.add(BENCH, "run order", ", ".join(order))
    report.add(BENCH, "peer wall per run (whole process)",
               " / ".join(f"{x.wall_s:.2f}" for x in loads if x.tool == "peer"), "s")  # fmt: skip
    report.add(BENCH, "syncd wall per run (whole process)",
               " / ".join(f"{x.wall_s:.2f}" for x in loads if x.tool == "syncd"), "s")  # fmt: skip
    report.add(BENCH, "peer throughput (best)", points / best["peer"], "points/s")
    report.add(BENCH, "syncd throughput (best)", points / best["syncd"], "points/s")
    report.add(BENCH, "syncd / peer throughput (best)", ratio, "x", ">= 0.9x", ratio >= 0.9)
    report.add(BENCH, "syncd unchanged second pass, wall",
               " / ".join(f"{x.unchanged_s:.2f}" for x in loads if x.unchanged_s is not None), "s")  # fmt: skip
    report.add(BENCH, "metric rows / runs in every store",
               " ; ".join(sorted({f"{x.metric_rows:,} / {x.runs}" for x in loads})), "",
               f"{points:,} / {runs}", rows_ok)  # fmt: skip
    assert rows_ok, loads
    assert ratio >= 0.9, f"syncd reached {ratio:.2f}x the hand-written peer; target >= 0.9x"
