"""Models through MLFLOW_TRACKING_URI=syncd: and RunRecorder.log_model, mirrored by backfill.

``mlflow.sklearn.log_model`` and ``mlflow.sklearn.autolog()`` run unchanged in a
subprocess; backfill mirrors the records into a real SQLite store, where the
LoggedModel, its files (loaded with ``mlflow.sklearn.load_model``), the
registered version and its alias are read back with MlflowClient.
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
from helpers import run_backfill
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from syncd.cli import app

# Requirement inference loads the model in a child interpreter: seconds the tests do not need.
FAST_ENV = {"MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT": "1"}

LOG_MODEL = textwrap.dedent(
    """
    import json
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.1, 0.7]])
    y = np.array([0, 1, 1, 0, 1, 0])
    mlflow.set_experiment("models")
    with mlflow.start_run(run_name="fit") as run:
        model = LogisticRegression(C=0.5).fit(X, y)
        mlflow.log_param("C", 0.5)
        mlflow.log_metric("acc", model.score(X, y), step=1)
        info = mlflow.sklearn.log_model(
            model, name="clf", registered_model_name="ranker", pip_requirements=["scikit-learn"]
        )
    print(json.dumps({
        "run": run.info.run_id,
        "model": info.model_id,
        "proba": model.predict_proba(X).tolist(),
    }))
    """
)

AUTOLOG = textwrap.dedent(
    """
    import json
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.1, 0.7]])
    y = np.array([0, 1, 1, 0, 1, 0])
    mlflow.set_experiment("auto")
    for log_models in (False, True):
        mlflow.sklearn.autolog(log_models=log_models, log_datasets=False)
        with mlflow.start_run(run_name=f"log_models={log_models}"):
            LogisticRegression(C=0.5).fit(X, y)
    print(json.dumps({}))
    """
)

LINKED_METRICS = textwrap.dedent(
    """
    import json
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])
    mlflow.set_experiment("linked")
    with mlflow.start_run(run_name="fit"):
        for step in range(3):
            mlflow.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 4}, step=step)
        mlflow.log_metric("auc", 0.75)
        info = mlflow.sklearn.log_model(
            LogisticRegression().fit(X, y), name="clf", pip_requirements=["scikit-learn"]
        )
        mlflow.log_metric("late", 1.0)  # the model is active now: linked to it as well
        mlflow.log_metric("late", 2.0, step=5)
    print(json.dumps({"model": info.model_id}))
    """
)

NOISE_TAGS = {"mlflow.source.git.commit", "mlflow.source.git.branch", "mlflow.source.name"}


def start_script(cwd: Path, tracking_uri: str, script: str) -> subprocess.Popen[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, **FAST_ENV)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_script(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_script(cwd: Path, tracking_uri: str, script: str) -> dict[str, Any]:
    return finish_script(start_script(cwd, tracking_uri, script))


@pytest.fixture
def stores(workdir: Path, mlflow_template: Path) -> tuple[str, str]:
    uris = []
    for name in ("direct.db", "mirrored.db"):
        shutil.copy(mlflow_template, workdir / name)
        uris.append(f"sqlite:///{workdir / name}")
    return uris[0], uris[1]


def models_of(client: MlflowClient, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_logged_models([exp.experiment_id]))


def versions_of(client: MlflowClient, name: str) -> list[Any]:
    return list(client.search_model_versions(f"name = '{name}'"))


def load_and_predict(tracking_uri: str, model_uri: str, rows: list[list[float]]) -> list[Any]:
    """Load the model through the mirror's tracking URI, as a user of the mirror would."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        result: list[Any] = mlflow.sklearn.load_model(model_uri).predict_proba(rows).tolist()
    finally:
        mlflow.set_tracking_uri(previous)
    return result


@pytest.mark.slow
def test_sklearn_log_model_is_mirrored_with_its_files_and_registered_version(
    workdir: Path, stores: tuple[str, str]
) -> None:
    _, mirrored_uri = stores
    root = workdir / "runs"
    printed = run_script(workdir / "train", f"syncd://{root}", LOG_MODEL)

    summary = run_backfill(root, mirrored_uri, workdir / ".syncd")
    assert (summary.records, summary.with_errors, summary.failed) == (1, 0, 0), summary.errors

    mirror = MlflowClient(mirrored_uri)
    (model,) = models_of(mirror, "models")
    (run,) = mirror.search_runs([model.experiment_id])
    assert run.data.tags["syncd.record_id"] == printed["run"]
    assert model.name == "clf" and model.status.value == "READY"
    assert model.source_run_id == run.info.run_id
    assert model.tags["syncd.model_id"] == printed["model"]
    assert model.params["C"] == "0.5"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]

    rows = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.1, 0.7]]
    assert load_and_predict(mirrored_uri, f"models:/{model.model_id}", rows) == printed["proba"]

    (version,) = versions_of(mirror, "ranker")
    assert version.source == f"models:/{model.model_id}" and version.run_id == run.info.run_id
    assert json.loads(mirror.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "ranker", "version": int(version.version)}
    ]

    # replays: a backfill from scratch and a resync find the model and the version again
    summary = run_backfill(root, mirrored_uri, workdir / ".syncd-again")
    assert (summary.with_errors, summary.failed) == (0, 0), summary.errors
    (record,) = root.glob("*/*/run_record.jsonl")
    result = CliRunner().invoke(
        app,
        [
            "resync",
            str(record),
            "--tracking-uri",
            mirrored_uri,
            "--state-dir",
            str(workdir / ".syncd"),
        ],
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    assert [m.model_id for m in models_of(mirror, "models")] == [model.model_id]
    assert [v.version for v in versions_of(mirror, "ranker")] == [version.version]
    assert len(mirror.search_runs([model.experiment_id])) == 1
    assert len(mirror.get_run(run.info.run_id).outputs.model_outputs) == 1
    # verify finds the model, its status and its registered version as the record asks
    verified = CliRunner().invoke(
        app, ["verify", str(root), "--tracking-uri", mirrored_uri, "--json"]
    )
    assert verified.exit_code == 0, verified.stdout
    assert json.loads(verified.stdout)["differences"] == 0


def test_run_recorder_log_model_registers_a_version_with_an_alias(
    workdir: Path, tracking_uri: str
) -> None:
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from syncd import RunRecorder

    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])
    fitted = LogisticRegression().fit(X, y)
    root = workdir / "runs"
    with RunRecorder(root / "fit", experiment="recorded", run_name="fit") as rec:
        mlflow.sklearn.save_model(fitted, rec.run_dir / "model", pip_requirements=[])
        model_id = rec.log_model("model", "clf", registered_model_name="scorer", alias="champion")
    assert rec.path.read_text().count('"type":"model"') == 1

    for state in (".syncd", ".syncd-again"):  # the second pass replays from the start
        summary = run_backfill(root, tracking_uri, workdir / state)
        assert (summary.with_errors, summary.failed) == (0, 0), summary.errors

    mirror = MlflowClient(tracking_uri)
    (model,) = models_of(mirror, "recorded")
    assert model.tags["syncd.model_id"] == model_id and model.status.value == "READY"
    (version,) = versions_of(mirror, "scorer")
    assert mirror.get_model_version_by_alias("scorer", "champion").version == version.version
    loaded = mlflow.sklearn.load_model(model.artifact_location)
    assert loaded.predict_proba(X).tolist() == fitted.predict_proba(X).tolist()


@pytest.mark.slow
def test_sklearn_autolog_through_syncd_mirrors_what_direct_autolog_stores(
    workdir: Path, stores: tuple[str, str]
) -> None:
    direct_uri, mirrored_uri = stores
    root = workdir / "runs"
    procs = [  # side by side: each spends most of its time importing
        start_script(workdir / "direct", direct_uri, AUTOLOG),
        start_script(workdir / "through", f"syncd://{root}", AUTOLOG),
    ]
    for proc in procs:
        finish_script(proc)
    summary = run_backfill(root, mirrored_uri, workdir / ".syncd")
    assert (summary.records, summary.with_errors, summary.failed) == (2, 0, 0), summary.errors

    def view(uri: str) -> dict[str, Any]:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("auto")
        out: dict[str, Any] = {}
        for run in client.search_runs([exp.experiment_id]):
            models = [m for m in models_of(client, "auto") if m.source_run_id == run.info.run_id]
            out[run.info.run_name] = {
                "params": run.data.params,
                "metrics": {
                    k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                    for k in run.data.metrics
                },
                "tags": {
                    k: v
                    for k, v in run.data.tags.items()
                    if not k.startswith("syncd.") and k not in NOISE_TAGS
                },
                "models": sorted((m.name, m.status.value, m.model_type) for m in models),
                "model_params": [m.params for m in models],
            }
        return out

    direct, mirrored = view(direct_uri), view(mirrored_uri)
    assert sorted(mirrored) == ["log_models=False", "log_models=True"]
    assert mirrored == direct
    assert mirrored["log_models=True"]["models"] == [("model", "READY", None)]
    assert mirrored["log_models=False"]["models"] == []
    assert "training_accuracy_score" in mirrored["log_models=True"]["metrics"]


def test_a_model_left_pending_by_a_crash_is_completed_not_duplicated(
    workdir: Path, tracking_uri: str
) -> None:
    """The sink died after creating the LoggedModel, before its files: the next pass ends it."""
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from syncd import RunRecorder

    fitted = LogisticRegression().fit(np.array([[0.0], [1.0]]), np.array([0, 1]))
    root = workdir / "runs"
    with RunRecorder(root / "fit", experiment="crash", run_name="fit") as rec:
        mlflow.sklearn.save_model(fitted, rec.run_dir / "model", pip_requirements=[])
        model_id = rec.log_model("model", "clf")
    run_started = rec.path.read_text().splitlines()[0]
    # what the interrupted pass left: the run (adopted by its tag) and a PENDING model
    mirror = MlflowClient(tracking_uri)
    exp_id = mirror.create_experiment("crash")
    run = mirror.create_run(exp_id, tags={"syncd.record_id": json.loads(run_started)["record_id"]})
    pending = mirror.create_logged_model(
        exp_id, name="clf", source_run_id=run.info.run_id, tags={"syncd.model_id": model_id}
    )

    summary = run_backfill(root, tracking_uri, workdir / ".syncd")
    assert (summary.with_errors, summary.failed) == (0, 0), summary.errors
    (model,) = models_of(mirror, "crash")
    assert model.model_id == pending.model_id and model.status.value == "READY"
    assert mirror.search_runs([exp_id])[0].info.run_id == run.info.run_id
    assert mlflow.sklearn.load_model(model.artifact_location).predict([[1.0]]).tolist() == [1]


@pytest.mark.slow
def test_metrics_linked_to_a_logged_model_match_direct_logging(
    workdir: Path, stores: tuple[str, str]
) -> None:
    direct_uri, mirrored_uri = stores
    direct = run_script(workdir / "direct", direct_uri, LINKED_METRICS)
    root = workdir / "runs"
    printed = run_script(workdir / "train", f"syncd://{root}", LINKED_METRICS)
    for state in (".syncd", ".syncd-again"):  # the second pass replays from the start
        summary = run_backfill(root, mirrored_uri, workdir / state)
        assert (summary.with_errors, summary.failed) == (0, 0), summary.errors

    def linked(client: MlflowClient, model_id: str) -> list[tuple[str, float, int]]:
        return sorted((m.key, m.value, m.step) for m in client.get_logged_model(model_id).metrics)

    want = linked(MlflowClient(direct_uri), direct["model"])
    # the points of the model's step logged before it, and those logged while it is active
    assert {("acc", 0.0, 0), ("auc", 0.75, 0), ("loss", 1.0, 0), ("late", 1.0, 0)} <= set(want)
    mirror = MlflowClient(mirrored_uri)
    (model,) = models_of(mirror, "linked")
    assert linked(mirror, model.model_id) == want
    (run,) = mirror.search_runs([model.experiment_id])
    assert all(m.run_id == run.info.run_id for m in mirror.get_logged_model(model.model_id).metrics)
    assert len(mirror.get_metric_history(run.info.run_id, "loss")) == 3  # no point twice
    assert len(mirror.get_metric_history(run.info.run_id, "late")) == 2
    (record,) = root.glob("*/*/run_record.jsonl")
    assert record.read_text().count('"model_id":"' + printed["model"] + '"') >= 2
