"""Unchanged MLflow code through MLFLOW_TRACKING_URI=syncd:s3://bucket/prefix.

Training scripts run in subprocesses against moto's server (a real HTTP S3
endpoint); ``syncd backfill s3://...`` then mirrors what was uploaded into a
real SQLite store, compared with the same script logged straight into SQLite.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import artifact_files
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from moto_s3 import Bucket, free_port
from typer.testing import CliRunner

from syncd.cli import app

TRAIN = textwrap.dedent(
    """
    import json
    from pathlib import Path

    import mlflow

    mlflow.set_experiment("s3-sweep")
    Path("report.txt").write_text("a report\\n")
    with mlflow.start_run(run_name="parent", tags={"team": "ranking"}) as parent:
        mlflow.log_params({"lr": 0.01, "optimizer": "adam"})
        for step in range(20):
            mlflow.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        mlflow.set_tags({"phase": "train"})
        mlflow.log_artifact("report.txt", artifact_path="reports")
        with mlflow.start_run(run_name="child", nested=True):
            mlflow.log_param("trial", 1)
            mlflow.log_metric("score", 0.5, step=1)
    print(json.dumps({"parent": parent.info.run_id}))
    """
)

NOISE_TAGS = {"mlflow.parentRunId", "mlflow.source.git.commit", "mlflow.source.git.branch"}


def run_script(
    cwd: Path, env: dict[str, str], script: str = TRAIN
) -> tuple[dict[str, Any], float, str]:
    cwd.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    took = time.monotonic() - began
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), took, out.stderr


def by_name(client: MlflowClient, experiment: str) -> dict[str, Any]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    names = {r.info.run_id: r.info.run_name for r in runs}
    return {
        run.info.run_name: {
            "status": run.info.status,
            "params": dict(run.data.params),
            "tags": {
                k: v
                for k, v in run.data.tags.items()
                if not k.startswith("syncd.") and k not in NOISE_TAGS
            },
            "parent": names.get(run.data.tags.get("mlflow.parentRunId", "")),
            "metrics": {
                key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                for key in run.data.metrics
            },
            "artifacts": {
                path: Path(client.download_artifacts(run.info.run_id, path)).read_bytes()
                for path in artifact_files(client, run.info.run_id)
            },
        }
        for run in runs
    }


def backfill_cli(root_uri: str, tracking_uri: str, state_dir: Path) -> dict[str, Any]:
    result = CliRunner().invoke(
        app,
        ["backfill", root_uri, "--tracking-uri", tracking_uri, "--state-dir", str(state_dir)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    return {"out": result.stdout}


@pytest.fixture
def stores(workdir: Path, mlflow_template: Path) -> tuple[str, str]:
    uris = []
    for name in ("direct.db", "mirrored.db"):
        shutil.copy(mlflow_template, workdir / name)
        uris.append(f"sqlite:///{workdir / name}")
    return uris[0], uris[1]


def test_training_through_syncd_s3_is_mirrored_by_backfill(
    bucket: Bucket, workdir: Path, stores: tuple[str, str]
) -> None:
    direct_uri, mirrored_uri = stores
    run_script(workdir / "direct", {"MLFLOW_TRACKING_URI": direct_uri})
    spool = workdir / "spool"
    env = {
        "MLFLOW_TRACKING_URI": f"syncd:s3://{bucket.name}/runs",
        "SYNCD_SPOOL_DIR": str(spool),
    }
    printed, _, _ = run_script(workdir / "through", env)

    keys = sorted(o["Key"] for o in bucket.client.list_objects_v2(Bucket=bucket.name)["Contents"])
    assert "runs/experiments.json" in keys
    assert sum(k.endswith("/run_record.jsonl") for k in keys) == 2
    assert any(k.endswith("/artifacts/reports/report.txt") for k in keys)
    # the spool mirrors the prefix, keyed by bucket and prefix
    assert (spool / bucket.name / "runs" / "experiments.json").is_file()

    backfill_cli(bucket.uri("runs"), mirrored_uri, workdir / ".syncd")
    direct = by_name(MlflowClient(direct_uri), "s3-sweep")
    mirrored = by_name(MlflowClient(mirrored_uri), "s3-sweep")
    assert sorted(mirrored) == ["child", "parent"]
    assert mirrored == direct
    assert mirrored["child"]["parent"] == "parent"
    assert mirrored["parent"]["artifacts"] == {"reports/report.txt": b"a report\n"}
    mirror = MlflowClient(mirrored_uri)
    exp_id = mirror.get_experiment_by_name("s3-sweep").experiment_id
    found = mirror.search_runs([exp_id], f"tags.`syncd.record_id` = '{printed['parent']}'")
    assert [r.info.run_name for r in found] == ["parent"]


@pytest.mark.slow
def test_s3_down_during_training_never_blocks_and_the_spool_sends_it_later(
    bucket: Bucket, workdir: Path, tracking_uri: str, s3_env: str
) -> None:
    spool = workdir / "spool"
    common = {
        "MLFLOW_TRACKING_URI": f"syncd:s3://{bucket.name}/later",
        "SYNCD_SPOOL_DIR": str(spool),
        "SYNCD_UPLOAD_TIMEOUT": "2",
    }
    # S3 refuses connections (nothing listens on the port) for the whole training run
    down = {**common, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    printed, took, stderr = run_script(workdir / "train", down)
    assert "the spool keeps them for the next upload" in stderr
    # two run ends and interpreter exit, each waiting at most 2 s, plus start-up
    assert took < 30
    assert "Contents" not in bucket.client.list_objects_v2(Bucket=bucket.name)
    records = list(spool.glob(f"{bucket.name}/later/*/*/run_record.jsonl"))
    assert len(records) == 2

    # any later process on the same spool with S3 back uploads what is pending
    touch = "import mlflow; mlflow.search_experiments()\nprint('{}')"
    run_script(workdir / "later", common, touch)
    keys = {o["Key"] for o in bucket.client.list_objects_v2(Bucket=bucket.name)["Contents"]}
    assert sum(k.endswith("/run_record.jsonl") for k in keys) == 2

    backfill_cli(bucket.uri("later"), tracking_uri, workdir / ".syncd")
    mirror = MlflowClient(tracking_uri)
    runs = by_name(mirror, "s3-sweep")
    assert sorted(runs) == ["child", "parent"]
    assert runs["parent"]["status"] == "FINISHED"
    assert len(runs["parent"]["metrics"]["loss"]) == 20
    assert runs["parent"]["artifacts"] == {"reports/report.txt": b"a report\n"}
    exp_id = mirror.get_experiment_by_name("s3-sweep").experiment_id
    found = mirror.search_runs([exp_id], f"tags.`syncd.record_id` = '{printed['parent']}'")
    assert len(found) == 1


def test_an_s3_that_never_answers_delays_each_run_end_only_by_the_timeout(
    bucket: Bucket, workdir: Path
) -> None:
    """Connections are accepted but never answered (S3 reads time out after 30 s)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        env = {
            "MLFLOW_TRACKING_URI": f"syncd:s3://{bucket.name}/silent",
            "SYNCD_SPOOL_DIR": str(workdir / "spool"),
            "SYNCD_UPLOAD_TIMEOUT": "1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
        }
        _, took, _ = run_script(workdir / "train", env)
    # two run ends and the exit wait 1 s each; one unbounded wait would take 30 s
    assert took < 25
    assert len(list((workdir / "spool").glob("*/silent/*/*/run_record.jsonl"))) == 2
