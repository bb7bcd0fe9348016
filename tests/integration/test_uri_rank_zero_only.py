"""SYNCD_RANK_ZERO_ONLY=1: only global rank 0 of a distributed job writes under a syncd: root.

The same unchanged MLflow script runs as rank 1 and as rank 0 in subprocesses;
rank 1 must succeed at every call and leave the root untouched, rank 0 must
write the record that backfill mirrors.
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
from helpers import run_backfill, runs_by_record
from mlflow.tracking import MlflowClient

TRAIN = textwrap.dedent(
    """
    import json
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])
    mlflow.set_experiment("ddp")
    with mlflow.start_run(run_name="train") as run:
        mlflow.log_params({"world_size": 2})
        for step in range(5):
            mlflow.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        mlflow.set_tag("phase", "fit")
        mlflow.log_text("notes", "notes.txt")
        with mlflow.start_run(run_name="child", nested=True):
            mlflow.log_metric("score", 0.5)
        info = mlflow.sklearn.log_model(
            LogisticRegression().fit(X, y), name="clf", pip_requirements=["scikit-learn"]
        )
    fetched = mlflow.get_run(run.info.run_id)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    print(json.dumps({
        "run": run.info.run_id,
        "status": fetched.info.status,
        "params": fetched.data.params,
        "points": len(history),
        "model": info.model_id,
    }))
    """
)


def run_rank(cwd: Path, root: Path, rank: str) -> dict[str, Any]:
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"syncd://{root}",
        SYNCD_RANK_ZERO_ONLY="1",
        RANK=rank,
        MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT="1",
    )
    out = subprocess.run(
        [sys.executable, "-c", TRAIN], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_only_rank_zero_writes_and_every_rank_runs_the_same_code(
    workdir: Path, mlflow_template: Path
) -> None:
    root = workdir / "runs"
    other = run_rank(workdir, root, "1")
    # every call answered as usual on rank 1 ...
    assert len(other["run"]) == 32
    assert other["status"] == "FINISHED"
    assert other["params"] == {"world_size": "2"}
    assert other["points"] == 5
    assert other["model"].startswith("m-")
    # ... and nothing reached the root
    assert not root.exists() or not any(root.iterdir())

    main = run_rank(workdir, root, "0")
    assert main["status"] == "FINISHED" and main["points"] == 5
    records = sorted(root.rglob("run_record.jsonl"))
    assert len(records) == 2  # the run and its nested child

    shutil.copy(mlflow_template, workdir / "mirror.db")
    mirror = f"sqlite:///{workdir / 'mirror.db'}"
    run_backfill(root, mirror)
    runs = runs_by_record(MlflowClient(mirror), ["ddp"])
    assert main["run"] in runs and other["run"] not in runs
    assert len(runs) == 2
    assert runs[main["run"]].data.params == {"world_size": "2"}


def test_rank_zero_only_rejects_a_value_it_does_not_understand(workdir: Path) -> None:
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"syncd://{workdir / 'runs'}",
        SYNCD_RANK_ZERO_ONLY="maybe",
    )
    out = subprocess.run(
        [sys.executable, "-c", "import mlflow; mlflow.set_experiment('x')"],
        cwd=workdir,
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "SYNCD_RANK_ZERO_ONLY" in out.stderr
    assert not (workdir / "runs").exists()
