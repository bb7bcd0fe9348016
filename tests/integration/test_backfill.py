"""syncd backfill against a real SQLite MLflow store, read back with MlflowClient."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    EXAMPLES,
    T0,
    artifact_files,
    history,
    line,
    run_backfill,
    runs_by_record,
    snapshot,
    started,
    write_record,
)

from syncd import RunRecorder
from syncd.projection import MAX_PARAM_VALUE_LENGTH
from syncd.record import events as events_module

PARENT = "b0d2adba54a74a478403056136136bb6"
TRIAL0 = "b52555198df843bfae7e47b1fe85290f"
DAILY = "7fbb36454f2d4f0a969dbf06737c751a"
OOM = "e981df925c7c483ea0f6301d00c06944"
RESUMED = "35cab4ef336940a9ba89df4dec80a07a"


@pytest.fixture
def examples(workdir: Path) -> Path:
    root = workdir / "runs"
    shutil.copytree(EXAMPLES, root)
    return root


def test_examples_mirror_as_if_logged_directly(examples: Path, tracking_uri: str, client) -> None:
    summary = run_backfill(examples, tracking_uri)
    assert summary.clean, summary.errors
    assert summary.records == 7 and summary.synced == 7

    runs = runs_by_record(client)
    assert len(runs) == 7
    parent, trial = runs[PARENT], runs[TRIAL0]
    # experiment, name, times and status straight from the record
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.name == "dssm_ranking"
    assert parent.info.run_name == "hparam-sweep"
    assert parent.info.start_time == T0
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.note.content"]
    # nested runs
    assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # params as strings, as MLflow stores them
    first_params = [
        json.loads(x)
        for x in (examples / "2025-11-22_dssm_sweep/trial_000/run_record.jsonl")
        .read_text()
        .splitlines()
        if json.loads(x)["type"] == "params"
    ]
    for event in first_params:
        for key, value in event["params"].items():
            assert trial.data.params[key] == str(value)
    # full metric history with steps and the record's timestamps
    record_points = []
    for raw in (
        (examples / "2025-11-22_dssm_sweep/trial_000/run_record.jsonl").read_text().splitlines()
    ):
        obj = json.loads(raw)
        if obj["type"] == "metrics" and "loss" in obj["metrics"]:
            record_points.append((obj.get("step", 0), obj["ts"], obj["metrics"]["loss"]))
    assert history(client, trial.info.run_id, "loss") == sorted(record_points)
    # artifacts: a file and a folder
    files = artifact_files(client, trial.info.run_id)
    assert "model_summary.txt" in files
    assert {"checkpoints/step_000010.json", "checkpoints/step_000020.json"} <= set(files)
    # failed run keeps its status and end time
    oom = runs[OOM]
    assert oom.info.status == "FAILED"
    assert oom.info.end_time is not None and oom.info.end_time > oom.info.start_time
    assert oom.data.tags["failure"] == "CUDA out of memory"
    # NaN metric point survives
    daily = runs[DAILY]
    grad = history(client, daily.info.run_id, "grad_norm")
    assert any(v != v for _, _, v in grad)
    # dataset inputs
    assert daily.inputs.dataset_inputs
    assert {d.dataset.name for d in daily.inputs.dataset_inputs}
    # resumed run: one run, finished, steps continuing
    resumed = runs[RESUMED]
    assert resumed.info.status == "FINISHED"
    steps = [s for s, _, _ in history(client, resumed.info.run_id, "loss")]
    assert steps == sorted(set(steps)) and len(steps) > 20


def test_replay_changes_nothing(examples: Path, tracking_uri: str, client, workdir: Path) -> None:
    run_backfill(examples, tracking_uri)
    before = snapshot(client)
    again = run_backfill(examples, tracking_uri)
    assert again.unchanged == 7 and again.events == 0
    # a forced full replay: a new ledger replays every event into the same runs
    shutil.rmtree(workdir / ".syncd")
    replay = run_backfill(examples, tracking_uri)
    assert replay.clean and replay.events > 0
    assert snapshot(client) == before


def test_lost_ledger_adopts_runs_instead_of_duplicating(
    examples: Path, tracking_uri: str, client, workdir: Path
) -> None:
    run_backfill(examples, tracking_uri)
    ids = {rid: run.info.run_id for rid, run in runs_by_record(client).items()}
    shutil.rmtree(workdir / ".syncd")
    run_backfill(examples, tracking_uri, state_dir=workdir / "other-state")
    assert {rid: run.info.run_id for rid, run in runs_by_record(client).items()} == ids


def test_appended_events_only_add(workdir: Path, tracking_uri: str, client) -> None:
    root = workdir / "runs"
    rec = RunRecorder(root / "r1", experiment="exp", run_name="live").start()
    rec.log_params({"lr": 0.1})
    for step in range(5):
        rec.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    run_backfill(root, tracking_uri)
    run = runs_by_record(client)[rec.record_id]
    assert run.info.status == "RUNNING"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 5

    for step in range(5, 8):
        rec.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    rec.finish()
    summary = run_backfill(root, tracking_uri)
    assert summary.events == 4  # three metrics and run_finished, nothing replayed
    run = runs_by_record(client)[rec.record_id]
    assert run.info.status == "FINISHED"
    assert [s for s, _, _ in history(client, run.info.run_id, "loss")] == list(range(8))
    assert run.data.params == {"lr": "0.1"}


def test_child_seen_before_parent_gets_linked(workdir: Path, tracking_uri: str, client) -> None:
    root = workdir / "runs"
    write_record(root / "a_child", [started("child1", parent_record_id="parent1")])
    run_backfill(root, tracking_uri)
    child = runs_by_record(client)["child1"]
    assert "mlflow.parentRunId" not in child.data.tags

    write_record(root / "b_parent", [started("parent1")])
    run_backfill(root, tracking_uri)
    runs = runs_by_record(client)
    assert runs["child1"].data.tags["mlflow.parentRunId"] == runs["parent1"].info.run_id


def test_an_unknown_event_type_holds_the_record_back_until_syncd_knows_it(
    workdir: Path, tracking_uri: str, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer writer's event type is never skipped: an older syncd holds the record
    back at that line (blocked, with the reason); once syncd knows the type (here: the
    "tags" type taken away, then given back, as an upgrade would) the rest lands."""
    root = workdir / "runs"
    path = write_record(
        root / "newer",
        [
            started("newer1"),
            line(1, "metrics", metrics={"loss": 0.5}, step=1),
            line(2, "tags", tags={"phase": "done"}),
            line(3, "metrics", metrics={"loss": 0.25}, step=2),
            line(4, "run_finished", status="FINISHED"),
        ],
    )
    older = dict(events_module._VALIDATORS)
    del older["tags"]
    monkeypatch.setattr(events_module, "_VALIDATORS", older)
    summary = run_backfill(root, tracking_uri)
    assert (summary.blocked, summary.synced) == (1, 0)
    (error,) = summary.errors
    assert (error["file"], error["line"]) == (str(path), 3)
    assert "unknown event type 'tags'" in error["reason"] and "newer syncd" in error["reason"]
    run = runs_by_record(client)["newer1"]
    assert history(client, run.info.run_id, "loss") == [(1, T0 + 1000, 0.5)]
    assert run.info.status == "RUNNING" and "phase" not in run.data.tags
    # the same syncd again: nothing is re-reported, the record stays held back
    again = run_backfill(root, tracking_uri)
    assert (again.blocked, again.errors) == (1, [])

    monkeypatch.undo()  # the upgrade: the file is unchanged, the record lands
    upgraded = run_backfill(root, tracking_uri)
    assert (upgraded.synced, upgraded.blocked, upgraded.errors) == (1, 0, [])
    run = runs_by_record(client)["newer1"]
    assert history(client, run.info.run_id, "loss") == [(1, T0 + 1000, 0.5), (2, T0 + 3000, 0.25)]
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "done"


def test_bad_lines_are_reported_and_the_rest_lands(
    workdir: Path, tracking_uri: str, client
) -> None:
    root = workdir / "runs"
    good_dir = root / "good"
    write_record(good_dir, [started("good1"), line(1, "metrics", metrics={"m": 1.0})])
    bad = write_record(
        root / "bad",
        [
            started("bad1"),
            "{not json\n",
            line(2, "metrics", metrics={"loss": 0.5, "oops": "abc"}, step=1),
            line(3, "params", params={"bad@name": "x", "ok": 1}),
            line(5, "tags", tags={"after_gap": "yes"}),
            line(5, "tags", tags={"repeat": "yes"}),
            line(6, "x-checkpoint", note="kept in the ledger"),
            line(7, "run_finished", status="FINISHED"),
        ],
    )
    summary = run_backfill(root, tracking_uri)
    assert not summary.clean
    assert summary.with_errors == 1 and summary.synced == 1
    reasons = {(e["line"], e["reason"].split(":")[0]) for e in summary.errors}
    by_line = {e["line"]: e["reason"] for e in summary.errors}
    assert all(e["file"] == str(bad) for e in summary.errors)
    assert "invalid JSON" in by_line[2]
    assert "oops" in by_line[3]
    assert "bad@name" in by_line[4]
    assert "seq gap" in by_line[5]
    assert "repeats" in by_line[6]
    assert len(reasons) == len(summary.errors)

    runs = runs_by_record(client)
    run = runs["bad1"]
    assert history(client, run.info.run_id, "loss") == [(1, T0 + 2000, 0.5)]
    assert run.data.params == {"ok": "1"}
    assert run.data.tags["after_gap"] == "yes"
    assert "repeat" not in run.data.tags
    assert run.info.status == "FINISHED"
    assert history(client, runs["good1"].info.run_id, "m") == [(0, T0 + 1000, 1.0)]


def test_newer_version_is_held_back(workdir: Path, tracking_uri: str, client) -> None:
    root = workdir / "runs"
    path = write_record(
        root / "r",
        [
            started("v2rec"),
            line(1, "metrics", metrics={"a": 1.0}),
            json.dumps({"v": 2, "seq": 2, "ts": T0, "type": "metrics", "metrics": {"a": 2}}) + "\n",
            line(3, "metrics", metrics={"a": 3.0}, step=3),
        ],
    )
    summary = run_backfill(root, tracking_uri)
    assert summary.blocked == 1
    assert summary.errors[0]["line"] == 3
    assert "unsupported version 2" in summary.errors[0]["reason"]
    run = runs_by_record(client)["v2rec"]
    assert [v for _, _, v in history(client, run.info.run_id, "a")] == [1.0]
    assert path.exists()


@pytest.mark.parametrize(
    ("artifact", "reason"),
    [
        ("../outside.txt", "leaves the run directory"),
        ("/etc/hostname", "absolute"),
        ("link_out", "symlink pointing outside"),
        ("folder_with_link", "symlink pointing outside"),
        ("missing.txt", "does not exist"),
    ],
)
def test_artifacts_are_confined_to_the_run_directory(
    workdir: Path, tracking_uri: str, client, artifact: str, reason: str
) -> None:
    root = workdir / "runs"
    run_dir = root / "r"
    run_dir.mkdir(parents=True)
    secret = workdir / "outside.txt"
    secret.write_text("secret")
    (run_dir / "ok.txt").write_text("fine")
    os.symlink(secret, run_dir / "link_out")
    (run_dir / "folder_with_link").mkdir()
    (run_dir / "folder_with_link" / "a.txt").write_text("a")
    os.symlink(secret, run_dir / "folder_with_link" / "leak")
    write_record(
        run_dir,
        [
            started("conf"),
            line(1, "artifact", path=artifact),
            line(2, "artifact", path="ok.txt"),
        ],
    )
    summary = run_backfill(root, tracking_uri)
    assert [e["line"] for e in summary.errors] == [2]
    assert reason in summary.errors[0]["reason"]
    run = runs_by_record(client)["conf"]
    assert artifact_files(client, run.info.run_id) == ["ok.txt"]


def test_artifacts_upload_once_per_content(workdir: Path, tracking_uri: str, client) -> None:
    root = workdir / "runs"
    rec = RunRecorder(root / "r", experiment="exp").start()
    (rec.run_dir / "model.txt").write_text("v1")
    rec.log_artifact("model.txt")
    first = run_backfill(root, tracking_uri)
    assert first.artifacts == 1
    rec.log_metrics({"x": 1.0})
    second = run_backfill(root, tracking_uri)
    assert second.artifacts == 0  # same content, not uploaded again
    (rec.run_dir / "model.txt").write_text("v2")
    rec.log_artifact("model.txt")
    third = run_backfill(root, tracking_uri)
    assert third.artifacts == 1
    run = runs_by_record(client)[rec.record_id]
    local = client.download_artifacts(run.info.run_id, "model.txt", str(workdir / "dl"))
    assert Path(local).read_text() == "v2"


def test_over_long_param_is_kept_whole_as_an_artifact(
    workdir: Path, tracking_uri: str, client
) -> None:
    root = workdir / "runs"
    value = "feature_" * 1500  # 12000 characters
    write_record(root / "r", [started("longp"), line(1, "params", params={"features": value})])
    summary = run_backfill(root, tracking_uri)
    assert summary.clean
    run = runs_by_record(client)["longp"]
    stored = run.data.params["features"]
    assert len(stored) <= MAX_PARAM_VALUE_LENGTH
    assert "truncated" in stored and "syncd/params/features.txt" in stored
    local = client.download_artifacts(
        run.info.run_id, "syncd/params/features.txt", str(workdir / "d")
    )
    assert Path(local).read_text() == value


def test_replaced_record_is_reprojected(workdir: Path, tracking_uri: str, client) -> None:
    root = workdir / "runs"
    write_record(root / "r", [started("first"), line(1, "metrics", metrics={"a": 1.0})])
    run_backfill(root, tracking_uri)
    write_record(root / "r", [started("second"), line(1, "metrics", metrics={"b": 2.0})])
    summary = run_backfill(root, tracking_uri)
    assert summary.clean and summary.events == 2
    runs = runs_by_record(client)
    assert set(runs) == {"first", "second"}
    assert "b" in runs["second"].data.metrics


def test_partial_last_line_waits_for_its_newline(workdir: Path, tracking_uri: str, client) -> None:
    root = workdir / "runs"
    path = write_record(root / "r", [started("partial")])
    full = line(1, "metrics", metrics={"a": 1.0})
    with path.open("a") as fh:
        fh.write(full[:20])
    summary = run_backfill(root, tracking_uri)
    assert summary.clean and summary.events == 1
    with path.open("a") as fh:
        fh.write(full[20:])
    summary = run_backfill(root, tracking_uri)
    assert summary.clean and summary.events == 1
    run = runs_by_record(client)["partial"]
    assert history(client, run.info.run_id, "a") == [(0, T0 + 1000, 1.0)]


def test_unchanged_records_are_not_read(
    examples: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_backfill(examples, tracking_uri)
    from syncd.sources.local import LocalRecord

    def refuse(*_a: object) -> bytes:
        raise AssertionError("an unchanged record was read")

    monkeypatch.setattr(LocalRecord, "read_at", refuse)
    summary = run_backfill(examples, tracking_uri)
    assert summary.unchanged == 7 and summary.clean


def test_dry_run_writes_nothing(examples: Path, tracking_uri: str, client, workdir: Path) -> None:
    summary = run_backfill(examples, tracking_uri, dry_run=True)
    assert summary.clean and summary.events > 0 and summary.metric_points > 0
    assert runs_by_record(client) == {}
    assert not (workdir / ".syncd" / "ledger.db").exists()


def test_parent_link_missed_once_is_made_on_the_childs_next_sync(
    workdir: Path, tracking_uri: str, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncd.errors import TransientSinkError
    from syncd.sink import MlflowSink

    root = workdir / "runs"
    child = write_record(root / "a_child", [started("child2", parent_record_id="parent2")])
    run_backfill(root, tracking_uri)

    def unavailable(*_a: object) -> None:
        raise TransientSinkError("MLflow unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowSink, "link_parent", unavailable)
        write_record(root / "b_parent", [started("parent2")])
        run_backfill(root, tracking_uri)
    assert "mlflow.parentRunId" not in runs_by_record(client)["child2"].data.tags

    write_record(root / "a_child", [line(1, "metrics", metrics={"m": 1.0})], mode="a")
    assert child.exists()
    run_backfill(root, tracking_uri)
    runs = runs_by_record(client)
    assert runs["child2"].data.tags["mlflow.parentRunId"] == runs["parent2"].info.run_id
