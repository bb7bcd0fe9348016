"""What one ``mlflow.log_metrics`` call costs the training loop, by tracking URI.

    uv run pytest tests/benchmarks/test_uri_benchmarks.py -m benchmark -s

The same script, written only against MLflow's fluent API, logs 3 metrics per
call in a fresh process for each backend: ``syncd:///``, ``sqlite:///``, a real
``mlflow server`` over HTTP, and MLflow's async logging
(MLFLOW_ENABLE_ASYNC_LOGGING) on SQLite. It times the loop and ``end_run``.

Two costs are reported. *In the store*: the time spent inside the tracking
store's ``log_batch`` per call, what the choice of backend decides (MLflow's
fluent ``log_metrics`` spends the same few hundred microseconds before reaching
any store: building clients, validating). *Whole call*: the loop's time per
call, plus for async logging the wait at ``end_run`` while the queued batches
are written, spread over the calls. Targets: in the store, syncd >= 100x
cheaper than SQLite; whole call, syncd >= 20x cheaper than async logging;
``end_run`` through syncd waits for no flush (<= 100 ms whatever the number of
calls).

Sizes: SYNCD_BENCH_URI_CALLS (20000 calls through syncd),
SYNCD_BENCH_URI_STORE_CALLS (500 calls to SQLite, HTTP and async logging).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from bench_support import Report, env_int
from mlflow_server import MlflowServerProcess

pytestmark = pytest.mark.timeout(1800)

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import mlflow
    from mlflow.tracking._tracking_service.utils import _get_store

    calls = int(sys.argv[1])
    perf, perf_ns = time.perf_counter, time.perf_counter_ns
    mlflow.set_experiment("uri-bench")

    def loop(first_step):
        for i in range(calls):
            mlflow.log_metrics(
                {"loss": 1.0 / (i + 1), "acc": i / (calls + 1), "lr": 0.01}, step=first_step + i
            )

    mlflow.start_run(run_name="bench")
    loop(0)  # warm-up: imports, caches, the store's first writes
    # time spent inside the store's log_batch (for async logging: in its worker threads)
    store_class = type(_get_store())
    log_batch, in_store = store_class.log_batch, [0]

    def timed_log_batch(self, *args, **kwargs):
        t0 = perf_ns()
        try:
            return log_batch(self, *args, **kwargs)
        finally:
            in_store[0] += perf_ns() - t0

    store_class.log_batch = timed_log_batch
    started = perf()
    loop(calls)
    looped = perf()
    mlflow.end_run()
    ended = perf()
    print(json.dumps({
        "per_call_us": (looped - started) / calls * 1e6,
        "end_run_ms": (ended - looped) * 1e3,
        "in_store_us": in_store[0] / calls / 1e3,
    }))
    """
)


def measure(
    cwd: Path, env: dict[str, str], tracking_uri: str, calls: int, *extra: str
) -> dict[str, float]:
    cwd.mkdir(parents=True, exist_ok=True)
    run_env = dict(env, MLFLOW_TRACKING_URI=tracking_uri)
    for pair in extra:
        key, _, value = pair.partition("=")
        run_env[key] = value
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(calls)],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.benchmark
def test_log_metrics_cost_through_the_syncd_uri(
    tmp_path: Path,
    report: Report,
    bench_env: dict[str, str],
    mlflow_template: Path,
) -> None:
    bench = "uri log_metrics"
    calls = env_int("SYNCD_BENCH_URI_CALLS", 20_000)
    store_calls = env_int("SYNCD_BENCH_URI_STORE_CALLS", 500)
    template = mlflow_template

    def sqlite_uri(name: str) -> str:
        db = tmp_path / name
        db.write_bytes(template.read_bytes())
        return f"sqlite:///{db}"

    syncd = measure(tmp_path / "syncd", bench_env, f"syncd://{tmp_path / 'runs'}", calls)
    sqlite = measure(tmp_path / "sqlite", bench_env, sqlite_uri("direct.db"), store_calls)
    aio = measure(
        tmp_path / "async",
        bench_env,
        sqlite_uri("async.db"),
        store_calls,
        "MLFLOW_ENABLE_ASYNC_LOGGING=true",
    )
    server = MlflowServerProcess(tmp_path / "server", template)
    server.start()
    try:
        http = measure(tmp_path / "http", bench_env, server.uri, store_calls)
    finally:
        server.stop()

    # async logging: the loop only queues; end_run waits while the queue is written out
    aio_total_us = aio["per_call_us"] + aio["end_run_ms"] * 1000 / store_calls
    syncd_store = max(syncd["in_store_us"], 0.001)

    for name, figures, n in (
        ("syncd:", syncd, calls),
        ("sqlite:", sqlite, store_calls),
        ("http (mlflow server)", http, store_calls),
        ("async logging (sqlite)", aio, store_calls),
    ):
        report.add(bench, f"{name} per call, {n:,} calls", figures["per_call_us"], "us/call")
        if figures is not aio:  # its worker threads call a log_batch bound before timing
            report.add(bench, f"{name} in the store's log_batch", figures["in_store_us"], "us/call")
        report.add(bench, f"{name} end_run", figures["end_run_ms"], "ms")
    report.add(bench, "async logging per call incl. end_run wait", aio_total_us, "us/call")

    vs_sqlite = sqlite["in_store_us"] / syncd_store
    vs_async = aio_total_us / syncd["per_call_us"]
    report.add(bench, "in the store: sqlite / syncd", vs_sqlite, "x", ">= 100x", vs_sqlite >= 100)
    report.add(bench, "in the store: http / syncd", http["in_store_us"] / syncd_store, "x")
    report.add(
        bench,
        "whole call incl. end_run: async logging / syncd",
        vs_async,
        "x",
        ">= 20x",
        vs_async >= 20,
    )
    for name, value in (("sqlite", sqlite["per_call_us"]), ("http", http["per_call_us"])):
        report.add(bench, f"whole call: {name} / syncd", value / syncd["per_call_us"], "x")
    report.add(
        bench, "async logging in-loop call / syncd", aio["per_call_us"] / syncd["per_call_us"], "x"
    )
    end_ok = syncd["end_run_ms"] <= 100
    report.add(bench, "syncd: end_run wait", syncd["end_run_ms"], "ms", "<= 100 ms", end_ok)

    assert vs_sqlite >= 100, f"syncd's store is only {vs_sqlite:.0f}x cheaper than SQLite's"
    assert vs_async >= 20, f"syncd is only {vs_async:.0f}x cheaper than async logging"
    assert end_ok, f"end_run through syncd took {syncd['end_run_ms']:.0f} ms"
