"""Snapshot roots: the two shipped mappings, backfilled into real SQLite MLflow stores.

Each run is read back with MlflowClient and checked field by field, then the
snapshot is rewritten in place, a later stage resumes the run by mlflow_run_id, a
mapping mistake is reported while the rest lands, and `syncd run` picks up a change.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_helpers import SyncdProcess, run_syncd, wait_for
from helpers import REPO, artifact_files, history

from syncd.backfill import Summary, backfill
from syncd.config import load_config

MAPPINGS = REPO / "examples" / "mappings"
SNAPSHOTS = REPO / "examples" / "snapshots"
TRAINING = SNAPSHOTS / "training_runs" / "2025-11-20_clicks_daily"
STAGE = SNAPSHOTS / "stages" / "2025-11-20_seasonal_fit"


def sync(root: Path | str, mapping: Path, tracking_uri: str, workdir: Path, **kw: Any) -> Summary:
    settings = load_config(
        None,
        overrides={
            "roots": [{"path": str(root), "format": "snapshot", "mapping": str(mapping)}],
            "tracking_uri": tracking_uri,
            "state_dir": str(workdir / ".syncd"),
        },
        env={},
    )
    return backfill(settings, **kw)


def only_run(client: Any, experiment: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def download(client: Any, run_id: str, path: str, dest: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(dest))).read_bytes()


def forecast_stage(root: Path, fit: Path, run_id: str) -> Path:
    """A later stage's run directory continuing ``run_id`` (mapping (b)'s resume)."""
    forecast = root / "2025-11-21_seasonal_forecast"
    forecast.mkdir()
    meta = yaml.safe_load((fit / "metadata.yaml").read_text())
    meta.update(stage="forecast", mlflow_run_id=run_id, status="FINISHED")
    (forecast / "metadata.yaml").write_text(yaml.safe_dump(meta))
    config = yaml.safe_load((fit / "config_resolved.yaml").read_text())
    config["seed"] = 99
    (forecast / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    return forecast


def user_tags(run: Any) -> dict[str, str]:
    return {k: v for k, v in run.data.tags.items() if not k.startswith(("mlflow.", "syncd."))}


def test_training_run_record_mirrors_and_follows_a_rewrite_in_place(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    root = workdir / "training_runs"
    run_dir = root / TRAINING.name
    shutil.copytree(TRAINING, run_dir)
    record = run_dir / "training_run.json"
    # The pipeline first writes the record without what it learns at the end.
    first = json.loads(record.read_text())
    final = dict(first)
    for late in ("total_rows", "model"):
        del first[late]
    record.write_text(json.dumps(first, indent=2))

    summary = sync(root, MAPPINGS / "training_run.yaml", tracking_uri, workdir)
    assert summary.clean and summary.synced == 1, summary.errors
    run = only_run(client, "feature_pipelines")
    assert run.info.run_name == "clicks_features-trr-20251120-clicks-0007"
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "runtime_config_path": "configs/runtime/prod.yaml",
        "aggregation_config_path": "configs/aggregation/daily.yaml",
        "feed_start": "2025-11-01",
        "feed_end": "2025-11-19",
        "output_root": "s3://features/clicks/2025-11-20/",
        "run_record_id": "trr-20251120-clicks-0007",
        "run_record_path": first["run_record_path"],
    }
    assert user_tags(run) == {
        "pipeline.feature_service_at_version": "clicks_features@v3",
        "pipeline.git_sha": "3e1f9ab4c2d84b1f9e0a7c6d5b4a3f2e1d0c9b8a",
    }
    assert run.data.tags["syncd.record_id"] == "trr-20251120-clicks-0007"
    assert run.data.metrics == {}
    assert artifact_files(client, run.info.run_id) == ["training_run.json"]

    # Unchanged: nothing is written again.
    again = sync(root, MAPPINGS / "training_run.yaml", tracking_uri, workdir)
    assert again.clean and again.events == 0

    # Rewritten in place: the late fields arrive, and the output root is moved.
    final["output_root"] = "s3://features/clicks/2025-11-20-rerun/"
    record.write_text(json.dumps(final, indent=2))
    summary = sync(root, MAPPINGS / "training_run.yaml", tracking_uri, workdir)
    run = only_run(client, "feature_pipelines")
    assert [h[2] for h in history(client, run.info.run_id, "pipeline.total_rows")] == [1834551]
    assert run.data.tags["pipeline.model_name"] == "ctr_ranker"
    assert run.data.tags["pipeline.model_version"] == "17"
    # The param keeps its first value; the new one is a tag, and the change is reported.
    assert run.data.params["output_root"] == "s3://features/clicks/2025-11-20/"
    assert run.data.tags["changed.output_root"] == "s3://features/clicks/2025-11-20-rerun/"
    assert [(e["file"], e["reason"]) for e in summary.errors] == [
        (
            str(record),
            "field 'record.output_root': param 'output_root' changed from"
            " 's3://features/clicks/2025-11-20/' to 's3://features/clicks/2025-11-20-rerun/'"
            " after it was mirrored (params are write-once); the new value goes to the tag"
            " changed.output_root (mapping entry params.fields.output_root)",
        )
    ]
    assert download(client, run.info.run_id, "training_run.json", workdir / "dl") == (
        record.read_bytes()
    )
    assert run.info.status == "FINISHED"


def test_stage_directories_mirror_and_a_later_stage_resumes_the_run(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    root = workdir / "stages"
    fit = root / STAGE.name
    shutil.copytree(STAGE, fit)
    summary = sync(root, MAPPINGS / "stage_dir.yaml", tracking_uri, workdir)
    assert summary.clean, summary.errors
    run = only_run(client, "seasonal_forecast")
    run_id = run.info.run_id
    assert run.info.run_name == "seasonal-baseline-2025-11-20"
    assert run.data.params == {
        "fit/random_seed": "1234",
        "fit/data_root": "/data/era5",
        "fit/start_year": "1993",
        "fit/end_year": "2016",
        "fit/experiment_name": "seasonal_forecast",
        "fit/experiment_key": "sf-2025",
        "fit/model_kind": "ridge",
        "fit/detrend": "true",
        "fit/use_enso": "true",
    }
    assert user_tags(run) == {
        "stage": "fit",
        "run_dir": str(fit),
        "config_path": f"{fit}/config_resolved.yaml",
        "git_commit": "9c2e41d7a0b3f58e6c1d2b4a7e9f0c3d5b8a1e26",
        "git_short": "9c2e41d",
        "git_dirty": "false",
        "python_version": "3.11.9",
        "platform": "Linux-6.5.0-x86_64-with-glibc2.35",
        "package.numpy": "1.26.4",
        "package.xarray": "2024.6.0",
        "package.scikit-learn": "1.5.0",
    }
    assert artifact_files(client, run_id) == [
        "config_resolved.yaml",
        "datasets/era5_t2m/spec.json",
        "datasets/train_index.csv",
        "metadata.yaml",
        "reports/folds/0/skill_map.png",
        "reports/folds/1/skill_map.png",
    ]
    dl = workdir / "dl"
    assert download(client, run_id, "config_resolved.yaml", dl) == (
        (fit / "config_resolved.yaml").read_bytes()
    )
    assert download(client, run_id, "reports/folds/1/skill_map.png", dl) == (
        (fit / "reports/folds/1/skill_map.png").read_bytes()
    )
    assert run.info.status == "RUNNING"

    # A later stage runs in its own directory and continues the same MLflow run.
    forecast = forecast_stage(root, fit, run_id)
    (forecast / "reports" / "folds" / "2").mkdir(parents=True)
    (forecast / "reports" / "folds" / "2" / "skill_map.png").write_bytes(b"\x89PNG fold 2")

    summary = sync(root, MAPPINGS / "stage_dir.yaml", tracking_uri, workdir)
    assert summary.clean, summary.errors
    run = only_run(client, "seasonal_forecast")  # still one run
    assert run.info.run_id == run_id
    assert run.data.params["fit/random_seed"] == "1234"
    assert run.data.params["forecast/random_seed"] == "99"
    assert len(run.data.params) == 18
    assert run.data.tags["stage"] == "forecast"
    assert run.data.tags["run_dir"] == str(forecast)
    # the run keeps the identity of the record that created it
    assert run.data.tags["syncd.record_id"] == "sf-2025-seasonal-baseline-2025-11-20-fit"
    assert run.info.status == "FINISHED"
    assert "reports/folds/2/skill_map.png" in artifact_files(client, run_id)
    # The stage's metadata.yaml replaced the fit's at the root (the last stage wins).
    assert download(client, run_id, "metadata.yaml", workdir / "dl2") == (
        (forecast / "metadata.yaml").read_bytes()
    )


def test_resume_of_a_run_that_does_not_exist_fails_that_record_only(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    root = workdir / "stages"
    shutil.copytree(STAGE, root / STAGE.name)
    other = root / "resumed"
    shutil.copytree(STAGE, other)
    meta = yaml.safe_load((other / "metadata.yaml").read_text())
    meta.update(stage="forecast", mlflow_run_id="0123456789abcdef0123456789abcdef")
    (other / "metadata.yaml").write_text(yaml.safe_dump(meta))
    summary = sync(root, MAPPINGS / "stage_dir.yaml", tracking_uri, workdir)
    assert summary.failed == 1 and summary.synced == 1
    assert any(
        "mlflow_run_id 0123456789abcdef0123456789abcdef: no such run" in e["reason"]
        for e in summary.errors
    )
    assert only_run(client, "seasonal_forecast").data.tags["stage"] == "fit"


def test_mapping_mistakes_are_named_and_the_rest_lands(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    root = workdir / "runs"
    run_dir = root / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(
        json.dumps({"id": "rec-a", "lr": 0.1, "rows": "many", "git": {"sha": "abc"}})
    )
    mapping = workdir / "mapping.yaml"
    mapping.write_text(
        yaml.safe_dump(
            {
                "files": {"run": "run.json"},
                "record_id": "{run.id}",
                "experiment": "mistakes",
                "params": {"fields": {"lr": "{run.lr}", "depth": "{run.depth}"}},
                "tags": {"sha": "{run.git.sha}", "branch": "{run.git.branch}"},
                "metrics": {"rows": "{run.rows}"},
                "artifacts": [{"path": "report.html"}],
            }
        )
    )
    summary = sync(root, mapping, tracking_uri, workdir)
    assert summary.with_errors == 1
    record = str(run_dir / "run.json")
    assert sorted((e["file"], e["reason"]) for e in summary.errors) == [
        (
            f"{run_dir}/report.html",
            "field 'report.html': matches no file in the run directory"
            " (mapping entry artifacts[0])",
        ),
        (record, "field 'run.depth': missing (mapping entry params.fields.depth)"),
        (record, "field 'run.git.branch': missing (mapping entry tags.branch)"),
        (
            record,
            "field 'run.rows': is a string ('many'), not a number (mapping entry metrics.rows)",
        ),
    ]
    run = only_run(client, "mistakes")
    assert run.data.params == {"lr": "0.1"}
    assert user_tags(run) == {"sha": "abc"}

    # `syncd status` shows them with the file.
    status = run_syncd("status", "--state-dir", str(workdir / ".syncd"), cwd=workdir)
    assert "run.depth" in status.stdout and record in status.stdout

    # Reported once: an unchanged pass reports nothing new.
    assert sync(root, mapping, tracking_uri, workdir).errors == []


def test_check_mapping_prints_events_and_writes_nothing(tmp_path: Path) -> None:
    result = run_syncd("check-mapping", str(MAPPINGS / "stage_dir.yaml"), str(STAGE), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert events[0] == {
        "type": "run_started",
        "record_id": "sf-2025-seasonal-baseline-2025-11-20-fit",
        "experiment": "seasonal_forecast",
        "run_name": "seasonal-baseline-2025-11-20",
    }
    assert events[1]["params"]["fit/random_seed"] == "1234"
    assert [e["path"] for e in events if e["type"] == "artifact"][:2] == [
        "config_resolved.yaml",
        "metadata.yaml",
    ]
    assert list(tmp_path.iterdir()) == []  # no ledger, no store, no derived record

    broken = tmp_path / "broken.yaml"
    broken.write_text("files: {meta: metadata.yaml}\ntags: {sha: '{config.sha}'}\n")
    result = run_syncd("check-mapping", str(broken), str(STAGE), cwd=tmp_path)
    assert result.returncode == 2
    assert f"mapping {broken}: tags.sha: {{config.sha}} names no file" in result.stderr

    missing = tmp_path / "missing.yaml"
    missing.write_text("files: {meta: metadata.yaml}\ntags: {owner: '{meta.owner}'}\n")
    result = run_syncd("check-mapping", str(missing), str(STAGE), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{STAGE}/metadata.yaml: field 'meta.owner': missing (mapping entry tags.owner)"
    )


@pytest.mark.slow
def test_daemon_picks_up_a_changed_snapshot(workdir: Path, tracking_uri: str, client: Any) -> None:
    root = workdir / "stages"
    fit = root / STAGE.name
    shutil.copytree(STAGE, fit)
    daemon = SyncdProcess(
        workdir,
        str(root),
        "--mapping",
        str(MAPPINGS / "stage_dir.yaml"),
        "--tracking-uri",
        tracking_uri,
        "--state-dir",
        str(workdir / ".syncd"),
    )
    try:
        daemon.wait_ready()

        def mirrored() -> Any:
            exp = client.get_experiment_by_name("seasonal_forecast")
            run = exp and only_run(client, "seasonal_forecast")
            return run if run and "git_dirty" in run.data.tags else None

        # the run is created first, its tags written next: wait for both
        run = wait_for(mirrored, 60, 0.2, "the fit run with its tags")
        assert run.data.tags["git_dirty"] == "false"
        # The stage marks the tree dirty and finishes: metadata.yaml rewritten in place.
        meta = yaml.safe_load((fit / "metadata.yaml").read_text())
        meta.update(git_dirty=True, status="FINISHED")
        (fit / "metadata.yaml").write_text(yaml.safe_dump(meta))
        # A fold report written later, in a folder of its own.
        (fit / "reports" / "folds" / "2").mkdir()
        (fit / "reports" / "folds" / "2" / "skill_map.png").write_bytes(b"\x89PNG 2")

        def updated() -> bool:
            run = only_run(client, "seasonal_forecast")
            return (
                run.data.tags["git_dirty"] == "true"
                and run.info.status == "FINISHED"
                and "reports/folds/2/skill_map.png" in artifact_files(client, run.info.run_id)
            )

        wait_for(updated, 60, 0.2, "the change mirrored")
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.logs()


def test_stage_directory_on_an_s3_root(
    workdir: Path, tracking_uri: str, client: Any, bucket: Any
) -> None:
    for path in sorted(STAGE.rglob("*")):
        if path.is_file():
            bucket.put(f"stages/fit/{path.relative_to(STAGE).as_posix()}", path.read_bytes())
    summary = sync(bucket.uri("stages"), MAPPINGS / "stage_dir.yaml", tracking_uri, workdir)
    assert summary.clean and summary.synced == 1, summary.errors
    run = only_run(client, "seasonal_forecast")
    assert run.data.params["fit/random_seed"] == "1234"
    assert run.data.tags["run_dir"] == bucket.uri("stages/fit")
    assert run.data.tags["syncd.source"] == bucket.uri("stages/fit/metadata.yaml")
    assert artifact_files(client, run.info.run_id) == [
        "config_resolved.yaml",
        "datasets/era5_t2m/spec.json",
        "datasets/train_index.csv",
        "metadata.yaml",
        "reports/folds/0/skill_map.png",
        "reports/folds/1/skill_map.png",
    ]
    assert download(client, run.info.run_id, "metadata.yaml", workdir / "dl") == (
        (STAGE / "metadata.yaml").read_bytes()
    )
    # Rewritten in place on S3: the new tag value is mirrored into the same run.
    meta = yaml.safe_load((STAGE / "metadata.yaml").read_text())
    meta["git_dirty"] = True
    bucket.put("stages/fit/metadata.yaml", yaml.safe_dump(meta))
    assert sync(bucket.uri("stages"), MAPPINGS / "stage_dir.yaml", tracking_uri, workdir).clean
    run = only_run(client, "seasonal_forecast")
    assert run.data.tags["git_dirty"] == "true"


def test_unchanged_run_directories_are_not_translated_again(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    from syncd.snapshot.derived import DerivedRecord

    root = workdir / "stages"
    for name in ("a", "b"):
        shutil.copytree(STAGE, root / name)
        meta = yaml.safe_load((root / name / "metadata.yaml").read_text())
        meta["run_name"] = f"fit-{name}"
        (root / name / "metadata.yaml").write_text(yaml.safe_dump(meta))
    mapping = MAPPINGS / "stage_dir.yaml"
    assert sync(root, mapping, tracking_uri, workdir).synced == 2
    derived = sorted((workdir / ".syncd" / "derived").glob("*/run_record.jsonl"))
    assert len(derived) == 2

    def stats() -> list[tuple[int, int]]:
        return [(p.stat().st_size, p.stat().st_mtime_ns) for p in derived]

    before = stats()
    translated = DerivedRecord.translations
    summary = sync(root, mapping, tracking_uri, workdir)  # nothing changed
    assert summary.clean and summary.unchanged == 2 and summary.events == 0, summary.errors
    assert DerivedRecord.translations == translated  # no run directory read again
    assert stats() == before

    meta = yaml.safe_load((root / "b" / "metadata.yaml").read_text())
    meta["git_dirty"] = True
    (root / "b" / "metadata.yaml").write_text(yaml.safe_dump(meta))
    summary = sync(root, mapping, tracking_uri, workdir)
    assert summary.clean and summary.unchanged == 1 and summary.events > 0, summary.errors
    assert DerivedRecord.translations == translated + 1  # only the changed one
    after = stats()
    assert sorted(after) != sorted(before) and len(set(after) & set(before)) == 1
    exp = client.get_experiment_by_name("seasonal_forecast")
    dirty = {
        r.info.run_name: r.data.tags["git_dirty"] for r in client.search_runs([exp.experiment_id])
    }
    assert dirty == {"fit-a": "false", "fit-b": "true"}


def verify_json(root: Path, mapping: Path, tracking_uri: str, workdir: Path) -> Any:
    result = run_syncd(
        "verify",
        str(root),
        "--mapping",
        str(mapping),
        "--tracking-uri",
        tracking_uri,
        "--state-dir",
        str(workdir / ".syncd"),
        "--json",
        cwd=workdir,
    )
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_verify_compares_a_resumed_run_with_every_stage_that_wrote_into_it(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    root = workdir / "stages"
    fit = root / STAGE.name
    shutil.copytree(STAGE, fit)
    mapping = MAPPINGS / "stage_dir.yaml"
    assert sync(root, mapping, tracking_uri, workdir).clean
    run_id = only_run(client, "seasonal_forecast").info.run_id
    # the shipped mapping's resume: a later stage names the run in metadata.yaml
    forecast_stage(root, fit, run_id)
    assert sync(root, mapping, tracking_uri, workdir).clean

    doc = verify_json(root, mapping, tracking_uri, workdir)
    assert (doc["records"], doc["clean"], doc["differences"]) == (2, 2, 0), doc["results"]

    # a change in MLflow to what the later stage wrote is found, on the run
    client.set_tag(run_id, "stage", "fit")
    client.log_param(run_id, "extra", "1")
    doc = verify_json(root, mapping, tracking_uri, workdir)
    (result,) = doc["results"]
    assert result["run_id"] == run_id
    assert {(d["kind"], d["key"], d["expected"], d["found"]) for d in result["differences"]} == {
        ("tag", "stage", "'forecast'", "'fit'"),
        ("param", "extra", "none", "'1'"),
    }


@pytest.mark.slow
def test_verify_finds_a_run_continued_by_id_that_no_record_created(
    workdir: Path, tracking_uri: str, client: Any
) -> None:
    exp = client.create_experiment("seasonal_forecast")
    made = client.create_run(exp, run_name="made by hand")
    client.log_param(made.info.run_id, "by_hand", "yes")
    root = workdir / "stages"
    forecast = root / "forecast"
    shutil.copytree(STAGE, forecast)
    meta = yaml.safe_load((forecast / "metadata.yaml").read_text())
    meta.update(stage="forecast", mlflow_run_id=made.info.run_id)
    (forecast / "metadata.yaml").write_text(yaml.safe_dump(meta))
    mapping = MAPPINGS / "stage_dir.yaml"
    assert sync(root, mapping, tracking_uri, workdir).clean

    doc = verify_json(root, mapping, tracking_uri, workdir)
    assert (doc["records"], doc["clean"], doc["differences"]) == (1, 1, 0), doc["results"]

    client.delete_tag(made.info.run_id, "git_commit")
    doc = verify_json(root, mapping, tracking_uri, workdir)
    (result,) = doc["results"]
    assert result["run_id"] == made.info.run_id
    assert [(d["kind"], d["key"]) for d in result["differences"]] == [("tag", "git_commit")]

    # a run id MLflow does not know: the record fails to sync, verify names the run missing
    lost = root / "lost"
    shutil.copytree(STAGE, lost)
    meta.update(run_name="lost", mlflow_run_id="0" * 32)
    (lost / "metadata.yaml").write_text(yaml.safe_dump(meta))
    assert not sync(root, mapping, tracking_uri, workdir).clean
    doc = verify_json(root, mapping, tracking_uri, workdir)
    by_file = {r["file"]: r for r in doc["results"]}
    missing = by_file[str(lost / "metadata.yaml")]["differences"]
    assert ("run_missing", f"run {'0' * 32} (mlflow_run_id)") in {
        (d["kind"], d["expected"]) for d in missing
    }
