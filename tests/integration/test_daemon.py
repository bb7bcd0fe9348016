"""`syncd run` as a real service: subprocesses, real signals, real HTTP, a real MLflow store."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    NotifySocket,
    SyncdProcess,
    free_port,
    run_syncd,
    wait_for,
)
from helpers import history, runs_by_record
from mlflow_server import MlflowServerProcess

from syncd import RunRecorder

pytestmark = pytest.mark.slow


def visible_points(client: Any, record_id: str, key: str) -> int:
    runs = runs_by_record(client)
    if record_id not in runs:
        return 0
    return len(client.get_metric_history(runs[record_id].info.run_id, key))


@pytest.fixture
def daemon_factory(workdir: Path):
    started: list[SyncdProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> SyncdProcess:
        proc = SyncdProcess(workdir, *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def test_follows_live_runs_and_drains_on_sigterm(
    workdir: Path, tracking_uri: str, client, daemon_factory
) -> None:
    root = workdir / "runs"
    root.mkdir()
    # a long linger, so that SIGTERM below finds noticed-but-unsynced events to drain
    syncd = daemon_factory(
        str(root), "--tracking-uri", tracking_uri, env={"SYNCD_WRITER__LINGER_MS": "3000"}
    )
    syncd.wait_ready()

    # a run directory created after start, at depth
    rec = RunRecorder(root / "team" / "2025-11-22" / "run1", experiment="live").start()
    rec.log_params({"lr": 0.01})
    for step in range(10):
        rec.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    wait_for(lambda: visible_points(client, rec.record_id, "loss") == 10, 20, what="10 points")

    for step in range(10, 15):
        rec.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    rec.finish()
    # noticed, still lingering: SIGTERM must drain it before exit
    wait_for(lambda: syncd.health()[1]["backlog_records"] == 1, 10, what="the notice")
    assert visible_points(client, rec.record_id, "loss") == 10
    assert syncd.stop(signal.SIGTERM) == 0
    run = runs_by_record(client)[rec.record_id]
    assert [s for s, _, _ in history(client, run.info.run_id, "loss")] == list(range(15))
    assert run.info.status == "FINISHED"
    events = [e["event"] for e in syncd.log_events()]
    assert "signal_received" in events and "service_stopped" in events


def test_restart_catches_up_on_what_was_written_while_down(
    workdir: Path, tracking_uri: str, client, daemon_factory
) -> None:
    root = workdir / "runs"
    rec = RunRecorder(root / "r", experiment="e").start()
    rec.log_metrics({"m": 1.0}, step=0)
    first = daemon_factory(str(root), "--tracking-uri", tracking_uri)
    first.wait_ready()
    wait_for(lambda: visible_points(client, rec.record_id, "m") == 1, 20)
    assert first.stop() == 0

    for step in range(1, 6):
        rec.log_metrics({"m": float(step)}, step=step)
    rec.finish()
    other = RunRecorder(root / "new_while_down", experiment="e").start()
    other.finish()

    second = daemon_factory(str(root), "--tracking-uri", tracking_uri)
    second.wait_ready()
    wait_for(lambda: visible_points(client, rec.record_id, "m") == 6, 20)
    wait_for(lambda: other.record_id in runs_by_record(client), 20)
    assert runs_by_record(client)[rec.record_id].info.status == "FINISHED"
    assert len(runs_by_record(client)) == 2
    assert second.stop() == 0


def test_polling_with_rescans_only_converges(
    workdir: Path, tracking_uri: str, client, daemon_factory
) -> None:
    root = workdir / "runs"
    root.mkdir()
    config = workdir / "syncd.yaml"
    config.write_text("watch:\n  mode: polling\n  poll_interval: 3600\n  rescan_interval: 0.5\n")
    notify = NotifySocket(workdir / "notify.sock")
    try:
        syncd = daemon_factory(
            str(root),
            "--config",
            str(config),
            "--tracking-uri",
            tracking_uri,
            env={"NOTIFY_SOCKET": str(notify.path)},
        )
        syncd.wait_ready()
        assert syncd.health()[1]["watch_mode"] == "polling"
        rec = RunRecorder(root / "a" / "b", experiment="e").start()
        rec.log_metrics({"x": 1.0})
        rec.finish()
        wait_for(lambda: visible_points(client, rec.record_id, "x") == 1, 20, what="rescan")
        assert syncd.stop() == 0
        assert notify.fields("READY=1") and notify.fields("STOPPING=1")
        assert not notify.fields("WATCHDOG=1")  # no WatchdogSec, no pings
    finally:
        notify.close()


def test_health_endpoints_and_metrics(workdir: Path, tracking_uri: str, daemon_factory) -> None:
    from mlflow.tracking import MlflowClient

    root = workdir / "runs"
    rec = RunRecorder(root / "r", experiment="e").start()
    rec.log_metrics({"a": 1.0, "b": 2.0})
    rec.finish()
    bad = root / "bad" / "run_record.jsonl"
    bad.parent.mkdir()
    bad.write_text(
        '{"v":1,"seq":0,"ts":1,"type":"run_started","record_id":"b1","experiment":"e"}\n{nope\n'
    )
    syncd = daemon_factory(str(root), "--tracking-uri", tracking_uri)
    syncd.wait_ready()

    code, live = syncd.health("/healthz")
    assert code == 200 and live["status"] == "ok" and live["heartbeat_age_seconds"] < 5
    wait_for(lambda: syncd.health()[1]["last_sync_at"] is not None, 20)
    code, ready = syncd.health("/readyz")
    assert code == 200
    assert {"status", "backlog_events", "lag_seconds", "last_sync_at", "error_count"} <= set(ready)

    def metrics() -> str:
        return syncd.get("/metrics")[1]

    wait_for(lambda: "syncd_metric_points_applied_total 2.0" in metrics(), 20)
    text = metrics()
    for name in (
        'syncd_records{state="synced"}',
        "syncd_events_applied_total",
        "syncd_artifacts_uploaded_total",
        "syncd_sink_errors_total",
        "syncd_sink_retries_total",
        "syncd_backlog_events",
        "syncd_oldest_unsynced_event_age_seconds",
        "syncd_last_sync_timestamp_seconds",
        "syncd_batch_size_bucket",
        "syncd_write_duration_seconds_bucket",
    ):
        assert name in text, name
    assert "syncd_record_errors_total 1.0" in text
    wait_for(lambda: 'syncd_records{state="error"} 1.0' in metrics(), 20)
    assert syncd.get("/nope")[0] == 404

    # a deleted record: kept in the ledger as gone, MLflow untouched
    bad.unlink()
    wait_for(lambda: 'syncd_records{state="gone"} 1.0' in metrics(), 30, what="gone record")
    assert "b1" in runs_by_record(MlflowClient(tracking_uri))
    assert syncd.stop() == 0

    # the health port already taken: a clear configuration error, no traceback
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_syncd(
            "run",
            str(root),
            "--tracking-uri",
            tracking_uri,
            "--health-addr",
            f"127.0.0.1:{port}",
            cwd=workdir,
            timeout=120,
        )
    assert proc.returncode == 2 and "health_addr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_errors_exit_two_naming_the_key(workdir: Path) -> None:
    config = workdir / "bad.yaml"
    config.write_text("roots: [runs]\nwriter:\n  linger_ms: -5\n")
    proc = run_syncd("run", "--config", str(config), cwd=workdir)
    assert proc.returncode == 2
    assert "writer.linger_ms" in proc.stderr and "Traceback" not in proc.stderr
    config.write_text("roots: [runs]\nwach: {}\n")
    proc = run_syncd("run", "--config", str(config), cwd=workdir)
    assert proc.returncode == 2 and "wach" in proc.stderr


def test_sighup_reloads_the_config(
    workdir: Path, tracking_uri: str, client, daemon_factory
) -> None:
    first, second = workdir / "first", workdir / "second"
    first.mkdir()
    second.mkdir()
    config = workdir / "syncd.yaml"
    config.write_text(f"roots: [{first}]\n")
    syncd = daemon_factory("--config", str(config), "--tracking-uri", tracking_uri)
    syncd.wait_ready()
    config.write_text(f"roots: [{first}, {second}]\n")
    syncd.send(signal.SIGHUP)
    wait_for(lambda: any(e["event"] == "config_reloaded" for e in syncd.log_events()), 20)
    rec = RunRecorder(second / "r", experiment="e").start()
    rec.finish()
    wait_for(lambda: rec.record_id in runs_by_record(client), 20, what="record in new root")
    # a broken config on reload is rejected and the service keeps running
    config.write_text("roots: [\n")
    syncd.send(signal.SIGHUP)
    wait_for(lambda: any(e["event"] == "reload_rejected" for e in syncd.log_events()), 20)
    assert syncd.get("/healthz")[0] == 200
    assert syncd.stop() == 0


class HangingMlflow:
    """Answers MLflow's health probe, then holds every other request open: a stuck sink."""

    def __init__(self) -> None:
        self.port = free_port()
        release = self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if "experiments/search" in self.path:
                    body = json.dumps({"experiments": []}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                release.wait(120)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_systemd_notify_and_a_stuck_loop_stops_watchdog_pings(
    workdir: Path, daemon_factory
) -> None:
    notify = NotifySocket(workdir / "notify.sock")
    fake = HangingMlflow()
    try:
        root = workdir / "runs"
        root.mkdir()
        syncd = daemon_factory(
            str(root),
            "--tracking-uri",
            f"http://127.0.0.1:{fake.port}",
            env={
                "NOTIFY_SOCKET": str(notify.path),
                "WATCHDOG_USEC": "1000000",
                # syncd gives each call timeouts.http + 5 s; this client waits far longer,
                # as a call that ignores its timeout would.
                "SYNCD_TIMEOUTS__HTTP": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "300",
            },
        )
        wait_for(lambda: notify.fields("READY=1"), 60, what="READY=1")
        wait_for(lambda: len(notify.fields("WATCHDOG=1")) >= 3, 10, what="watchdog pings")
        assert notify.fields("STATUS=")
        assert syncd.get("/healthz")[0] == 200

        # The loop now blocks inside an MLflow call that outlives its deadline.
        rec = RunRecorder(root / "r", experiment="e").start()
        rec.finish()
        time.sleep(0)  # the notice arrives by inotify
        wait_for(
            lambda: time.monotonic() - max(notify.fields("WATCHDOG=1")) > 3.0,
            30,
            what="watchdog pings to stop",
        )
        last_ping = max(notify.fields("WATCHDOG=1"))
        _code, body = wait_for(
            lambda: (r := syncd.health("/healthz"))[0] == 503 and r, 30, what="/healthz 503"
        )
        assert "heartbeat" in body["reasons"][0]
        assert max(notify.fields("WATCHDOG=1")) == last_ping  # still silent
        syncd.kill()
    finally:
        fake.close()
        notify.close()


def test_sink_outage_loses_nothing_and_readiness_follows_it(
    workdir: Path, mlflow_template: Path, daemon_factory
) -> None:
    from mlflow.tracking import MlflowClient

    server = MlflowServerProcess(workdir / "mlflow", template=mlflow_template)
    server.start()
    try:
        root = workdir / "runs"
        root.mkdir()
        syncd = daemon_factory(str(root), "--tracking-uri", server.uri)
        syncd.wait_ready()
        client = MlflowClient(server.uri)
        rec = RunRecorder(root / "r", experiment="outage").start()
        rec.log_metrics({"m": 0.0}, step=0)
        wait_for(lambda: visible_points(client, rec.record_id, "m") == 1, 30)

        server.stop()
        for step in range(1, 31):
            rec.log_metrics({"m": float(step)}, step=step)
        _code, body = wait_for(lambda: (r := syncd.health())[0] == 503 and r, 30, what="not ready")
        assert body["sink_up"] is False
        time.sleep(30)  # the outage: thirty seconds of appends nobody can write
        for step in range(31, 40):
            rec.log_metrics({"m": float(step)}, step=step)
        rec.finish()
        assert syncd.health()[0] == 503

        server.start()
        wait_for(lambda: syncd.health()[0] == 200, 60, what="ready again")
        wait_for(lambda: visible_points(client, rec.record_id, "m") == 40, 60, what="40 points")
        run = runs_by_record(client)[rec.record_id]
        steps = [s for s, _, _ in history(client, run.info.run_id, "m")]
        assert steps == list(range(40))
        wait_for(lambda: client.get_run(run.info.run_id).info.status == "FINISHED", 30)
        assert len(runs_by_record(client)) == 1
        metrics = syncd.get("/metrics")[1]
        assert 'syncd_sink_errors_total{kind="transient"}' in metrics
        assert syncd.stop() == 0
    finally:
        server.stop()
