"""Throughput over HTTP: `syncd backfill` with 1, 2, 4, 8 writers vs the single-process
`log_batch` loop, both feeding one `mlflow server` backed by PostgreSQL.

The server (a throwaway PostgreSQL database, proxied artifacts, loopback), the
database and the client share this machine's cores. Every load writes the same
shape of data into an experiment of its own (fresh record ids), loads are
run in turn (baseline, then each writer count; with SYNCD_BENCH_HTTP_ROUNDS > 1 the
order is reversed every other round, so drift hits all alike, and each
configuration is judged on its best run). Throughput is counted over the
in-process time of each tool (the baseline's loop, syncd's pass), so Python start-up
is left out; whole-process walls are reported too. The loop's timer starts after
MLflow is imported; syncd loads MLflow's client lazily (an unchanged re-run never
does), so its pass includes that import: the comparison is conservative for syncd.
Server CPU seconds per load come from /proc.

Two data sets: 16 runs x 100 steps x 50 keys (points/s), and 1,000 small runs
(runs/s). Target: >= 1.6x the loop at 4 writers, for each.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench_support import BASELINE_SCRIPT, SYNCD, Report, env_int, make_tree, run_timed
from mlflow_server import MlflowServerProcess
from pg import throwaway_database

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(5400)]

WRITERS = (1, 2, 4, 8)
TARGET = 1.6
WIDE_KEYS = tuple(f"m{i:02d}" for i in range(50))
SMALL_KEYS = ("loss", "acc")


@dataclass
class Load:
    tool: str  # "baseline" or "syncd xN"
    inner_s: float  # the loop / the pass, in-process
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServerProcess]:
    workers = env_int("SYNCD_BENCH_HTTP_SERVER_WORKERS", 2)
    with throwaway_database("syncd_bench_mlflow") as url:
        server = MlflowServerProcess(
            tmp_path_factory.mktemp("pg-mlflow"), backend_store_uri=url, workers=workers
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load(
    bench: str,
    tool: str,
    writers: int,
    n: int,
    shape: dict[str, int],
    keys: tuple[str, ...],
    tmp: Path,
    server: MlflowServerProcess,
    env: dict[str, str],
) -> Load:
    """Write a fresh copy of the data with one tool, timed, into an experiment no other
    load (of this or the other data set) writes to: in an experiment that holds runs
    already, syncd looks each record's run up before creating it (a run may exist)."""
    root = tmp / f"load-{n}" / "runs"
    prefix = f"{bench.replace(' ', '-')}-{n}"
    make_tree(root, seed=n, metric_keys=keys, experiment_prefix=prefix, **shape)
    cpu0, server0 = _children_cpu(), server.cpu_seconds()
    if tool == "baseline":
        files = [str(p) for p in sorted(root.rglob("run_record.jsonl"))]
        done = run_timed(
            [sys.executable, str(BASELINE_SCRIPT), server.uri, *files], cwd=tmp, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        inner = json.loads(done.stdout.strip().splitlines()[-1])["loop_s"]
    else:
        config = tmp / f"load-{n}" / "syncd.yaml"
        config.write_text(f"writer: {{concurrency: {writers}}}\n")
        args = [SYNCD, "backfill", str(root), "--tracking-uri", server.uri, "--json", "-q",
                "--state-dir", str(tmp / f"load-{n}" / "state"), "--config", str(config)]  # fmt: skip
        done = run_timed(args, cwd=tmp, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout)
        assert summary["synced"] == shape["records"] and not summary["errors"], summary
        inner = summary["duration_s"]
    return Load(
        tool=tool if tool == "baseline" else f"syncd x{writers}",
        inner_s=inner,
        wall_s=done.wall_s,
        client_cpu_s=_children_cpu() - cpu0,
        server_cpu_s=server.cpu_seconds() - server0,
    )


def _compare(
    bench: str,
    shape: dict[str, int],
    keys: tuple[str, ...],
    unit: str,
    amount: int,
    tmp: Path,
    server: MlflowServerProcess,
    env: dict[str, str],
    report: Report,
) -> None:
    rounds = env_int("SYNCD_BENCH_HTTP_ROUNDS", 1)
    plan = [("baseline", 1)] + [("syncd", w) for w in WRITERS]
    loads: list[Load] = []
    n = 0
    for r in range(rounds):
        for tool, writers in plan if r % 2 == 0 else list(reversed(plan)):
            loads.append(_load(bench, tool, writers, n, shape, keys, tmp, server, env))
            n += 1
            last = loads[-1]
            print(f"  [{bench}] {last.tool}: {last.inner_s:.2f} s in-process, "
                  f"{last.wall_s:.2f} s wall, client CPU {last.client_cpu_s:.1f} s, "
                  f"server CPU {last.server_cpu_s:.1f} s")  # fmt: skip

    def best(tool: str) -> Load:
        return min((x for x in loads if x.tool == tool), key=lambda x: x.inner_s)

    base = best("baseline")
    lines = [f"{'writers':>8} {unit:>12} {'ratio':>7} {'wall s':>8} {'client CPU':>11} {'server CPU':>11}"]  # fmt: skip
    lines.append(f"{'loop':>8} {amount / base.inner_s:>12.0f} {1.0:>7.2f} {base.wall_s:>8.2f}"
                 f" {base.client_cpu_s:>11.1f} {base.server_cpu_s:>11.1f}")  # fmt: skip
    report.add(bench, f"single-process log_batch loop ({unit}, best)", amount / base.inner_s, unit)
    ratios = {}
    for w in WRITERS:
        got = best(f"syncd x{w}")
        ratio = base.inner_s / got.inner_s
        ratios[w] = ratio
        lines.append(f"{w:>8} {amount / got.inner_s:>12.0f} {ratio:>7.2f} {got.wall_s:>8.2f}"
                     f" {got.client_cpu_s:>11.1f} {got.server_cpu_s:>11.1f}")  # fmt: skip
        target = f">= {TARGET}x" if w == 4 else ""
        report.add(bench, f"syncd, {w} writers ({unit}, best; ratio {ratio:.2f}x)",
                   amount / got.inner_s, unit, target, ratio >= TARGET if w == 4 else None)  # fmt: skip
    print(f"\n  [{bench}] best of {rounds} rounds\n  " + "\n  ".join(lines))
    assert ratios[4] >= TARGET, f"{ratios[4]:.2f}x the single-process loop at 4 writers"


def test_http_throughput_wide_runs(
    tmp_path: Path, report: Report, bench_env: dict[str, str], pg_server: MlflowServerProcess
) -> None:
    records = env_int("SYNCD_BENCH_HTTP_WIDE_RUNS", 16)
    steps = env_int("SYNCD_BENCH_HTTP_WIDE_STEPS", 100)
    bench = "11 http wide"
    report.add(bench, "data", f"{records} runs x {steps} steps x {len(WIDE_KEYS)} keys; "
               f"mlflow server ({pg_server.workers} workers) on PostgreSQL, loopback")  # fmt: skip
    points = records * steps * len(WIDE_KEYS)
    shape = {"records": records, "steps": steps}
    _compare(bench, shape, WIDE_KEYS, "points/s", points, tmp_path, pg_server, bench_env, report)


def test_http_throughput_small_runs(
    tmp_path: Path, report: Report, bench_env: dict[str, str], pg_server: MlflowServerProcess
) -> None:
    records = env_int("SYNCD_BENCH_HTTP_SMALL_RUNS", 1000)
    bench = "11 http small"
    report.add(bench, "data", f"{records} runs x 5 steps x {len(SMALL_KEYS)} keys + params, tags")
    shape = {"records": records, "steps": 5}
    _compare(bench, shape, SMALL_KEYS, "runs/s", records, tmp_path, pg_server, bench_env, report)
