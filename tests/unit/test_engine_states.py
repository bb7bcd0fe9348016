"""The engine's record states against an in-memory sink: containment, waiting, run identity.

The sink here is a fake of syncd's own ``Sink`` protocol (the engine's seam), so
faults can be injected at any call; integration tests use real MLflow stores.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import line, started, write_record
from memory_source import MemorySource

from syncd.artifacts import ResolvedArtifact
from syncd.engine import Engine
from syncd.errors import LedgerError, PermanentSinkError, TransientSinkError
from syncd.ledger import (
    BLOCKED,
    BOUND,
    ERROR,
    FAILED,
    GONE,
    SYNCED,
    WAITING,
    Ledger,
    LedgerConflict,
)
from syncd.projection import RunSpec, WritePlan
from syncd.sink import ApplyResult
from syncd.sources.local import LocalRecord


@dataclass
class FakeSink:
    """Runs and metric points in memory; ``faults`` maps a call name to errors to raise."""

    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> run
    faults: dict[str, list[BaseException]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    lose_reply: set[str] = field(default_factory=set)  # calls applied, then raise

    def _fault(self, call: str) -> None:
        queue = self.faults.get(call)
        if queue:
            raise queue.pop(0)

    def resolve_run(self, spec: RunSpec, parent_run_id: str | None) -> ApplyResult:
        for run_id, run in self.runs.items():
            if run["record_id"] == spec.record_id:
                return ApplyResult(run_id=run_id, experiment_id="1", created=False)
        self._fault("create_run")
        run_id = f"run{next(self.ids)}"
        self.runs[run_id] = {"record_id": spec.record_id, "points": [], "status": None}
        if "create_run" in self.lose_reply:
            self.lose_reply.discard("create_run")
            raise TransientSinkError("reply lost after create")
        return ApplyResult(run_id=run_id, experiment_id="1", created=True)

    def apply(
        self,
        plan: WritePlan,
        *,
        run: ApplyResult,
        parent_run_id: str | None,
        uploads: list[ResolvedArtifact],
        model_files: Mapping[str, ResolvedArtifact] | None = None,
    ) -> ApplyResult:
        self._fault("apply")
        stored = self.runs[run.run_id]
        for batch in plan.batches:
            for m in batch.metrics:
                point = (m.key, m.step, m.timestamp, m.value)
                if point not in stored["points"]:  # MLflow ignores an identical point
                    stored["points"].append(point)
        if plan.status is not None:
            stored["status"] = plan.status.status
        return ApplyResult(run_id=run.run_id, experiment_id=run.experiment_id, created=False)

    def link_parent(self, run_id: str, parent_run_id: str) -> None:
        self.runs[run_id]["parent"] = parent_run_id


def metrics(seq: int, step: int, loss: float) -> str:
    return line(seq, "metrics", step=step, metrics={"loss": loss})


@pytest.fixture
def ledger() -> Ledger:
    return Ledger("sqlite://", "fake")


def sync(engine: Engine, path: Path) -> Any:
    record = LocalRecord(path)
    try:
        return engine.sync(record)
    finally:
        record.close()


def test_refused_first_write_waits_and_lands_on_the_next_try(
    tmp_path: Path, ledger: Ledger
) -> None:
    sink = FakeSink(faults={"create_run": [TransientSinkError("connection refused")]})
    path = write_record(tmp_path / "r", [started("r1"), metrics(1, 0, 0.5)])
    engine = Engine(ledger, sink)

    first = sync(engine, path)
    assert first.state == WAITING and first.retry_later
    assert "connection refused" in (first.message or "")
    row = ledger.get_record(path.as_uri())
    assert row is not None and row.state == WAITING and row.offset == 0
    assert row.attempts == 1 and row.next_attempt_at is not None
    assert ledger.summary()["records_with_errors"][0]["reason"] == "connection refused"

    second = sync(engine, path)  # the file did not change: it is retried all the same
    assert second.state == SYNCED
    [run] = sink.runs.values()
    assert run["points"] == [("loss", 0, line_ts(1), 0.5)]
    row = ledger.get_record(path.as_uri())
    assert row is not None and row.attempts == 0 and row.last_error is None


def line_ts(seq: int) -> int:
    from helpers import T0

    return T0 + seq * 1000


def test_a_create_whose_reply_was_lost_is_not_repeated(tmp_path: Path, ledger: Ledger) -> None:
    sink = FakeSink(lose_reply={"create_run"})
    path = write_record(tmp_path / "r", [started("r1"), metrics(1, 0, 0.5)])
    engine = Engine(ledger, sink)
    assert sync(engine, path).state == WAITING
    assert sync(engine, path).state == SYNCED
    assert len(sink.runs) == 1


def test_the_run_is_bound_before_metrics_are_written(tmp_path: Path, ledger: Ledger) -> None:
    sink = FakeSink(faults={"apply": [TransientSinkError("503")]})
    path = write_record(tmp_path / "r", [started("r1"), metrics(1, 0, 0.5)])
    engine = Engine(ledger, sink)
    assert sync(engine, path).state == WAITING
    [run_id] = sink.runs
    bound = ledger.get_run("r1")
    assert bound is not None and bound.run_id == run_id
    row = ledger.get_record(path.as_uri())
    assert row is not None and row.offset == 0  # nothing acknowledged but the run itself
    assert sync(engine, path).state == SYNCED
    assert len(sink.runs) == 1 and len(sink.runs[run_id]["points"]) == 1


def test_an_unexpected_error_fails_one_record_and_the_next_goes_on(
    tmp_path: Path, ledger: Ledger
) -> None:
    sink = FakeSink(faults={"apply": [RecursionError("maximum recursion depth exceeded")]})
    bad = write_record(tmp_path / "bad", [started("bad"), metrics(1, 0, 1.0)])
    good = write_record(tmp_path / "good", [started("good"), metrics(1, 0, 2.0)])
    engine = Engine(ledger, sink)

    outcome = sync(engine, bad)
    assert outcome.state == FAILED and not outcome.retry_later
    assert outcome.message == "RecursionError: maximum recursion depth exceeded"
    assert sync(engine, good).state == SYNCED
    report = ledger.summary()
    [failed] = report["records_with_errors"]
    assert failed["source"] == bad.as_uri() and failed["state"] == FAILED
    assert failed["reason"].startswith("RecursionError")
    assert report["records"][FAILED] == 1 and report["records"][SYNCED] == 1
    assert [r.source for r in ledger.due_retries(now=10**12)] == [bad.as_uri()]

    assert sync(engine, bad).state == SYNCED  # retried: the fault is gone
    assert ledger.summary()["records_with_errors"] == []
    assert sorted(r["record_id"] for r in sink.runs.values()) == ["bad", "good"]


def test_a_permanent_refusal_fails_the_record_with_mlflows_reason(
    tmp_path: Path, ledger: Ledger
) -> None:
    sink = FakeSink(faults={"apply": [PermanentSinkError("INVALID_PARAMETER_VALUE: nope")]})
    path = write_record(tmp_path / "r", [started("r1"), metrics(1, 0, 0.5)])
    outcome = sync(Engine(ledger, sink), path)
    assert outcome.state == FAILED
    assert outcome.message == "MLflow refused: INVALID_PARAMETER_VALUE: nope"


def test_secrets_in_a_failure_are_redacted(tmp_path: Path, ledger: Ledger) -> None:
    sink = FakeSink(faults={"apply": [ValueError("postgresql://u:hunter2@db/x down")]})
    path = write_record(tmp_path / "r", [started("r1"), metrics(1, 0, 0.5)])
    outcome = sync(Engine(ledger, sink), path)
    assert "hunter2" not in (outcome.message or "")
    row = ledger.get_record(path.as_uri())
    assert row is not None and "hunter2" not in (row.last_error or "")


def test_ledger_failures_are_not_contained(tmp_path: Path, ledger: Ledger) -> None:
    path = write_record(tmp_path / "r", [started("r1")])
    engine = Engine(ledger, FakeSink())
    ledger.engine.dispose()
    ledger.engine = __import__("sqlalchemy").create_engine("sqlite:////nonexistent/dir/x.db")
    with pytest.raises(LedgerError):
        sync(engine, path)


def test_errors_in_lines_after_a_retry_keep_the_error_state(tmp_path: Path, ledger: Ledger) -> None:
    sink = FakeSink(faults={"apply": [TransientSinkError("down")]})
    path = write_record(tmp_path / "r", [started("r1"), "{oops\n", metrics(2, 0, 1.0)])
    engine = Engine(ledger, sink)
    assert sync(engine, path).state == WAITING
    done = sync(engine, path)
    assert done.state == ERROR and [e.line for e in done.errors] == [2]


def test_a_row_changed_by_another_writer_is_a_conflict(tmp_path: Path, ledger: Ledger) -> None:
    path = write_record(tmp_path / "r", [started("r1")])
    sync(Engine(ledger, FakeSink()), path)
    mine = ledger.get_record(path.as_uri())
    theirs = ledger.get_record(path.as_uri())
    assert mine is not None and theirs is not None
    from syncd.ledger import Progress

    ledger.commit(Progress(record=theirs, kind="settled"))
    with pytest.raises(LedgerConflict):
        ledger.commit(Progress(record=mine, kind="settled"))


def test_bound_is_a_state_of_its_own(tmp_path: Path, ledger: Ledger) -> None:
    sink = FakeSink(faults={"apply": [KeyError("x")]})
    path = write_record(tmp_path / "r", [started("r1")])
    engine = Engine(ledger, sink)
    assert sync(engine, path).state == FAILED
    # the binding was committed (state bound) before the failing write
    events = [e["kind"] for e in reversed(ledger.recent_events(10))]
    assert events[:2] == [BOUND, FAILED]


def test_a_file_restored_from_an_older_copy_is_projected_again(
    tmp_path: Path, ledger: Ledger
) -> None:
    sink = FakeSink()
    engine = Engine(ledger, sink)
    path = write_record(tmp_path / "r", [started("r1"), metrics(1, 0, 0.25), metrics(2, 1, 0.5)])
    assert sync(engine, path).state == SYNCED
    # Same first line, same length, a newline at the same place: only the last line differs.
    path.write_text(started("r1") + metrics(1, 0, 0.25) + metrics(2, 1, 0.7))
    from syncd.record.reader import replaced_reason

    row = ledger.get_record(path.as_uri())
    assert row is not None and row.tail is not None
    record = LocalRecord(path)
    try:
        size, _ = record.stat()
        from syncd.engine import _checkpoint

        assert "last synced line changed" in (
            replaced_reason(record.read_at, size, _checkpoint(row)) or ""
        )
    finally:
        record.close()
    assert sync(engine, path).state == SYNCED
    [run] = sink.runs.values()
    assert any(p[3] == 0.7 for p in run["points"])


# -- over the in-memory source (the contract suite checks it behaves as local and S3) --


def test_a_record_deleted_while_it_is_read_is_gone_not_failed(ledger: Ledger) -> None:
    source = MemorySource()
    rel = "a/run_record.jsonl"
    source.write(rel, (started("r1") + metrics(1, 0, 0.5)).encode())
    engine = Engine(ledger, FakeSink())
    assert engine.sync(source.record(rel)).state == SYNCED
    synced = ledger.get_record(source.uri(rel))
    assert synced is not None
    source.append(rel, metrics(2, 1, 0.25).encode())
    source.on_read = lambda record, _offset, _length: source.delete(record.key)

    outcome = engine.sync(source.record(rel))

    assert outcome.state == GONE and not outcome.errors and not outcome.message
    row = ledger.get_record(source.uri(rel))
    assert row is not None and row.state == GONE and row.offset == synced.offset
    fresh = source.uri("fresh/run_record.jsonl")  # never synced: nothing to remember
    source.write("fresh/run_record.jsonl", started("r2").encode())
    assert engine.sync(source.record("fresh/run_record.jsonl")).state == GONE
    assert ledger.get_record(fresh) is None


def test_a_moved_record_continues_its_run_and_a_copy_is_held_back(ledger: Ledger) -> None:
    source = MemorySource()
    sink = FakeSink()
    engine = Engine(ledger, sink, locate=source.locate)
    source.write("a/run_record.jsonl", (started("r1") + metrics(1, 0, 0.5)).encode())
    assert engine.sync(source.record("a/run_record.jsonl")).state == SYNCED

    source.write("copy/run_record.jsonl", source.objects["a/run_record.jsonl"])
    held = engine.sync(source.record("copy/run_record.jsonl"))
    assert held.state == BLOCKED and "already used by mem://mem/a/" in (held.message or "")

    source.delete("copy/run_record.jsonl")
    source.move("a/run_record.jsonl", "b/run_record.jsonl")
    source.append("b/run_record.jsonl", metrics(2, 1, 0.25).encode())
    moved = engine.sync(source.record("b/run_record.jsonl"))
    assert moved.state == SYNCED and moved.metric_points == 2  # replayed: no duplicate
    [run] = sink.runs.values()
    assert [p[1] for p in run["points"]] == [0, 1]


def test_without_a_way_to_ask_the_earlier_source_a_moved_record_is_held_back(
    ledger: Ledger,
) -> None:
    source = MemorySource()
    engine = Engine(ledger, FakeSink())  # locate: local files only
    source.write("a/run_record.jsonl", started("r1").encode())
    engine.sync(source.record("a/run_record.jsonl"))
    source.move("a/run_record.jsonl", "b/run_record.jsonl")
    assert engine.sync(source.record("b/run_record.jsonl")).state == BLOCKED
