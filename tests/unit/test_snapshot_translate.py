"""The snapshot translator (pure) and the derived record's write discipline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from syncd.errors import ConfigError
from syncd.record.events import parse_line
from syncd.snapshot.derived import DerivedRecord, LocalRunDir
from syncd.snapshot.mapping import Mapping, load_mapping
from syncd.snapshot.translate import SNAPSHOT_EVENT, Snapshot, translate

MAPPING = Mapping.model_validate(
    {
        "files": {"rec": "run.json"},
        "record_id": "{rec.id}",
        "experiment": "exp",
        "run_name": "{rec.name}",
        "status": "{rec.status?}",
        "params": {"prefix": "p/", "fields": {"lr": "{rec.lr}", "out": "{rec.out}"}},
        "tags": {"sha": "{rec.git.sha}", "model": "{rec.model?}"},
        "metrics": {"rows": "{rec.rows?}"},
        "artifacts": [{"path": "run.json"}, {"glob": "plots/*.png"}],
    }
)


def snap(doc: dict[str, Any] | None, files: dict[str, tuple[int, int]] | None = None) -> Snapshot:
    return Snapshot(
        run_dir="/runs/a",
        docs={"rec": doc} if doc is not None else {},
        paths={"rec": "/runs/a/run.json"},
        files=files if files is not None else {"run.json": (10, 1)},
    )


DOC = {"id": "r1", "name": "first", "lr": 0.1, "out": "/o", "git": {"sha": "abc"}}


def test_first_snapshot_starts_the_run_with_every_mapped_field() -> None:
    result = translate(MAPPING, None, snap(DOC), default_record_id="d")
    assert result.events == [
        {"type": "run_started", "record_id": "r1", "experiment": "exp", "run_name": "first"},
        {"type": "params", "params": {"p/lr": "0.1", "p/out": "/o"}},
        {"type": "tags", "tags": {"sha": "abc"}},
        {"type": "artifact", "path": "run.json"},
    ]
    assert result.problems == []  # optional fields (status, model, rows) are simply absent


def test_an_unchanged_snapshot_yields_nothing() -> None:
    first = translate(MAPPING, None, snap(DOC), default_record_id="d")
    again = translate(MAPPING, first.state, snap(DOC), default_record_id="d")
    assert again.events == [] and again.new_problems == []


def test_fields_filled_in_later_are_added_and_a_changed_param_goes_to_a_tag() -> None:
    first = translate(MAPPING, None, snap(DOC), default_record_id="d")
    later = {**DOC, "rows": 42, "model": "m1", "out": "/o2", "name": "renamed", "status": "done"}
    result = translate(
        MAPPING, first.state, snap(later, {"run.json": (12, 2)}), default_record_id="d"
    )
    assert {"type": "tags", "tags": {"mlflow.runName": "renamed"}} in result.events
    assert {"type": "tags", "tags": {"changed.p/out": "/o2", "model": "m1"}} in result.events
    assert {"type": "metrics", "step": 0, "metrics": {"rows": 42}} in result.events
    assert {"type": "artifact", "path": "run.json"} in result.events
    assert not any(e["type"] == "params" for e in result.events)  # params are write-once
    # an unknown status is reported; the param change is reported naming file and field
    reasons = {(p.file, p.field, p.entry) for p in result.problems}
    assert ("/runs/a/run.json", "rec.out", "params.fields.out") in reasons
    assert ("/runs/a/run.json", "status", "status") in reasons
    # reported once: the same change seen again is not reported again
    again = translate(
        MAPPING, result.state, snap(later, {"run.json": (12, 2)}), default_record_id="d"
    )
    assert again.new_problems == [] and again.events == []


def test_mapping_mistakes_name_file_field_and_entry_and_the_rest_lands() -> None:
    doc = {"id": "r1", "name": "n", "lr": {"nested": 1}, "out": "/o", "git": "flat", "rows": "lots"}
    result = translate(MAPPING, None, snap(doc, {}), default_record_id="d")
    by_entry = {p.entry: p for p in result.problems}
    assert by_entry["params.fields.lr"].reason == "is a mapping, not a single value"
    assert by_entry["tags.sha"].field == "rec.git.sha"
    assert by_entry["tags.sha"].reason == "missing (rec.git is a string)"
    assert "not a number" in by_entry["metrics.rows"].reason
    assert by_entry["artifacts[0]"].reason == "matches no file in the run directory"
    assert "artifacts[1]" not in by_entry  # a glob may match nothing
    assert {"type": "params", "params": {"p/out": "/o"}} in result.events
    assert by_entry["tags.sha"].describe() == (
        "/runs/a/run.json: field 'rec.git.sha': missing (rec.git is a string)"
        " (mapping entry tags.sha)"
    )


def test_a_missing_record_id_field_falls_back_to_a_stable_id() -> None:
    doc = {k: v for k, v in DOC.items() if k != "id"}
    result = translate(MAPPING, None, snap(doc), default_record_id="snap-x")
    assert result.events[0]["record_id"] == "snap-x"
    assert [p.field for p in result.problems] == ["rec.id"]


def test_resume_names_the_run_and_marks_it_running() -> None:
    mapping = MAPPING.model_copy(update={"mlflow_run_id": "{rec.mlflow_run_id?}"})
    result = translate(mapping, None, snap({**DOC, "mlflow_run_id": "ab12"}), default_record_id="d")
    assert result.events[0]["mlflow_run_id"] == "ab12"
    assert result.events[1] == {"type": "run_resumed"}


def test_an_invalid_mapping_names_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text("files: {rec: run.json}\ntags: {sha: '{meta.sha}'}\n")
    with pytest.raises(ConfigError, match=r"m.yaml: tags.sha: \{meta.sha\} names no file"):
        load_mapping(bad)
    bad.write_text("files: {rec: run.json}\nparams: {fields: {a: '{rec.a'}}\n")
    with pytest.raises(ConfigError, match=r"params\.fields\.a"):
        load_mapping(bad)


def derived_lines(record: DerivedRecord) -> list[dict[str, Any]]:
    assert record.path is not None
    return [json.loads(x) for x in record.path.read_text().splitlines()]


def test_derived_record_is_valid_v1_and_a_torn_batch_is_cut_before_appending(
    tmp_path: Path,
) -> None:
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps(DOC))
    record = DerivedRecord(LocalRunDir(run), MAPPING, tmp_path / "state")
    size, _ = record.stat()
    lines = derived_lines(record)
    assert [x["seq"] for x in lines] == list(range(len(lines)))
    assert lines[-1]["type"] == SNAPSHOT_EVENT
    raw = record.path.read_bytes() if record.path else b""
    for number, text in enumerate(raw.splitlines(), 1):
        parse_line(text, line=number)  # every line is a valid v1 event
    assert record.stat()[0] == size  # nothing changed: nothing appended

    # A crash mid-write leaves events without their snapshot line, and a torn line.
    assert record.path is not None
    with record.path.open("a") as fh:
        fh.write(json.dumps({"v": 1, "seq": len(lines), "ts": 1, "type": "tags", "tags": {}}))
        fh.write('\n{"v":1,"seq":')
    (run / "run.json").write_text(json.dumps({**DOC, "rows": 7}))
    record.stat()
    after = derived_lines(record)
    assert after[: len(lines)] == lines
    assert [x["seq"] for x in after] == list(range(len(after)))
    new = after[len(lines) :]
    assert [x["type"] for x in new] == ["metrics", "artifact", SNAPSHOT_EVENT]


def test_dry_run_record_lives_in_memory(tmp_path: Path) -> None:
    run = tmp_path / "a"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(DOC))
    record = DerivedRecord(LocalRunDir(run), MAPPING, None)
    size, _ = record.stat()
    assert size > 0 and record.read_at(0, 20).startswith(b'{"v":1,"seq":0')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_dvclive_history_is_tailed_by_complete_rows_and_reread_when_rewritten(
    tmp_path: Path,
) -> None:
    from syncd.snapshot.dvclive import DvcliveTranslator

    run = tmp_path / "proj" / "dvclive"
    (run / "plots" / "metrics").mkdir(parents=True)
    (run / "metrics.json").write_text('{"loss": 0.5, "step": 1}')
    tsv = run / "plots" / "metrics" / "loss.tsv"
    tsv.write_text("timestamp\tstep\tloss\n1000\t0\t1.0\n2000\t1\t0.5\n3000\t2\t0.2")  # torn
    record = DerivedRecord(LocalRunDir(run), DvcliveTranslator("e"), tmp_path / "state")
    record.stat()
    points = [
        (x["ts"], x["step"], x["metrics"]) for x in derived_lines(record) if x["type"] == "metrics"
    ]
    assert points == [(1000, 0, {"loss": 1.0}), (2000, 1, {"loss": 0.5})]
    assert derived_lines(record)[0]["run_name"] == "proj"

    with tsv.open("a") as fh:  # the torn row completes, one more arrives
        fh.write("5\n4000\t3\tnan\n")
    record.stat()
    points = [
        (x["ts"], x["step"], x["metrics"]) for x in derived_lines(record) if x["type"] == "metrics"
    ]
    assert points[2:] == [(3000, 2, {"loss": 0.25}), (4000, 3, {"loss": "NaN"})]

    tsv.write_text("step\tloss\n0\t9.0\n")  # rewritten (a new header): read from the start
    record.stat()
    last = [x for x in derived_lines(record) if x["type"] == "metrics"][-1]
    assert (last["step"], last["metrics"]) == (0, {"loss": 9.0})


def test_an_invalid_record_id_is_reported_and_the_default_id_used() -> None:
    result = translate(
        MAPPING, None, snap({**DOC, "id": "has spaces/slash"}), default_record_id="d"
    )
    assert result.events[0]["record_id"] == "d"
    (problem,) = result.problems
    assert (problem.field, problem.entry) == ("rec.id", "record_id")
    assert problem.reason == "'has spaces/slash' is not a valid record id (the default id is used)"


def test_an_empty_or_broken_snapshot_file_is_an_error_naming_it(tmp_path: Path) -> None:
    run = tmp_path / "a"
    run.mkdir()
    (run / "run.json").write_text("")  # caught while rewritten in place
    record = DerivedRecord(LocalRunDir(run), MAPPING, tmp_path / "state")
    with pytest.raises(OSError, match="empty") as caught:
        record.stat()
    assert caught.value.filename == str(run / "run.json")
    (run / "run.json").write_text('{"id": ')
    with pytest.raises(OSError, match="not valid JSON"):
        record.stat()
    (run / "run.json").write_text(json.dumps(DOC))
    assert record.stat()[0] > 0
