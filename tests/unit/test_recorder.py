"""syncd.RunRecorder: the record it writes is valid format v1, whatever the training code does."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import syncd
from syncd import RunRecorder
from syncd.record.events import Event
from syncd.record.reader import iter_events


def events_of(path: Path) -> list[Event]:
    """Parse a whole record, asserting it has no bad line."""
    items = list(iter_events(path.read_bytes(), path=str(path)))
    errors = [str(i) for i in items if not isinstance(i, Event)]
    assert errors == []
    return [i for i in items if isinstance(i, Event)]


def raw_lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


class Scalar:
    """A numpy-like scalar: not a float, but converts to one."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        return self.value


def test_record_is_valid_format_v1(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "reports").mkdir(parents=True)
    (run_dir / "reports" / "confusion.png").write_bytes(b"png")
    with RunRecorder(
        run_dir,
        experiment="dssm_ranking",
        run_name="daily",
        tags={"git_sha": "3e1f9ab"},
        parent="parent-record-01",
        description="nightly retrain",
    ) as rec:
        rec.log_params({"lr": 0.01, "depth": 8, "opt": "adam", "amp": True})
        rec.log_param("layers", [1, 2])
        rec.log_metrics({"loss": 0.93, "acc": 0.41}, step=0)
        rec.log_metric("loss", 0.71, step=1)
        rec.set_tags({"stage": "train", "epoch": 3})
        rec.log_input("clicks", "s3://bucket/clicks.parquet", digest="abc", context="training")
        rec.log_artifact("reports/confusion.png", artifact_path="reports")
        record_id = rec.record_id

    path = run_dir / "run_record.jsonl"
    assert rec.path == path
    for obj in raw_lines(path):
        assert obj["v"] == 1
        assert type(obj["ts"]) is int
        assert obj["ts"] > 1_600_000_000_000

    events = events_of(path)
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "run_started",
        "params",
        "params",
        "metrics",
        "metrics",
        "tags",
        "dataset",
        "artifact",
        "run_finished",
    ]
    assert all(e.problems == [] for e in events)
    assert [e.ts for e in events] == sorted(e.ts for e in events)

    start = events[0].fields
    assert start["record_id"] == record_id
    assert len(record_id) == 32
    assert start["experiment"] == "dssm_ranking"
    assert start["run_name"] == "daily"
    assert start["parent_record_id"] == "parent-record-01"
    assert start["description"] == "nightly retrain"
    assert start["tags"]["git_sha"] == "3e1f9ab"
    assert start["tags"]["mlflow.source.type"] == "LOCAL"

    assert events[1].fields["params"] == {"lr": "0.01", "depth": "8", "opt": "adam", "amp": "True"}
    assert events[2].fields["params"] == {"layers": "[1, 2]"}
    assert events[3].fields == {"metrics": {"loss": 0.93, "acc": 0.41}, "step": 0}
    assert events[4].fields == {"metrics": {"loss": 0.71}, "step": 1}
    assert events[5].fields["tags"] == {"stage": "train", "epoch": "3"}
    assert events[6].fields == {
        "name": "clicks",
        "source": "s3://bucket/clicks.parquet",
        "digest": "abc",
        "context": "training",
    }
    assert events[7].fields == {"path": "reports/confusion.png", "artifact_path": "reports"}
    assert events[8].fields == {"status": "FINISHED"}


def test_optional_run_started_fields_are_left_out_when_not_given(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, experiment="e") as rec:
        pass
    first = raw_lines(rec.path)[0]
    assert first["type"] == "run_started"
    assert first["seq"] == 0
    assert "run_name" not in first
    assert "parent_record_id" not in first
    assert "description" not in first


def test_parent_may_be_another_recorder(tmp_path: Path) -> None:
    with RunRecorder(tmp_path / "parent", experiment="e") as parent:
        child = RunRecorder(tmp_path / "child", experiment="e", parent=parent)
        with child:
            pass
    assert events_of(child.path)[0].fields["parent_record_id"] == parent.record_id


def test_context_manager_ends_finished(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, experiment="e") as rec:
        rec.log_metric("loss", 1.0)
    last = events_of(rec.path)[-1]
    assert (last.type, last.fields["status"]) == ("run_finished", "FINISHED")


def test_context_manager_ends_failed_on_exception_and_reraises(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="diverged"),
        RunRecorder(tmp_path, experiment="e") as rec,
    ):
        rec.log_metric("loss", 1.0)
        raise RuntimeError("diverged")
    last = events_of(rec.path)[-1]
    assert (last.type, last.fields["status"]) == ("run_finished", "FAILED")


def test_context_manager_ends_killed_on_keyboard_interrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), RunRecorder(tmp_path, experiment="e") as rec:
        raise KeyboardInterrupt
    last = events_of(rec.path)[-1]
    assert (last.type, last.fields["status"]) == ("run_finished", "KILLED")


def test_non_finite_metrics_are_written_as_strings(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, experiment="e") as rec:
        rec.log_metrics({"nan": float("nan"), "inf": math.inf, "ninf": -math.inf, "ok": 1.5})
    line = raw_lines(rec.path)[1]
    assert line["metrics"] == {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity", "ok": 1.5}
    metrics = events_of(rec.path)[1].fields["metrics"]
    assert math.isnan(metrics["nan"])
    assert metrics["inf"] == math.inf
    assert metrics["ninf"] == -math.inf


def test_numpy_like_metric_values_become_floats(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, experiment="e") as rec:
        rec.log_metrics({"a": Scalar(0.25), "b": Scalar(float("nan")), "c": 3}, step=4)
    line = raw_lines(rec.path)[1]
    assert line["metrics"] == {"a": 0.25, "b": "NaN", "c": 3.0}
    assert line["step"] == 4


def test_bool_metric_raises_type_error_and_writes_nothing(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, experiment="e") as rec:
        with pytest.raises(TypeError, match="bool"):
            rec.log_metrics({"loss": 1.0, "converged": True})
        rec.log_metric("loss", 0.5)
    events = events_of(rec.path)
    assert [e.type for e in events] == ["run_started", "metrics", "run_finished"]
    assert events[1].fields["metrics"] == {"loss": 0.5}


def test_logging_before_start_or_after_finish_raises(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path, experiment="e")
    with pytest.raises(RuntimeError):
        rec.log_metric("loss", 1.0)
    with pytest.raises(RuntimeError):
        _ = rec.record_id
    rec.start()
    rec.finish()
    with pytest.raises(RuntimeError):
        rec.log_metric("loss", 1.0)


def test_concurrent_threads_get_unique_contiguous_seqs(tmp_path: Path) -> None:
    threads_n, calls = 8, 500
    rec = RunRecorder(tmp_path, experiment="e").start()
    barrier = threading.Barrier(threads_n)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(calls):
            rec.log_metrics({f"t{t}": float(i)}, step=i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rec.finish()

    lines = rec.path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    objs = [json.loads(line) for line in lines[:-1]]  # every line is valid JSON on its own
    metric_lines = [o for o in objs if o["type"] == "metrics"]
    assert len(metric_lines) == threads_n * calls
    assert [o["seq"] for o in objs] == list(range(len(objs)))
    seen = {(key, o["step"]) for o in metric_lines for key in o["metrics"]}
    assert seen == {(f"t{t}", i) for t in range(threads_n) for i in range(calls)}
    assert len(events_of(rec.path)) == threads_n * calls + 2


def test_reopening_the_run_dir_continues_the_record(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, experiment="e") as first:
        first.log_metric("loss", 1.0, step=0)
    with RunRecorder(tmp_path, experiment="ignored") as second:
        second.log_metric("loss", 0.5, step=1)
    assert second.record_id == first.record_id
    events = events_of(second.path)
    assert [e.type for e in events] == [
        "run_started",
        "metrics",
        "run_finished",
        "run_resumed",
        "metrics",
        "run_finished",
    ]
    assert [e.seq for e in events] == list(range(6))
    assert sum(e.type == "run_started" for e in events) == 1


def test_reopening_needs_no_experiment(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, experiment="e") as first:
        pass
    with RunRecorder(tmp_path) as second:
        pass
    assert second.record_id == first.record_id
    assert [e.type for e in events_of(second.path)][2:] == ["run_resumed", "run_finished"]


def test_torn_last_line_is_trimmed_when_reopening(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path, experiment="e").start()
    rec.log_metric("loss", 1.0)
    record_id = rec.record_id
    # the process dies mid-write: no run_finished, a torn line at the end
    os.close(rec._fd)  # type: ignore[arg-type]
    complete = rec.path.read_bytes()
    with rec.path.open("ab") as f:
        f.write(b'{"v":1,"seq":2,"ts":17638000')

    with RunRecorder(tmp_path) as again:
        again.log_metric("loss", 0.5)
    data = again.path.read_bytes()
    assert data.startswith(complete)
    assert b"17638000" not in data[len(complete) :]
    events = events_of(again.path)
    assert again.record_id == record_id
    assert [(e.seq, e.type) for e in events] == [
        (0, "run_started"),
        (1, "metrics"),
        (2, "run_resumed"),
        (3, "metrics"),
        (4, "run_finished"),
    ]


def test_artifact_outside_run_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    run_dir = tmp_path / "run"
    with RunRecorder(run_dir, experiment="e") as rec:
        with pytest.raises(ValueError, match="outside the run directory"):
            rec.log_artifact(outside)
        with pytest.raises(ValueError, match="outside the run directory"):
            rec.log_artifact("../outside.txt")
        (run_dir / "link.txt").symlink_to(outside)
        with pytest.raises(ValueError, match="outside the run directory"):
            rec.log_artifact("link.txt")
    assert [e.type for e in events_of(rec.path)] == ["run_started", "run_finished"]


def test_missing_artifact_raises_file_not_found(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, experiment="e") as rec, pytest.raises(FileNotFoundError):
        rec.log_artifact("model.pt")


def test_artifact_inside_run_dir_is_a_relative_posix_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "ckpt" / "best").mkdir(parents=True)
    (run_dir / "ckpt" / "best" / "model.pt").write_bytes(b"weights")
    with RunRecorder(run_dir, experiment="e") as rec:
        rec.log_artifact(run_dir / "ckpt" / "best" / "model.pt")
        rec.log_artifact("ckpt", artifact_path="checkpoints")
        rec.log_artifact("./ckpt/../ckpt/best/model.pt")
    fields = [e.fields for e in events_of(rec.path) if e.type == "artifact"]
    assert fields == [
        {"path": "ckpt/best/model.pt", "artifact_path": None},
        {"path": "ckpt", "artifact_path": "checkpoints"},
        {"path": "ckpt/best/model.pt", "artifact_path": None},
    ]


def test_finish_fsyncs_and_a_second_finish_is_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rec = RunRecorder(tmp_path, experiment="e").start()
    rec.log_metric("loss", 1.0)
    assert synced == []
    rec.finish()
    assert len(synced) == 1
    after_first = rec.path.read_bytes()
    rec.finish()
    rec.finish("FAILED")
    assert len(synced) == 1
    assert rec.path.read_bytes() == after_first
    assert [e.fields.get("status") for e in events_of(rec.path)][-1] == "FINISHED"


def test_finish_rejects_an_unknown_status(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path, experiment="e").start()
    with pytest.raises(ValueError, match="status"):
        rec.finish("DONE")
    rec.finish()
    assert events_of(rec.path)[-1].fields == {"status": "FINISHED"}


def test_new_run_without_experiment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="experiment"):
        RunRecorder(tmp_path).start()


def test_failed_start_leaves_no_record_without_run_started(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path)
    with pytest.raises(ValueError):
        rec.start()
    with contextlib.suppress(RuntimeError):  # the expected outcome: the recorder is not open
        rec.log_metric("loss", 1.0)
    data = rec.path.read_bytes() if rec.path.exists() else b""
    assert b'"type":"metrics"' not in data


def test_public_api_is_exactly_recorder_and_version() -> None:
    assert syncd.__all__ == ["RunRecorder", "__version__"]
    assert isinstance(syncd.__version__, str)


def test_importing_and_using_syncd_does_not_import_mlflow(tmp_path: Path) -> None:
    code = (
        "import sys, syncd\n"
        "from syncd import RunRecorder\n"
        f"with RunRecorder({str(tmp_path)!r}, experiment='e') as rec:\n"
        "    rec.log_params({'lr': 0.1})\n"
        "    rec.log_metric('loss', 1.0)\n"
        "    rec.set_tag('a', 'b')\n"
        "print('mlflow' in sys.modules, 'sqlalchemy' in sys.modules, 'structlog' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["False", "False", "False"]
    assert len(events_of(tmp_path / "run_record.jsonl")) == 5


def test_delete_tag_appends_a_tag_deleted_event(tmp_path: Path) -> None:
    with RunRecorder(tmp_path / "run", experiment="e") as rec:
        rec.set_tag("stage", "train")
        rec.delete_tag("stage")
    events = events_of(rec.path)
    assert [(e.type, e.fields) for e in events[1:3]] == [
        ("tags", {"tags": {"stage": "train"}}),
        ("tag_deleted", {"key": "stage"}),
    ]


MLMODEL = """artifact_path: model
flavors:
  python_function:
    env:
      conda: conda.yaml
    loader_module: mlflow.sklearn
  sklearn:
    code: null
    pickled_model: model.pkl
model_id: null
"""


def test_log_model_records_the_folder_and_its_flavors(tmp_path: Path) -> None:
    with RunRecorder(tmp_path / "run", experiment="e") as rec:
        (rec.run_dir / "model").mkdir()
        (rec.run_dir / "model" / "MLmodel").write_text(MLMODEL)
        model_id = rec.log_model(
            rec.run_dir / "model", "clf", registered_model_name="ranker", alias="prod"
        )
        with pytest.raises(ValueError, match="needs a registered_model_name"):
            rec.log_model("model", "clf", alias="prod")
        with pytest.raises(ValueError, match="outside the run directory"):
            rec.log_model(tmp_path, "clf")
        with pytest.raises(FileNotFoundError):
            rec.log_model("missing", "clf")
    (event,) = [e for e in events_of(rec.path) if e.type == "model"]
    assert event.fields["model_id"] == model_id and model_id.startswith("m-")
    assert event.fields["path"] == "model"
    assert event.fields["flavors"] == ["python_function", "sklearn"]
    assert (event.fields["registered_model_name"], event.fields["alias"]) == ("ranker", "prod")


DDP_SCRIPT = """
import sys
from syncd import RunRecorder

with RunRecorder(sys.argv[1], experiment="ddp", run_name="ddp", enabled=None) as rec:
    rec.log_params({"world_size": 3})
    for step in range(5):
        rec.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    print("recording" if rec.enabled else "silent")
"""


def test_every_rank_runs_the_same_code_and_only_rank_zero_records(tmp_path: Path) -> None:
    """Three processes of one distributed job (RANK 0..2, as torchrun sets it) share a
    run directory: one record, written by rank 0 alone."""
    run_dir = tmp_path / "run"
    procs = [
        subprocess.run(
            [sys.executable, "-c", DDP_SCRIPT, str(run_dir)],
            env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "3"},
            capture_output=True,
            text=True,
            check=True,
        )
        for rank in (2, 1, 0)
    ]
    assert [p.stdout.strip() for p in procs] == ["silent", "silent", "recording"]
    events = events_of(run_dir / "run_record.jsonl")
    assert [e.type for e in events] == ["run_started", "params"] + ["metrics"] * 5 + [
        "run_finished"
    ]


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "3"}, 3),
        ({"SLURM_PROCID": "1"}, 1),
        ({"OMPI_COMM_WORLD_RANK": "2"}, 2),
        ({"LOCAL_RANK": "1"}, 1),
        ({"RANK": "0", "LOCAL_RANK": "1"}, 0),  # the global rank wins
    ],
)
def test_global_rank_from_the_launchers_variables(env: dict[str, str], rank: int) -> None:
    assert syncd.record.recorder.global_rank(env) == rank


def test_a_disabled_recorder_accepts_every_call_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    with RunRecorder(tmp_path / "run", experiment="e", enabled=None) as rec:
        assert not rec.enabled
        rec.log_params({"a": 1})
        rec.log_metrics({"m": 1.0}, step=1)
        rec.set_tags({"t": "x"})
        rec.delete_tag("t")
        rec.log_artifact("missing-on-this-rank.txt")
        rec.log_input("train", "s3://bucket/train")
        with pytest.raises(RuntimeError, match="disabled"):
            _ = rec.record_id
    assert not (tmp_path / "run").exists()
    # asked explicitly, a recorder records on any rank
    with RunRecorder(tmp_path / "run", experiment="e", enabled=True) as rec:
        rec.log_metrics({"m": 1.0})
    assert [e.type for e in events_of(tmp_path / "run" / "run_record.jsonl")] == [
        "run_started",
        "metrics",
        "run_finished",
    ]


def test_a_rank_that_is_not_a_number_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero' is not a rank"):
        RunRecorder("run", experiment="e", enabled=None)
