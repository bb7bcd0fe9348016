"""Unchanged MLflow code through MLFLOW_TRACKING_URI=syncd:, mirrored by backfill.

The same training script, written only against the public mlflow API, runs
twice in a subprocess: straight into a SQLite store, and through ``syncd:``
followed by ``syncd backfill`` into another SQLite store. The two stores must
agree run by run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import artifact_files, run_backfill
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

TRAIN = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import mlflow
    import pandas as pd

    mlflow.set_experiment("sweep")
    Path("report.txt").write_text("a report\\n")
    with mlflow.start_run(run_name="parent", tags={"team": "ranking"}) as parent:
        mlflow.log_params({"lr": 0.01, "optimizer": "adam"})
        for step in range(30):
            mlflow.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 30}, step=step)
        mlflow.set_tags({"phase": "train"})
        mlflow.log_text("some notes", "notes/readme.txt")
        mlflow.log_dict({"depth": 8}, "config.json")
        mlflow.log_artifact("report.txt", artifact_path="reports")
        df = pd.DataFrame({"x": [1, 2, 3], "y": [0, 1, 0]})
        dataset = mlflow.data.from_pandas(df, source="s3://bucket/train.parquet", name="train")
        mlflow.log_input(dataset, context="training")
        for trial in range(3):
            try:
                with mlflow.start_run(run_name=f"trial-{trial}", nested=True):
                    mlflow.log_param("trial", trial)
                    mlflow.log_metric("score", trial * 0.5, step=trial)
                    if trial == 2:
                        raise RuntimeError("diverged")
            except RuntimeError:
                pass
    print(json.dumps({"parent": parent.info.run_id}))
    """
)

NOISE_TAGS = {"mlflow.parentRunId", "mlflow.source.git.commit", "mlflow.source.git.branch"}


def run_script(cwd: Path, tracking_uri: str, script: str = TRAIN) -> dict[str, Any]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def by_name(client: MlflowClient, experiment: str) -> dict[str, Any]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    names = {r.info.run_id: r.info.run_name for r in runs}
    out: dict[str, Any] = {}
    for run in runs:
        tags = run.data.tags
        out[run.info.run_name] = {
            "status": run.info.status,
            "params": dict(run.data.params),
            "tags": {
                k: v for k, v in tags.items() if not k.startswith("syncd.") and k not in NOISE_TAGS
            },
            "parent": names.get(tags.get("mlflow.parentRunId", "")),
            "metrics": {
                key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                for key in run.data.metrics
            },
            "artifacts": {
                path: Path(client.download_artifacts(run.info.run_id, path)).read_bytes()
                for path in artifact_files(client, run.info.run_id)
            },
            "inputs": sorted(
                (d.dataset.name, d.dataset.digest, tuple((t.key, t.value) for t in d.tags))
                for d in run.inputs.dataset_inputs
            ),
            "ended": run.info.end_time is not None,
        }
    return out


@pytest.fixture
def stores(workdir: Path, mlflow_template: Path) -> tuple[str, str]:
    uris = []
    for name in ("direct.db", "mirrored.db"):
        shutil.copy(mlflow_template, workdir / name)
        uris.append(f"sqlite:///{workdir / name}")
    return uris[0], uris[1]


def test_syncd_uri_mirrors_what_direct_logging_stores(
    workdir: Path, stores: tuple[str, str]
) -> None:
    direct_uri, mirrored_uri = stores
    (workdir / "direct").mkdir()
    (workdir / "through").mkdir()
    run_script(workdir / "direct", direct_uri)
    root = workdir / "runs"
    printed = run_script(workdir / "through", f"syncd://{root}")

    summary = run_backfill(root, mirrored_uri, workdir / ".syncd")
    assert summary.records == 4
    assert summary.with_errors == 0, summary.errors

    direct = by_name(MlflowClient(direct_uri), "sweep")
    mirrored = by_name(MlflowClient(mirrored_uri), "sweep")
    assert sorted(mirrored) == ["parent", "trial-0", "trial-1", "trial-2"]
    assert mirrored == direct
    assert mirrored["trial-2"]["status"] == "FAILED"
    assert mirrored["trial-0"]["parent"] == "parent"
    assert len(mirrored["parent"]["metrics"]["loss"]) == 30
    assert sorted(mirrored["parent"]["artifacts"]) == [
        "config.json",
        "notes/readme.txt",
        "reports/report.txt",
    ]

    # the id the training code printed finds the mirrored run
    found = MlflowClient(mirrored_uri).search_runs(
        [MlflowClient(mirrored_uri).get_experiment_by_name("sweep").experiment_id],
        filter_string=f"tags.`syncd.record_id` = '{printed['parent']}'",
    )
    assert [r.info.run_name for r in found] == ["parent"]


WORKER = textwrap.dedent(
    """
    import json, sys
    import mlflow

    worker = int(sys.argv[1])
    mlflow.set_experiment("shared")
    with mlflow.start_run(run_name=f"worker-{worker}") as run:
        mlflow.log_param("worker", worker)
        for step in range(100):
            mlflow.log_metrics({"loss": worker + step / 100, "step_sq": step * step}, step=step)
    print(json.dumps({"run_id": run.info.run_id}))
    """
)


@pytest.mark.slow
def test_eight_processes_log_through_one_root_at_once(
    workdir: Path, stores: tuple[str, str]
) -> None:
    _, mirrored_uri = stores
    root = workdir / "runs"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"syncd://{root}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(w)],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(8)
    ]
    run_ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        run_ids.append(json.loads(out.strip().splitlines()[-1])["run_id"])
    assert len(set(run_ids)) == 8
    experiments = json.loads((root / "experiments.json").read_text())["experiments"]
    assert sorted(e["name"] for e in experiments.values()) == ["Default", "shared"]

    summary = run_backfill(root, mirrored_uri, workdir / ".syncd")
    assert (summary.records, summary.with_errors) == (8, 0)
    client = MlflowClient(mirrored_uri)
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["syncd.record_id"] for r in runs) == sorted(run_ids)
    for run in runs:
        worker = int(run.data.params["worker"])
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(s, worker + s / 100) for s in range(100)]
        assert len(client.get_metric_history(run.info.run_id, "step_sq")) == 100
        assert run.info.status == "FINISHED"


def test_tag_deletions_are_mirrored_and_replay_safely(
    workdir: Path, stores: tuple[str, str]
) -> None:
    """delete_tag through syncd:, then backfill twice into SQLite; verify agrees."""
    from typer.testing import CliRunner

    from syncd.cli import app

    _, mirrored_uri = stores
    root = workdir / "runs"
    through = MlflowClient(tracking_uri=f"syncd://{root}")
    run_id = through.create_run("0", tags={"stage": "train", "team": "ml"}).info.run_id
    through.set_tag(run_id, "tmp", "x")
    through.delete_tag(run_id, "tmp")
    through.delete_tag(run_id, "stage")
    through.set_tag(run_id, "stage", "eval")  # set again after its deletion
    through.delete_tag(run_id, "team")
    through.set_terminated(run_id)

    summary = run_backfill(root, mirrored_uri, workdir / ".syncd")
    assert (summary.records, summary.with_errors) == (1, 0), summary.errors
    mirror = MlflowClient(mirrored_uri)
    (run,) = mirror.search_runs(["0"])
    expected = {"stage": "eval"}
    assert {k: v for k, v in run.data.tags.items() if k in ("stage", "team", "tmp")} == expected

    # a replay from the start deletes tags that are already gone: no error, same tags
    summary = run_backfill(root, mirrored_uri, workdir / ".syncd-again")
    assert summary.with_errors == 0, summary.errors
    (again,) = mirror.search_runs(["0"])
    assert again.info.run_id == run.info.run_id and again.data.tags == run.data.tags

    result = CliRunner().invoke(
        app, ["verify", str(root), "--tracking-uri", mirrored_uri, "--json"]
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["clean"] == 1


KILLED_TRAINER = textwrap.dedent(
    """
    import sys
    import mlflow

    mlflow.set_experiment("killed")
    with mlflow.start_run(run_name="long") as run:
        print(run.info.run_id, flush=True)
        mlflow.log_params({"lr": 0.1, "depth": 6})
        step = 0
        while True:  # until SIGKILLed
            mlflow.log_metrics({"loss": 1 / (step + 1), "acc": step / 1e6}, step=step)
            step += 1
    """
)


@pytest.mark.slow
def test_a_trainer_sigkilled_mid_loop_leaves_a_record_mirrored_exactly(
    workdir: Path, stores: tuple[str, str]
) -> None:
    """A training process writing through ``syncd:`` is SIGKILLed in the middle of its metric
    loop (possibly mid-line). The backfill mirrors every complete line exactly once and the
    torn tail nothing; the run stays RUNNING, as the process never ended it."""
    import signal
    import time

    _, mirrored_uri = stores
    root = workdir / "runs"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"syncd://{root}")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRAINER], cwd=workdir, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    [record] = wait_for_record(root, run_id)
    deadline = time.monotonic() + 60
    while record.stat().st_size < 200_000:  # a few thousand steps
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the trainer wrote too little"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    text = record.read_text()
    complete = text[: text.rfind("\n") + 1].splitlines()
    steps = sorted(
        json.loads(raw)["step"] for raw in complete if json.loads(raw)["type"] == "metrics"
    )
    summary = run_backfill(root, mirrored_uri, workdir / ".syncd")
    assert (summary.records, summary.with_errors, summary.failed) == (1, 0, 0), summary.errors
    client = MlflowClient(mirrored_uri)
    [run] = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert run.data.tags["syncd.record_id"] == run_id and run.info.status == "RUNNING"
    assert run.data.params == {"lr": "0.1", "depth": "6"}
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == steps  # every complete line once, nothing torn
    again = run_backfill(root, mirrored_uri, workdir / ".syncd")
    assert again.metric_points == 0 and len(
        client.get_metric_history(run.info.run_id, "loss")
    ) == len(steps)


def wait_for_record(root: Path, run_id: str, timeout: float = 60) -> list[Path]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in root.rglob("run_record.jsonl") if run_id in p.read_text()[:2000]]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no record for run {run_id} under {root}")
