"""Real sink faults: `syncd` subprocesses writing to a real `mlflow server` through a fault proxy.

Every test owns its experiment on the session's server, so each run, duplicate or
missing record found belongs to the test that looks. The oracle is twofold: the
metric histories and statuses read straight from the record files, and a
fault-free backfill of the same records (runs, params, tags, parent links,
artifacts, datasets).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import NotifySocket, SyncdProcess, run_syncd, wait_for
from fault_proxy import Fault, FaultProxy
from helpers import EXAMPLES, line, run_backfill, snapshot, started, write_record
from mlflow_server import MlflowServerProcess, unique_experiment

from syncd import RunRecorder

pytestmark = pytest.mark.slow

API = r"^/api/2\.0/mlflow/"
RUNS_CREATE = r"/runs/create$"
LOG_BATCH = r"/runs/log-batch$"
BULK_STEPS = 400  # x 3 keys: two log_batch calls per bulk record
Expected = dict[str, Any]


# -- records and what MLflow must hold for them ------------------------------------------------


def make_records(root: Path, experiment: str) -> list[Path]:
    """The example runs (sweep with children, artifacts, NaN, failed, resumed) and two bulk
    records, all in ``experiment``."""
    shutil.copytree(EXAMPLES, root)
    for path in root.rglob("run_record.jsonl"):
        first, rest = path.read_text().split("\n", 1)
        event = json.loads(first)
        event["experiment"] = experiment
        path.write_text(json.dumps(event, separators=(",", ":")) + "\n" + rest)
    for i in range(2):
        lines = [started(f"bulk-{i}", experiment, run_name=f"bulk-{i}")]
        lines.append(line(1, "params", params={"lr": 0.01 * (i + 1), "depth": 4}))
        for step in range(BULK_STEPS):
            metrics = {"loss": 1 / (step + 1), "acc": step / BULK_STEPS, "lr": 0.01 * (i + 1)}
            lines.append(line(2 + step, "metrics", step=step, metrics=metrics))
        lines.append(line(2 + BULK_STEPS, "run_finished", status="FINISHED"))
        write_record(root / "bulk" / f"r{i}", lines)
    return sorted(root.rglob("run_record.jsonl"))


def _value(raw: Any) -> Any:
    value = float(raw)  # "NaN", "Infinity" and numbers alike
    return "NaN" if math.isnan(value) else value


def expected_from_record(path: Path) -> tuple[str, Expected]:
    """The record id, metric histories and status a record's lines call for."""
    record_id = ""
    metrics: dict[str, list[tuple[int, int, Any]]] = {}
    status = "RUNNING"
    for raw in path.read_text().splitlines():
        event = json.loads(raw)
        if event["type"] == "run_started":
            record_id = event["record_id"]
        elif event["type"] == "metrics":
            for key, value in event["metrics"].items():
                point = (event.get("step", 0), event["ts"], _value(value))
                metrics.setdefault(key, []).append(point)
        elif event["type"] == "run_finished":
            status = event["status"]
        elif event["type"] == "run_resumed":
            status = "RUNNING"
    return record_id, {"status": status, "metrics": {k: sorted(set(v)) for k, v in metrics.items()}}


def expected_from_records(paths: list[Path]) -> dict[str, Expected]:
    return dict(expected_from_record(p) for p in paths)


def run_counts(client: Any, experiment: str) -> Counter[str]:
    """Runs per syncd.record_id in ``experiment`` (a count above 1 is a duplicate)."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return Counter()
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=5000)
    return Counter(run.data.tags.get("syncd.record_id") for run in runs)


def observed(client: Any, experiment: str) -> dict[str, Expected]:
    """What MLflow holds, in the shape of :func:`expected_from_record`."""
    snap = snapshot(client, [experiment])
    return {
        rid: {
            "status": s["status"],
            "metrics": {k: sorted(set(v)) for k, v in s["metrics"].items()},
            "points": sum(len(v) for v in s["metrics"].values()),
        }
        for rid, s in snap.items()
    }


def normalized(snap: dict[str, Any]) -> dict[str, Any]:
    """A snapshot comparable across experiments and folders: no run ids, no paths."""
    record_of_run = {s["run_id"]: rid for rid, s in snap.items()}
    out = {}
    for rid, state in snap.items():
        state = {k: v for k, v in state.items() if k != "run_id"}
        tags = {k: v for k, v in state["tags"].items() if k != "syncd.source"}
        if "mlflow.parentRunId" in tags:
            tags["mlflow.parentRunId"] = record_of_run.get(tags["mlflow.parentRunId"], "?")
        state["tags"] = tags
        out[rid] = state
    return out


def assert_mirrored(client: Any, experiment: str, expected: dict[str, Expected]) -> None:
    """One run per record, exact histories (no missing or duplicate points) and statuses."""
    counts = run_counts(client, experiment)
    duplicates = {rid: n for rid, n in counts.items() if n > 1}
    assert not duplicates, f"duplicate runs per record: {duplicates}"
    missing = sorted(set(expected) - set(counts))
    assert not missing, f"records never written to MLflow: {missing}"
    assert set(counts) == set(expected)
    got = observed(client, experiment)
    for rid, want in expected.items():
        assert got[rid]["status"] == want["status"], rid
        assert got[rid]["metrics"] == want["metrics"], rid
        total = sum(len(v) for v in want["metrics"].values())
        assert got[rid]["points"] == total, f"{rid}: duplicate metric points"


def wait_mirrored(
    client: Any, experiment: str, expected: dict[str, Expected], timeout: float
) -> None:
    """Poll until MLflow mirrors ``expected``; at the deadline, fail with the difference."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_mirrored(client, experiment, expected)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def direct(mlflow_server: MlflowServerProcess) -> Any:
    """A client of the server itself, behind no proxy: what users see."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServerProcess
) -> dict[str, Any]:
    """A fault-free backfill of the records straight to the server, normalised."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("reference")
    experiment = unique_experiment("reference")
    paths = make_records(folder / "runs", experiment)
    summary = run_backfill(folder / "runs", mlflow_server.uri, folder / ".syncd")
    assert summary.clean and summary.synced == len(paths), summary
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    # the reference itself agrees with the records
    assert_mirrored(client, experiment, expected_from_records(paths))
    return normalized(snapshot(client, [experiment]))


@pytest.fixture
def daemons(workdir: Path) -> Iterator[Callable[..., SyncdProcess]]:
    started_: list[SyncdProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> SyncdProcess:
        proc = SyncdProcess(workdir, *args, env=env)
        started_.append(proc)
        return proc

    yield start
    for proc in started_:
        proc.kill()
        print(f"--- {' '.join(proc.args)}\n{proc.logs()[-15000:]}")  # shown when a test fails


def backfill(workdir: Path, root: Path, proxy: FaultProxy) -> subprocess.CompletedProcess[str]:
    return run_syncd(
        "backfill",
        str(root),
        "--tracking-uri",
        proxy.url,
        "--state-dir",
        str(workdir / ".syncd"),
        "--json",
        cwd=workdir,
        timeout=150,
    )


def summary_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The --json summary (the document's own cleanliness is checked on its own, below)."""
    start = proc.stdout.find("{\n") if not proc.stdout.startswith("{") else 0
    try:
        out: dict[str, Any] = json.loads(proc.stdout[max(start, 0) :])
    except ValueError:
        pytest.fail(f"no JSON summary (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return out


def assert_backfill_ok(proc: subprocess.CompletedProcess[str]) -> None:
    summary = summary_of(proc)
    assert proc.returncode == 0, f"exit {proc.returncode}: {summary}\n{proc.stderr[-3000:]}"
    assert summary["errors"] == [] and summary["aborted"] is None


# -- backfill ---------------------------------------------------------------------------------


def test_backfill_refused_names_the_records_then_the_same_command_completes(
    workdir: Path, fault_proxy: FaultProxy, direct: Any, reference: dict[str, Any]
) -> None:
    experiment = unique_experiment("refused")
    root = workdir / "runs"
    paths = make_records(root, experiment)

    fault_proxy.refuse()
    failed = backfill(workdir, root, fault_proxy)
    assert failed.returncode != 0, failed.stdout
    summary = summary_of(failed)
    named = {err["file"] for err in summary["errors"]}
    assert named, f"no record named as not written: {summary}"
    assert named <= {str(p) for p in paths}, named
    assert "Traceback" not in failed.stderr
    assert run_counts(direct, experiment) == Counter()  # nothing got through

    fault_proxy.pass_through()
    again = backfill(workdir, root, fault_proxy)
    assert_backfill_ok(again)
    assert_mirrored(direct, experiment, expected_from_records(paths))
    assert normalized(snapshot(direct, [experiment])) == reference


def test_backfill_with_lost_create_replies_makes_one_run_per_record(
    workdir: Path, fault_proxy: FaultProxy, direct: Any, reference: dict[str, Any]
) -> None:
    experiment = unique_experiment("lost-create")
    root = workdir / "runs"
    paths = make_records(root, experiment)

    # each distinct create call is applied by MLflow but its reply is lost, once
    fault_proxy.lose_replies(path=RUNS_CREATE, first_per_body=True)
    proc = backfill(workdir, root, fault_proxy)
    assert fault_proxy.fault_count(Fault.LOSE_REPLY) >= len(paths)
    assert_mirrored(direct, experiment, expected_from_records(paths))
    assert normalized(snapshot(direct, [experiment])) == reference
    assert_backfill_ok(proc)


def test_backfill_retries_503s_without_duplicate_points(
    workdir: Path, fault_proxy: FaultProxy, direct: Any, reference: dict[str, Any]
) -> None:
    experiment = unique_experiment("503")
    root = workdir / "runs"
    paths = make_records(root, experiment)

    # every distinct write is refused once, its retry is answered: with parallel writers
    # sharing the proxy, a plain "every other call" could refuse one write's every retry
    fault_proxy.fail_with_503(path=LOG_BATCH, first_per_body=True)
    proc = backfill(workdir, root, fault_proxy)
    assert_backfill_ok(proc)
    assert fault_proxy.fault_count(Fault.ERROR_503) >= len(paths)
    assert_mirrored(direct, experiment, expected_from_records(paths))
    assert normalized(snapshot(direct, [experiment])) == reference


def test_backfill_json_over_http_is_one_document(
    workdir: Path, fault_proxy: FaultProxy, direct: Any
) -> None:
    """docs/cli-json.md: stdout holds the JSON document, nothing else, whatever the store."""
    experiment = unique_experiment("json")
    path = write_record(
        workdir / "runs" / "r",
        [started("json-1", experiment), line(1, "run_finished", status="FINISHED")],
    )
    proc = backfill(workdir, workdir / "runs", fault_proxy)
    assert_backfill_ok(proc)
    assert_mirrored(direct, experiment, expected_from_records([path]))
    assert proc.stdout.startswith("{"), f"stdout is not only the JSON document:\n{proc.stdout}"
    assert json.loads(proc.stdout)["synced"] == 1


# -- the daemon -------------------------------------------------------------------------------


# The periodic full rescan is the safety net for lost file notices; with it an hour away,
# a record the daemon drops on a sink fault stays missing instead of reappearing by luck.
NO_SAFETY_NET = {"SYNCD_WATCH__RESCAN_INTERVAL": "3600"}


def transient_errors(syncd: SyncdProcess) -> float:
    text = syncd.get("/metrics")[1]
    match = re.search(r'^syncd_sink_errors_total\{kind="transient"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def record_path(rec: RunRecorder) -> Path:
    return rec.path


def test_daemon_through_an_outage_loses_nothing(
    workdir: Path, fault_proxy: FaultProxy, direct: Any, daemons: Callable[..., SyncdProcess]
) -> None:
    experiment = unique_experiment("outage")
    root = workdir / "runs"
    early = RunRecorder(root / "early", experiment=experiment).start()
    early.log_params({"lr": 0.01})
    for step in range(5):
        early.log_metrics({"m": float(step)}, step=step)
    syncd = daemons(
        str(root), "--tracking-uri", fault_proxy.url, "--state-dir", ".syncd", env=NO_SAFETY_NET
    )
    syncd.wait_ready()
    wait_mirrored(direct, experiment, expected_from_records([record_path(early)]), 30)

    fault_proxy.refuse()
    # a record born and finished during the outage: its first write is refused, and the
    # file never changes again, so nothing but syncd's own retry can bring it over
    late = RunRecorder(root / "late", experiment=experiment).start()
    for step in range(10):
        late.log_metrics({"x": step / 10}, step=step)
    late.finish()
    wait_for(lambda: syncd.health()[0] == 503, 30, what="not ready")
    assert syncd.health()[1]["sink_up"] is False
    for step in range(5, 20):
        early.log_metrics({"m": float(step)}, step=step)
    wait_for(lambda: transient_errors(syncd) >= 3, 30, what="three refused attempts")
    assert syncd.health()[0] == 503

    fault_proxy.pass_through()
    wait_for(lambda: syncd.health()[0] == 200, 60, what="ready again")
    early.finish()
    expected = expected_from_records([record_path(early), record_path(late)])
    wait_mirrored(direct, experiment, expected, 30)
    assert syncd.stop() == 0


def test_daemon_with_lost_replies_and_503s_mixed(
    workdir: Path, fault_proxy: FaultProxy, direct: Any, daemons: Callable[..., SyncdProcess]
) -> None:
    experiment = unique_experiment("mixed")
    root = workdir / "runs"
    recorders = []
    for i in range(3):
        rec = RunRecorder(root / f"r{i}", experiment=experiment).start()
        rec.log_params({"i": i})
        for step in range(20):
            rec.log_metrics({"a": step * 1.5, "b": float(i)}, step=step)
        recorders.append(rec)
    recorders[0].finish()

    fault_proxy.lose_replies(every=3, path=API)
    fault_proxy.fail_with_503(every=4, path=API)
    syncd = daemons(
        str(root), "--tracking-uri", fault_proxy.url, "--state-dir", ".syncd", env=NO_SAFETY_NET
    )
    wait_for(lambda: syncd.get("/healthz")[0] == 200, 60, what="the health endpoint")
    for step in range(20, 40):  # live appends while the faults go on
        for rec in recorders[1:]:
            rec.log_metrics({"a": step * 1.5}, step=step)
    for rec in recorders[1:]:
        rec.finish()
    expected = expected_from_records([record_path(r) for r in recorders])
    wait_mirrored(direct, experiment, expected, 30)
    assert fault_proxy.fault_count(Fault.LOSE_REPLY) and fault_proxy.fault_count(Fault.ERROR_503)
    assert syncd.stop() == 0


WATCHDOG_SEC = 2.0


def test_watchdog_pings_continue_while_mlflow_calls_stall(
    workdir: Path, fault_proxy: FaultProxy, direct: Any, daemons: Callable[..., SyncdProcess]
) -> None:
    experiment = unique_experiment("stall")
    root = workdir / "runs"
    root.mkdir()
    notify = NotifySocket(workdir / "notify.sock")
    try:
        syncd = daemons(
            str(root),
            "--tracking-uri",
            fault_proxy.url,
            "--state-dir",
            ".syncd",
            env={
                "NOTIFY_SOCKET": str(notify.path),
                "WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1_000_000)),
                "SYNCD_TIMEOUTS__HTTP": "60",  # the stalled call waits; it does not time out
            },
        )
        wait_for(lambda: notify.times("READY=1"), 60, what="READY=1")
        wait_for(lambda: len(notify.times("WATCHDOG=1")) >= 2, 10, what="watchdog pings")

        stall = fault_proxy.stall(seconds=6.0, path=LOG_BATCH)
        rec = RunRecorder(root / "r", experiment=experiment).start()
        for step in range(5):
            rec.log_metrics({"m": float(step)}, step=step)
        rec.finish()
        wait_for(lambda: fault_proxy.held, 30, what="a stalled log_batch")
        wait_for(lambda: stall.matched >= 1 and not fault_proxy.held, 30, what="the stall to end")
        stall_over = time.monotonic()
        wait_mirrored(direct, experiment, expected_from_records([record_path(rec)]), 60)
        # a couple of pings after the stall, so the window below covers all of it
        wait_for(
            lambda: sum(t > stall_over for t in notify.times("WATCHDOG=1")) >= 2,
            10,
            what="pings after the stall",
        )
        pings = notify.times("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        limit = WATCHDOG_SEC / 2 + 2
        assert max(gaps) <= limit, (
            f"WATCHDOG=1 gap of {max(gaps):.1f}s > {limit:.1f}s while an MLflow call stalled"
            f" (gaps: {[round(g, 1) for g in gaps]})"
        )
        assert syncd.stop() == 0
    finally:
        notify.close()


def test_models_and_snapshot_runs_are_written_once_when_replies_are_lost(
    workdir: Path, fault_proxy: FaultProxy, direct: Any
) -> None:
    """A logged model with a registered version and alias, and a snapshot run directory,
    backfilled while the server applies every distinct write but the first reply to each is
    lost, and every first log-batch is answered 503: one run per record, one LoggedModel,
    one registered version holding the alias, the snapshot's params and artifacts, once."""
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    experiment = unique_experiment("lost-models")
    registered = f"scorer-{experiment}"
    models_root, stages_root = workdir / "models", workdir / "stages"
    fitted = LogisticRegression().fit(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0, 1]))
    with RunRecorder(models_root / "fit", experiment=experiment, run_name="fit") as rec:
        rec.log_metrics({"acc": 1.0}, step=0)
        mlflow.sklearn.save_model(fitted, rec.run_dir / "model", pip_requirements=[])
        model_id = rec.log_model("model", "clf", registered_model_name=registered, alias="champion")
    stage = stages_root / "2025-11-20_seasonal_fit"
    shutil.copytree(EXAMPLES.parent / "snapshots" / "stages" / stage.name, stage)
    meta = stage / "metadata.yaml"
    meta.write_text(meta.read_text().replace("seasonal_forecast", f"{experiment}-stages"))
    config = workdir / "syncd.yaml"
    mapping = EXAMPLES.parent / "mappings" / "stage_dir.yaml"
    config.write_text(
        f"roots:\n  - path: {models_root}\n"
        f"  - {{path: {stages_root}, format: snapshot, mapping: {mapping}}}\n"
    )

    fault_proxy.lose_replies(path=API, first_per_body=True)
    fault_proxy.fail_with_503(path=LOG_BATCH, first_per_body=True)
    proc = run_syncd(
        "backfill", "--config", str(config), "--tracking-uri", fault_proxy.url,
        "--state-dir", str(workdir / ".syncd"), "--json", cwd=workdir, timeout=300,
    )  # fmt: skip
    assert fault_proxy.fault_count(Fault.LOSE_REPLY) >= 5
    assert_backfill_ok(proc)

    models = direct.search_logged_models(
        experiment_ids=[direct.get_experiment_by_name(experiment).experiment_id]
    )
    assert [(m.name, m.tags.get("syncd.model_id"), m.status.value) for m in models] == [
        ("clf", model_id, "READY")
    ]
    versions = direct.search_model_versions(f"name = '{registered}'")
    assert [models[0].model_id in v.source for v in versions] == [True], versions
    assert direct.get_model_version_by_alias(registered, "champion").version == versions[0].version
    assert run_counts(direct, experiment) == Counter({rec.record_id: 1})
    [run] = direct.search_runs(
        [direct.get_experiment_by_name(f"{experiment}-stages").experiment_id]
    )
    assert run.data.params["fit/random_seed"] == "1234"
    files = {f.path for f in direct.list_artifacts(run.info.run_id)}
    assert {"config_resolved.yaml", "metadata.yaml"} <= files
