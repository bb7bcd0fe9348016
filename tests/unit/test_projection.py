"""syncd.projection.plan_writes: events parsed from real lines in, an MLflow write plan out."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from syncd.projection import (
    LONG_PARAM_FOLDER,
    MAX_DATASET_DIGEST_LENGTH,
    MAX_ENTITIES_PER_BATCH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    NOTE_TAG,
    RECORD_ID_TAG,
    SOURCE_TAG,
    DatasetInput,
    MetricPoint,
    StatusChange,
    TextArtifact,
    WritePlan,
    plan_writes,
    truncation_marker,
)
from syncd.record.events import Event, parse_line

PATH = "/data/runs/a/run_record.jsonl"
SOURCE = "file:///data/runs/a/run_record.jsonl"
TS = 1_763_800_000_000


def event(seq: int, type: str, ts: int | None = None, **fields: Any) -> Event:
    """An event parsed from the JSON line a writer would have appended (line = seq + 1)."""
    obj = {"v": 1, "seq": seq, "ts": TS + seq if ts is None else ts, "type": type, **fields}
    return parse_line(json.dumps(obj, separators=(",", ":")).encode(), line=seq + 1, path=PATH)


def started(**fields: Any) -> Event:
    base = {"record_id": "rec01", "experiment": "dssm", "tags": {"git_sha": "3e1f9ab"}}
    return event(0, "run_started", **{**base, **fields})


def plan(*events: Event, **kwargs: Any) -> WritePlan:
    return plan_writes(list(events), path=PATH, source_uri=SOURCE, **kwargs)


def all_params(p: WritePlan) -> dict[str, str]:
    out: dict[str, str] = {}
    for batch in p.batches:
        for entry in batch.params:
            assert entry.key not in out
            out[entry.key] = entry.value
    return out


def final_tags(p: WritePlan) -> dict[str, str]:
    """Tags as MLflow ends up holding them once the batches are applied in order."""
    out: dict[str, str] = {}
    for batch in p.batches:
        for entry in batch.tags:
            out[entry.key] = entry.value
    return out


def problem_view(p: WritePlan) -> list[tuple[int, int | None, str]]:
    return [(e.line, e.seq, e.reason) for e in p.problems]


# -- run_started ----------------------------------------------------------------------------


def test_run_started_becomes_a_run_spec() -> None:
    p = plan(started(run_name="daily", parent_record_id="parent01", description="retrain"))
    assert p.run is not None
    assert p.run.record_id == "rec01"
    assert p.run.experiment == "dssm"
    assert p.run.run_name == "daily"
    assert p.run.start_time == TS
    assert p.run.parent_record_id == "parent01"
    assert p.run.tags == {
        "git_sha": "3e1f9ab",
        RECORD_ID_TAG: "rec01",
        SOURCE_TAG: SOURCE,
        NOTE_TAG: "retrain",
    }
    assert RECORD_ID_TAG == "syncd.record_id"
    assert NOTE_TAG == "mlflow.note.content"
    assert p.problems == []
    assert p.event_count == 1
    assert not p.is_empty


def test_run_started_without_description_has_no_note() -> None:
    p = plan(started())
    assert p.run is not None
    assert NOTE_TAG not in p.run.tags


def test_run_started_without_experiment_uses_the_default() -> None:
    p = plan(started(experiment=None), default_experiment="fallback")
    assert p.run is not None
    assert p.run.experiment == "fallback"


def test_run_started_without_any_experiment_is_a_problem() -> None:
    p = plan(started(experiment=None))
    assert p.run is None
    assert len(p.problems) == 1
    assert (p.problems[0].line, p.problems[0].seq) == (1, 0)
    assert "experiment" in p.problems[0].reason


# -- batching -------------------------------------------------------------------------------


def test_2500_metric_points_make_three_batches() -> None:
    metrics = {f"m{i}": float(i) for i in range(2500)}
    p = plan(event(1, "metrics", ts=TS + 77, step=5, metrics=metrics))
    assert [len(b.metrics) for b in p.batches] == [1000, 1000, 500]
    points = [m for b in p.batches for m in b.metrics]
    assert [m.key for m in points] == list(metrics)
    assert all(m.timestamp == TS + 77 and m.step == 5 for m in points)
    assert all((m.line, m.seq) == (2, 1) for m in points)
    assert points[1234] == MetricPoint("m1234", 1234.0, TS + 77, 5, 2, 1)
    assert p.metric_points == 2500


def test_non_finite_metric_values_are_planned() -> None:
    p = plan(event(1, "metrics", metrics={"a": "NaN", "b": "Infinity", "c": "-Infinity"}))
    values = {m.key: m.value for m in p.batches[0].metrics}
    assert math.isnan(values["a"])
    assert values["b"] == math.inf
    assert values["c"] == -math.inf
    assert all(m.step == 0 for m in p.batches[0].metrics)


def test_250_params_make_batches_of_at_most_100() -> None:
    params = {f"p{i}": i for i in range(250)}
    p = plan(event(1, "params", params=params))
    assert [len(b.params) for b in p.batches] == [100, 100, 50]
    assert all_params(p) == {k: str(v) for k, v in params.items()}


def test_a_mix_never_exceeds_mlflow_batch_limits() -> None:
    events = [started()]
    seq = 1
    for round_ in range(6):
        events.append(event(seq, "metrics", step=round_, metrics={f"m{i}": i for i in range(450)}))
        events.append(event(seq + 1, "params", params={f"r{round_}p{i}": i for i in range(70)}))
        events.append(event(seq + 2, "tags", tags={f"r{round_}t{i}": "v" for i in range(70)}))
        seq += 3
    p = plan(*events)
    assert p.problems == []
    for batch in p.batches:
        assert len(batch) <= MAX_ENTITIES_PER_BATCH
        assert len(batch.metrics) <= 1000
        assert len(batch.params) <= MAX_PARAMS_TAGS_PER_BATCH
        assert len(batch.tags) <= MAX_PARAMS_TAGS_PER_BATCH
    assert sum(len(b.metrics) for b in p.batches) == 6 * 450
    assert len(all_params(p)) == 6 * 70
    assert len(final_tags(p)) == 6 * 70
    # metric points keep their record order across batches
    points = [(m.seq, m.key) for b in p.batches for m in b.metrics]
    assert points == sorted(points, key=lambda x: (x[0], int(x[1][1:])))


# -- params ---------------------------------------------------------------------------------


def test_long_param_is_truncated_with_a_marker_and_kept_whole_as_text() -> None:
    value = "x" * 6990 + "END-OF-VALUE"
    p = plan(event(1, "params", params={"config": value, "lr": 0.1}))
    params = all_params(p)
    artifact_file = f"{LONG_PARAM_FOLDER}/config.txt"
    assert artifact_file == "syncd/params/config.txt"
    assert len(params["config"]) <= MAX_PARAM_VALUE_LENGTH
    assert params["config"].endswith(truncation_marker(artifact_file))
    assert "syncd/params/config.txt" in params["config"]
    assert params["config"].startswith("x" * 1000)
    assert params["lr"] == "0.1"
    assert p.texts == [TextArtifact(artifact_file, value)]
    assert p.problems == []


def test_param_at_the_limit_is_not_truncated() -> None:
    value = "y" * MAX_PARAM_VALUE_LENGTH
    p = plan(event(1, "params", params={"k": value}))
    assert all_params(p) == {"k": value}
    assert p.texts == []


@pytest.mark.parametrize("bad", ["bad@name", "../x", "", "n" * 300, "/abs", "a//b"])
def test_invalid_names_are_problems_and_the_rest_is_planned(bad: str) -> None:
    p = plan(
        event(1, "params", params={bad: 1, "good_param": 2}),
        event(2, "metrics", metrics={bad: 1.0, "good_metric": 2.0}),
        event(3, "tags", tags={bad: "v", "good_tag": "w"}),
    )
    assert all_params(p) == {"good_param": "2"}
    assert [m.key for b in p.batches for m in b.metrics] == ["good_metric"]
    assert final_tags(p) == {"good_tag": "w"}
    assert [(line, seq) for line, seq, _ in problem_view(p)] == [(2, 1), (3, 2), (4, 3)]
    kinds = [reason.split()[0] for _, _, reason in problem_view(p)]
    assert kinds == ["param", "metric", "tag"]
    assert all(f"{PATH}:" in str(e) for e in p.problems)


def test_invalid_tag_name_in_run_started_is_a_problem() -> None:
    p = plan(started(tags={"ok": "1", "bad@tag": "2"}))
    assert p.run is not None
    assert "bad@tag" not in p.run.tags
    assert p.run.tags["ok"] == "1"
    assert [(line, seq) for line, seq, _ in problem_view(p)] == [(1, 0)]


def test_param_changed_later_is_reported_and_first_value_kept() -> None:
    p = plan(event(1, "params", params={"lr": 0.1}), event(2, "params", params={"lr": 0.2}))
    assert all_params(p) == {"lr": "0.1"}
    assert len(p.problems) == 1
    line, seq, reason = problem_view(p)[0]
    assert (line, seq) == (3, 2)
    assert "'lr'" in reason
    assert "0.2" in reason


def test_same_param_value_twice_is_planned_once_without_problem() -> None:
    p = plan(event(1, "params", params={"lr": 0.1}), event(2, "params", params={"lr": "0.1"}))
    assert [(e.key, e.value) for b in p.batches for e in b.params] == [("lr", "0.1")]
    assert p.problems == []


def test_refused_long_param_value_does_not_overwrite_its_artifact() -> None:
    first, second = "a" * 7000, "b" * 7000
    p = plan(event(1, "params", params={"k": first}), event(2, "params", params={"k": second}))
    assert len(p.problems) == 1
    assert all_params(p)["k"].startswith("aaa")
    assert p.texts == [TextArtifact(f"{LONG_PARAM_FOLDER}/k.txt", first)]


# -- tags -----------------------------------------------------------------------------------


def test_tag_set_twice_later_value_wins() -> None:
    p = plan(
        event(1, "tags", tags={"stage": "train", "team": "ml"}),
        event(2, "tags", tags={"stage": "eval"}),
    )
    assert final_tags(p) == {"stage": "eval", "team": "ml"}
    assert p.problems == []


def test_tag_set_twice_across_batches_later_value_wins() -> None:
    p = plan(
        event(1, "tags", tags={"stage": "train"}),
        event(2, "tags", tags={f"t{i}": "x" for i in range(150)}),
        event(3, "tags", tags={"stage": "eval"}),
    )
    assert final_tags(p)["stage"] == "eval"
    assert all(len(b.tags) <= MAX_PARAMS_TAGS_PER_BATCH for b in p.batches)


def deleted(p: WritePlan) -> list[str]:
    return [d.key for d in p.deleted_tags]


def test_tag_deleted_after_being_set_is_only_deleted() -> None:
    p = plan(
        event(1, "tags", tags={"stage": "train", "team": "ml"}),
        event(2, "tags", tags={f"t{i}": "x" for i in range(150)}),
        event(3, "tag_deleted", key="stage"),
    )
    assert "stage" not in final_tags(p) and final_tags(p)["team"] == "ml"
    assert deleted(p) == ["stage"]
    assert p.problems == []


def test_tag_set_after_its_deletion_is_set_again() -> None:
    p = plan(
        event(1, "tag_deleted", key="stage"),
        event(2, "tags", tags={"stage": "eval"}),
    )
    assert final_tags(p) == {"stage": "eval"} and deleted(p) == []


def test_a_batch_left_empty_by_a_deletion_is_dropped() -> None:
    p = plan(event(1, "tags", tags={"stage": "train"}), event(2, "tag_deleted", key="stage"))
    assert p.batches == [] and deleted(p) == ["stage"] and not p.is_empty


def test_deleting_syncd_tags_or_invalid_names_is_a_problem() -> None:
    p = plan(event(1, "tag_deleted", key=RECORD_ID_TAG), event(2, "tag_deleted", key="bad key!"))
    assert deleted(p) == []
    assert [(line, seq) for line, seq, _ in problem_view(p)] == [(2, 1), (3, 2)]
    assert "syncd's own" in p.problems[0].reason


# -- models ---------------------------------------------------------------------------------


def model_event(seq: int, **fields: Any) -> Event:
    base = {"model_id": "m-1", "name": "clf", "path": "models/m-1"}
    return event(seq, "model", **{**base, **fields})


def test_a_later_model_event_for_the_same_model_replaces_it() -> None:
    p = plan(
        model_event(1, tags={"a": "1", "syncd.model_id": "forged"}, params={"lr": 0.1}),
        model_event(2, model_id="m-2", name="other"),
        model_event(3, tags={"a": "2"}, registered_model_name="ranker", alias="prod"),
    )
    assert [(m.model_id, m.seq) for m in p.models] == [("m-2", 2), ("m-1", 3)]
    last = p.models[1]
    assert last.tags == {"a": "2"} and last.params == {}
    assert (last.registered_model_name, last.alias, last.status) == ("ranker", "prod", "READY")
    assert not p.is_empty and p.problems == []


def test_model_name_mlflow_refuses_is_a_problem() -> None:
    p = plan(model_event(1, name="my.model"), model_event(2, tags={"bad tag!": "x"}))
    assert [m.seq for m in p.models] == [2] and p.models[0].tags == {}
    assert [(line, seq) for line, seq, _ in problem_view(p)] == [(2, 1), (3, 2)]


def test_tag_value_over_the_limit_is_truncated_with_a_problem() -> None:
    p = plan(event(1, "tags", tags={"notes": "z" * 9000}))
    assert len(final_tags(p)["notes"]) == 8000
    assert [(line, seq) for line, seq, _ in problem_view(p)] == [(2, 1)]


# -- status, artifacts, datasets, extensions ------------------------------------------------


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_run_finished_sets_status_and_end_time(status: str) -> None:
    p = plan(event(7, "run_finished", ts=TS + 9999, status=status))
    assert p.status == StatusChange(status, end_time=TS + 9999)
    assert not p.is_empty


def test_run_resumed_sets_status_running() -> None:
    p = plan(event(4, "run_resumed"))
    assert p.status == StatusChange("RUNNING", None)


def test_the_last_status_change_wins() -> None:
    p = plan(
        event(4, "run_finished", status="FAILED"),
        event(5, "run_resumed"),
        event(6, "run_finished", ts=TS + 60_000, status="FINISHED"),
    )
    assert p.status == StatusChange("FINISHED", TS + 60_000)


def test_artifact_event_is_planned_as_an_upload() -> None:
    p = plan(event(3, "artifact", path="reports/cm.png", artifact_path="reports"))
    assert len(p.artifacts) == 1
    upload = p.artifacts[0]
    assert (upload.path, upload.artifact_path, upload.line, upload.seq) == (
        "reports/cm.png",
        "reports",
        4,
        3,
    )


def test_dataset_without_digest_gets_a_stable_short_digest() -> None:
    def dataset_plan(name: str, source: str) -> DatasetInput:
        p = plan(event(2, "dataset", name=name, source=source, context="training"))
        assert p.problems == []
        return p.datasets[0]

    a = dataset_plan("clicks", "s3://bucket/clicks.parquet")
    again = dataset_plan("clicks", "s3://bucket/clicks.parquet")
    other = dataset_plan("clicks", "s3://bucket/other.parquet")
    assert a.digest == again.digest
    assert a.digest != other.digest
    assert 0 < len(a.digest) <= MAX_DATASET_DIGEST_LENGTH == 36
    assert a == DatasetInput("clicks", a.digest, "s3", "s3://bucket/clicks.parquet", "training")


def test_dataset_digest_given_is_kept_and_overlong_one_truncated() -> None:
    p = plan(
        event(1, "dataset", name="d", source="https://x/d.csv", digest="abc"),
        event(2, "dataset", name="d2", source="/local/d2", digest="f" * 64),
    )
    assert [(d.digest, d.source_type) for d in p.datasets] == [
        ("abc", "http"),
        ("f" * 36, "local"),
    ]
    assert [(line, seq) for line, seq, _ in problem_view(p)] == [(3, 2)]


def test_extension_events_land_only_in_extensions() -> None:
    ext = event(1, "x-checkpoint", file="ckpt.pt", metrics={"loss": 1.0}, params={"a": 1})
    p = plan(ext)
    assert p.extensions == [ext]
    assert p.batches == []
    assert p.texts == []
    assert p.artifacts == []
    assert p.datasets == []
    assert p.run is None
    assert p.status is None
    assert p.problems == []
    assert p.event_count == 1
    assert p.is_empty


def test_entry_problems_found_by_the_parser_are_reported_in_the_plan() -> None:
    p = plan(event(3, "metrics", metrics={"loss": 1.0, "bad": "abc"}))
    assert [m.key for m in p.batches[0].metrics] == ["loss"]
    assert [(line, seq) for line, seq, _ in problem_view(p)] == [(4, 3)]
    assert "'bad'" in p.problems[0].reason


# -- determinism ----------------------------------------------------------------------------


def test_planning_the_same_events_twice_gives_equal_plans() -> None:
    def events() -> list[Event]:
        return [
            started(description="d"),
            event(1, "params", params={"lr": 0.1, "long": "q" * 7000, "bad@": 1}),
            event(2, "metrics", step=3, metrics={f"m{i}": i / 7 for i in range(1200)}),
            event(3, "tags", tags={"a": "1"}),
            event(4, "artifact", path="model.pt"),
            event(5, "dataset", name="d", source="s3://b/d"),
            event(6, "x-note", text="hi"),
            event(7, "tags", tags={"a": "2"}),
            event(8, "run_finished", status="FINISHED"),
        ]

    first = plan(*events())
    second = plan(*events())
    # RecordError compares by identity, so compare problems by what they say
    assert problem_view(first) == problem_view(second)
    assert len(first.problems) == 1
    first.problems, second.problems = [], []
    assert first == second
    assert first.run == second.run
    assert first.batches == second.batches
