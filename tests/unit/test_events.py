"""syncd.record.events.parse_line: every event type of format v1 and every bad-line case."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from syncd.errors import RecordError, UnsupportedVersion
from syncd.record.events import Event, parse_line

PATH = "runs/exp1/run_record.jsonl"
TS = 1_763_800_000_000


def raw(seq: int = 1, type: str = "params", **fields: Any) -> bytes:
    """One line (without newline) serialised like RunRecorder does."""
    obj = {"v": 1, "seq": seq, "ts": TS, "type": type, **fields}
    return json.dumps(obj, separators=(",", ":")).encode()


def parse(data: bytes, line: int = 7) -> Event:
    return parse_line(data, line=line, path=PATH)


def parse_error(data: bytes, line: int = 7) -> RecordError:
    with pytest.raises(RecordError) as info:
        parse_line(data, line=line, path=PATH)
    err = info.value
    assert err.path == PATH
    assert err.line == line
    assert err.reason
    assert f"{PATH}:{line}" in str(err)
    return err


# -- valid events -------------------------------------------------------------------------


def test_run_started_with_all_optional_fields() -> None:
    event = parse(
        raw(
            0,
            "run_started",
            record_id="6f1c2b0e9a6d4f0c8a1e",
            experiment="dssm_ranking",
            run_name="daily",
            tags={"git_sha": "3e1f9ab", "team": "search"},
            parent_record_id="parent-01",
            description="nightly retrain",
        ),
        line=1,
    )
    assert event.seq == 0
    assert event.ts == TS
    assert event.type == "run_started"
    assert event.line == 1
    assert event.problems == []
    assert not event.is_extension
    assert event.fields == {
        "record_id": "6f1c2b0e9a6d4f0c8a1e",
        "experiment": "dssm_ranking",
        "run_name": "daily",
        "tags": {"git_sha": "3e1f9ab", "team": "search"},
        "parent_record_id": "parent-01",
        "description": "nightly retrain",
    }


def test_run_started_minimal_fills_optional_fields_with_none_and_empty_tags() -> None:
    event = parse(raw(0, "run_started", record_id="abc", experiment="e"), line=1)
    assert event.fields == {
        "record_id": "abc",
        "experiment": "e",
        "run_name": None,
        "tags": {},
        "parent_record_id": None,
        "description": None,
    }


def test_params_values_are_stringified_like_str() -> None:
    event = parse(raw(params={"name": "adam", "depth": 8, "lr": 0.01, "big": 1e20, "ok": True}))
    assert event.type == "params"
    assert event.problems == []
    assert event.fields["params"] == {
        "name": "adam",
        "depth": str(8),
        "lr": str(0.01),
        "big": str(1e20),
        "ok": str(True),
    }
    assert event.fields["params"]["ok"] == "True"
    assert event.fields["params"]["lr"] == "0.01"


def test_metrics_numbers_and_non_finite_strings() -> None:
    event = parse(
        raw(
            type="metrics",
            step=12,
            metrics={"loss": 0.93, "n": 3, "nan": "NaN", "inf": "Infinity", "ninf": "-Infinity"},
        )
    )
    metrics = event.fields["metrics"]
    assert event.fields["step"] == 12
    assert event.problems == []
    assert metrics["loss"] == 0.93
    assert metrics["n"] == 3.0
    assert isinstance(metrics["n"], float)
    assert math.isnan(metrics["nan"])
    assert metrics["inf"] == math.inf
    assert metrics["ninf"] == -math.inf


def test_metrics_step_defaults_to_zero() -> None:
    event = parse(raw(type="metrics", metrics={"loss": 1.5}))
    assert event.fields == {"metrics": {"loss": 1.5}, "step": 0}


def test_metrics_non_integer_step_is_an_error() -> None:
    err = parse_error(raw(type="metrics", step="3", metrics={"loss": 1.5}))
    assert "step" in err.reason


def test_metrics_linked_to_a_model_keep_its_id() -> None:
    event = parse(raw(type="metrics", step=1, metrics={"loss": 1.5}, model_id="m-1a2b"))
    assert event.fields == {"metrics": {"loss": 1.5}, "step": 1, "model_id": "m-1a2b"}
    assert event.problems == []


@pytest.mark.parametrize("bad", [3, "", "has space", "x" * 129])
def test_metrics_with_a_bad_model_id_keep_their_points_unlinked(bad: object) -> None:
    event = parse(raw(type="metrics", metrics={"loss": 1.5}, model_id=bad))
    assert event.fields == {"metrics": {"loss": 1.5}, "step": 0}
    assert len(event.problems) == 1 and "model_id" in event.problems[0]


def test_tags_event() -> None:
    event = parse(raw(type="tags", tags={"stage": "eval", "owner": "ml"}))
    assert event.fields == {"tags": {"stage": "eval", "owner": "ml"}}
    assert event.problems == []


def test_tag_deleted_event() -> None:
    assert parse(raw(type="tag_deleted", key="stage")).fields == {"key": "stage"}
    assert "'key'" in parse_error(raw(type="tag_deleted")).reason
    assert "'key'" in parse_error(raw(type="tag_deleted", key="")).reason


def test_model_event_with_defaults() -> None:
    event = parse(raw(type="model", model_id="m-1", name="clf", path="models/m-1"))
    assert event.fields == {
        "model_id": "m-1",
        "name": "clf",
        "path": "models/m-1",
        "model_type": None,
        "flavors": [],
        "params": {},
        "tags": {},
        "status": "READY",
        "step": 0,
        "registered_model_name": None,
        "alias": None,
    }


def test_model_event_alias_without_a_registered_name_is_dropped_with_a_problem() -> None:
    event = parse(
        raw(type="model", model_id="m-1", name="clf", path="m", alias="prod", params={"lr": 0.1})
    )
    assert event.fields["alias"] is None and event.fields["params"] == {"lr": "0.1"}
    assert ["alias" in p for p in event.problems] == [True]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"name": "clf", "path": "m"}, "'model_id'"),
        ({"model_id": "m 1", "name": "clf", "path": "m"}, "model_id"),
        ({"model_id": "m-1", "name": "", "path": "m"}, "must not be empty"),
        ({"model_id": "m-1", "name": "clf", "path": "m", "status": "DONE"}, "status"),
        ({"model_id": "m-1", "name": "clf", "path": "m", "flavors": "sklearn"}, "flavors"),
    ],
)
def test_bad_model_events_are_errors(fields: dict[str, Any], reason: str) -> None:
    assert reason in parse_error(raw(type="model", **fields)).reason


def test_artifact_event_with_and_without_artifact_path() -> None:
    event = parse(raw(type="artifact", path="reports/confusion.png", artifact_path="reports"))
    assert event.fields == {"path": "reports/confusion.png", "artifact_path": "reports"}
    plain = parse(raw(type="artifact", path="model.pt"))
    assert plain.fields == {"path": "model.pt", "artifact_path": None}


def test_artifact_with_empty_path_is_an_error() -> None:
    err = parse_error(raw(type="artifact", path=""))
    assert "path" in err.reason


def test_dataset_event() -> None:
    event = parse(
        raw(
            type="dataset",
            name="clicks",
            source="s3://bucket/clicks.parquet",
            digest="abc123",
            context="training",
        )
    )
    assert event.fields == {
        "name": "clicks",
        "source": "s3://bucket/clicks.parquet",
        "digest": "abc123",
        "context": "training",
    }
    minimal = parse(raw(type="dataset", name="clicks", source="/data/clicks"))
    assert minimal.fields["digest"] is None
    assert minimal.fields["context"] is None


def test_dataset_without_source_is_an_error() -> None:
    err = parse_error(raw(type="dataset", name="clicks"))
    assert "source" in err.reason


def test_run_resumed_event() -> None:
    event = parse(raw(5, "run_resumed"))
    assert event.type == "run_resumed"
    assert event.seq == 5
    assert event.fields == {}


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_run_finished_statuses(status: str) -> None:
    event = parse(raw(9, "run_finished", status=status))
    assert event.fields == {"status": status}
    assert event.ts == TS


def test_extension_event_is_kept_with_its_raw_fields() -> None:
    event = parse(raw(3, "x-checkpoint", file="ckpt/epoch3.pt", extra={"a": [1, 2]}))
    assert event.is_extension
    assert event.type == "x-checkpoint"
    assert event.seq == 3
    assert event.fields["file"] == "ckpt/epoch3.pt"
    assert event.fields["extra"] == {"a": [1, 2]}
    assert event.fields["type"] == "x-checkpoint"
    assert event.problems == []


# -- entries dropped, event kept ----------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc", True, False, None, [1.0], {"x": 1}])
def test_metrics_one_bad_value_drops_only_that_entry(bad: object) -> None:
    event = parse(raw(type="metrics", step=2, metrics={"loss": 0.5, "bad": bad, "acc": 0.9}))
    assert event.fields["metrics"] == {"loss": 0.5, "acc": 0.9}
    assert event.fields["step"] == 2
    assert len(event.problems) == 1
    assert "'bad'" in event.problems[0]


def test_tag_with_non_string_value_is_dropped_with_a_problem() -> None:
    event = parse(raw(type="tags", tags={"good": "yes", "count": 3}))
    assert event.fields["tags"] == {"good": "yes"}
    assert len(event.problems) == 1
    assert "'count'" in event.problems[0]


def test_run_started_tag_with_non_string_value_is_dropped_with_a_problem() -> None:
    event = parse(raw(0, "run_started", record_id="r1", experiment="e", tags={"a": "1", "b": 2}))
    assert event.fields["tags"] == {"a": "1"}
    assert len(event.problems) == 1
    assert "'b'" in event.problems[0]


def test_param_with_unsupported_value_is_dropped_with_a_problem() -> None:
    event = parse(raw(params={"lr": 0.1, "layers": [1, 2]}))
    assert event.fields["params"] == {"lr": "0.1"}
    assert len(event.problems) == 1
    assert "'layers'" in event.problems[0]


# -- bad lines ----------------------------------------------------------------------------


def test_invalid_json_is_an_error() -> None:
    err = parse_error(b'{"v":1,"seq":1,')
    assert "invalid JSON" in err.reason


@pytest.mark.parametrize("data", [b"[1,2,3]", b'"text"', b"42", b"null"])
def test_a_line_that_is_not_an_object_is_an_error(data: bytes) -> None:
    err = parse_error(data)
    assert "JSON object" in err.reason


def test_invalid_utf8_is_an_error() -> None:
    err = parse_error(b'{"v":1,"seq":1,"ts":1,"type":"tags","tags":{"a":"\xff\xfe"}}')
    assert "UTF-8" in err.reason


@pytest.mark.parametrize("version", ["missing", "1", 1.0, None, True])
def test_missing_or_non_integer_version_is_an_error(version: object) -> None:
    obj: dict[str, Any] = {"seq": 1, "ts": TS, "type": "tags", "tags": {}}
    if version != "missing":
        obj["v"] = version
    err = parse_error(json.dumps(obj).encode())
    assert not isinstance(err, UnsupportedVersion)
    assert "'v'" in err.reason


def test_newer_version_is_unsupported_version() -> None:
    data = json.dumps({"v": 2, "seq": 4, "ts": TS, "type": "whatever"}).encode()
    with pytest.raises(UnsupportedVersion) as info:
        parse_line(data, line=5, path=PATH)
    err = info.value
    assert isinstance(err, RecordError)
    assert "unsupported version" in str(err)
    assert f"{PATH}:5" in str(err)
    assert err.seq == 4


def test_older_version_is_an_error_but_not_held_back() -> None:
    err = parse_error(json.dumps({"v": 0, "seq": 1, "ts": TS, "type": "tags"}).encode())
    assert not isinstance(err, UnsupportedVersion)
    assert "unsupported version" in err.reason


@pytest.mark.parametrize("seq", ["missing", -1, True, False, "1", 1.0])
def test_missing_negative_or_non_integer_seq_is_an_error(seq: object) -> None:
    obj: dict[str, Any] = {"v": 1, "ts": TS, "type": "tags", "tags": {}}
    if seq != "missing":
        obj["seq"] = seq
    err = parse_error(json.dumps(obj).encode())
    assert "seq" in err.reason


@pytest.mark.parametrize("ts", ["missing", -1, "1763800000000", 1.5, True])
def test_missing_or_negative_ts_is_an_error(ts: object) -> None:
    obj: dict[str, Any] = {"v": 1, "seq": 1, "type": "tags", "tags": {}}
    if ts != "missing":
        obj["ts"] = ts
    err = parse_error(json.dumps(obj).encode())
    assert "ts" in err.reason
    assert err.seq == 1


def test_unknown_type_is_held_back_like_a_newer_version() -> None:
    err = parse_error(raw(type="checkpoint"))
    assert isinstance(err, UnsupportedVersion)
    assert "unknown event type 'checkpoint'" in err.reason
    assert "newer syncd" in err.reason


def test_non_string_type_is_an_error() -> None:
    err = parse_error(json.dumps({"v": 1, "seq": 1, "ts": TS, "type": 3}).encode())
    assert "type" in err.reason


def test_run_started_not_at_seq_zero_is_an_error() -> None:
    err = parse_error(raw(3, "run_started", record_id="abc", experiment="e"))
    assert "seq 0" in err.reason
    assert err.seq == 3


@pytest.mark.parametrize("record_id", ["", "has space", "a/b", "-leading", "x" * 129, 12])
def test_run_started_with_bad_record_id_is_an_error(record_id: object) -> None:
    err = parse_error(raw(0, "run_started", record_id=record_id, experiment="e"))
    assert "record_id" in err.reason


def test_run_started_without_record_id_is_an_error() -> None:
    err = parse_error(raw(0, "run_started", experiment="e"))
    assert "record_id" in err.reason


def test_run_started_with_bad_parent_record_id_is_an_error() -> None:
    err = parse_error(raw(0, "run_started", record_id="a", experiment="e", parent_record_id="../x"))
    assert "parent_record_id" in err.reason


def test_run_started_with_blank_experiment_is_an_error() -> None:
    err = parse_error(raw(0, "run_started", record_id="a", experiment="  "))
    assert "experiment" in err.reason


@pytest.mark.parametrize("status", ["RUNNING", "finished", "", None, 1])
def test_run_finished_with_bad_status_is_an_error(status: object) -> None:
    err = parse_error(raw(9, "run_finished", status=status))
    assert "status" in err.reason


@pytest.mark.parametrize("fields", [{}, {"params": [1, 2]}, {"params": "lr=1"}])
def test_params_missing_or_not_an_object_is_an_error(fields: dict[str, Any]) -> None:
    err = parse_error(raw(**fields))
    assert "params" in err.reason


def test_error_without_path_names_the_line() -> None:
    with pytest.raises(RecordError) as info:
        parse_line(b"not json", line=12)
    assert str(info.value).startswith("line 12:")


def test_metric_integer_too_large_for_a_float_drops_that_entry() -> None:
    data = b'{"v":1,"seq":1,"ts":1,"type":"metrics","metrics":{"ok":1,"huge":' + b"9" * 400 + b"}}"
    event = parse(data)
    assert event.fields["metrics"] == {"ok": 1.0}
    assert len(event.problems) == 1


def test_param_integer_with_more_than_4300_digits_is_kept_as_its_text() -> None:
    # Python refuses to convert it, but it is a JSON number and params are stored as text.
    data = b'{"v":1,"seq":1,"ts":1,"type":"params","params":{"n":' + b"1" * 5000 + b"}}"
    event = parse(data)
    assert event.fields["params"] == {"n": "1" * 5000}
    assert event.problems == []


def test_metric_integer_with_more_than_4300_digits_drops_that_entry() -> None:
    data = b'{"v":1,"seq":1,"ts":1,"type":"metrics","metrics":{"ok":1,"n":' + b"1" * 5000 + b"}}"
    event = parse(data)
    assert event.fields["metrics"] == {"ok": 1.0}
    assert event.problems == [
        "metric 'n': value must be a number or 'NaN', 'Infinity',"
        " '-Infinity', got <integer of 5000 digits>"
    ]


@pytest.mark.parametrize("field", ["seq", "ts"])
def test_seq_or_ts_with_more_than_4300_digits_is_a_record_error(field: str) -> None:
    obj = {"v": 1, "seq": 1, "ts": 1, "type": "tags", "tags": {}}
    data = json.dumps(obj).replace(f'"{field}": 1', f'"{field}": ' + "7" * 5000).encode()
    err = parse_error(data)
    assert f"field '{field}' must be an integer" in err.reason and len(err.reason) < 200
    assert err.seq is None or err.seq == 1


def test_float_literal_out_of_range_is_not_infinity() -> None:
    data = b'{"v":1,"seq":1,"ts":1,"type":"metrics","metrics":{"ok":2.5,"big":1e400,"neg":-1e400}}'
    event = parse(data)
    assert event.fields["metrics"] == {"ok": 2.5}
    assert len(event.problems) == 2
    assert all("out of the range of a 64-bit float" in p for p in event.problems)


@pytest.mark.parametrize(
    ("field", "value"),
    [("ts", 2**63), ("seq", 2**31), ("ts", -1), ("seq", -1)],
)
def test_seq_and_ts_beyond_what_the_stores_hold_are_record_errors(field: str, value: int) -> None:
    obj = {"v": 1, "seq": 1, "ts": 1, "type": "tags", "tags": {}, field: value}
    err = parse_error(json.dumps(obj).encode())
    assert f"field '{field}'" in err.reason
    assert err.seq in (None, 1)


@pytest.mark.parametrize("step", [2**63, -(2**63) - 1, 10**30])
def test_step_beyond_64_bits_is_a_record_error(step: int) -> None:
    obj = {"v": 1, "seq": 1, "ts": 1, "type": "metrics", "metrics": {"a": 1}, "step": step}
    assert "step" in parse_error(json.dumps(obj).encode()).reason


def test_step_at_the_64_bit_limits_is_fine() -> None:
    for step in (2**63 - 1, -(2**63)):
        obj = {"v": 1, "seq": 1, "ts": 1, "type": "metrics", "metrics": {"a": 1}, "step": step}
        assert parse(json.dumps(obj).encode()).fields["step"] == step


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_a_record_error(depth: int) -> None:
    err = parse_error(b"[" * depth + b"]" * depth)
    assert "nested too deeply" in err.reason or "must be a JSON object" in err.reason
    err = parse_error(b"[" * depth)
    assert "invalid JSON" in err.reason


def test_byte_order_mark_on_the_first_line_is_ignored() -> None:
    data = (
        b"\xef\xbb\xbf"
        + json.dumps(
            {"v": 1, "seq": 0, "ts": 1, "type": "run_started", "record_id": "r", "experiment": "e"}
        ).encode()
    )
    assert parse_line(data, line=1).fields["record_id"] == "r"
    assert "invalid JSON" in parse_error(data, line=2).reason


def test_unpaired_surrogate_escape_is_a_record_error() -> None:
    err = parse_error(b'{"v":1,"seq":1,"ts":1,"type":"tags","tags":{"k":"a\\ud800b"}}')
    assert "surrogate" in err.reason
    event = parse(b'{"v":1,"seq":1,"ts":1,"type":"tags","tags":{"k":"\\ud83d\\ude00"}}')
    assert event.fields["tags"] == {"k": "\U0001f600"}


def test_parent_record_id_naming_the_record_itself_is_dropped() -> None:
    obj = {
        "v": 1,
        "seq": 0,
        "ts": 1,
        "type": "run_started",
        "record_id": "r",
        "experiment": "e",
        "parent_record_id": "r",
    }
    event = parse(json.dumps(obj).encode())
    assert event.fields["parent_record_id"] is None
    assert event.problems and "itself" in event.problems[0]


def test_run_started_may_name_an_existing_mlflow_run() -> None:
    event = parse(
        raw(0, "run_started", record_id="r1", experiment="e", mlflow_run_id="0a1b2c3d4e5f"),
        line=1,
    )
    assert event.fields["mlflow_run_id"] == "0a1b2c3d4e5f"
    with pytest.raises(RecordError, match="mlflow_run_id"):
        parse(raw(0, "run_started", record_id="r1", mlflow_run_id="../etc"), line=1)
