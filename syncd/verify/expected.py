"""What a record should look like in MLflow: built with syncd's own reader and projection."""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from syncd.artifacts import ArtifactRefused, confine
from syncd.projection import (
    LONG_PARAM_FOLDER,
    WritePlan,
    plan_writes,
)
from syncd.record.reader import (
    fingerprint_of,
    parse_lines,
    read_complete_lines,
)
from syncd.sources import RecordFile

RUN_NAME_TAG = "mlflow.runName"
# (path, artifact_path) of an artifact event -> the MLflow artifact files and sizes it makes
ArtifactSizes = Callable[[str, str | None], dict[str, int]]
_MAX_FLOAT = 1.7976931348623157e308  # MLflow's SQL stores keep +/-inf as +/-max float


# -- metrics: a summary instead of a history ---------------------------------------------


def _value_id(value: float) -> tuple[int, float]:
    """A metric value as MLflow stores it: NaN as a flag, infinities as +/- max float."""
    if math.isnan(value):
        return (1, 0.0)
    if math.isinf(value):
        return (0, _MAX_FLOAT if value > 0 else -_MAX_FLOAT)
    return (0, value)


def _point_order(step: int, timestamp: int, value: float) -> tuple[int, int, tuple[int, float]]:
    """The order that picks a key's last point: step, then timestamp (then value, for ties)."""
    return (step, timestamp, _value_id(value))


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


@dataclass(slots=True)
class MetricSummary:
    """The points of one metric key: how many, and the last (by step, then timestamp).

    MLflow keeps one row per distinct (timestamp, step, value): a point repeated
    with the same timestamp is counted once, as MLflow does. Only the points of the
    latest timestamp are remembered for that, so memory does not grow with the
    history (records are written in time order).
    """

    count: int = 0
    last: tuple[int, int, float] | None = None  # step, timestamp, value
    _window_ts: int | None = None
    _window: set[tuple[int, tuple[int, float]]] = field(default_factory=set)

    def add(self, step: int, timestamp: int, value: float) -> None:
        ident = (step, _value_id(value))
        if timestamp != self._window_ts:
            self._window_ts = timestamp
            self._window = set()
        elif ident in self._window:
            return
        self._window.add(ident)
        self.count += 1
        if self.last is None or _point_order(step, timestamp, value) > _point_order(*self.last):
            self.last = (step, timestamp, value)

    @classmethod
    def of(cls, points: Iterable[tuple[int, int, float]]) -> MetricSummary:
        """The summary of a history already de-duplicated (as MLflow returns it)."""
        summary = cls()
        for step, timestamp, value in points:
            summary.count += 1
            if summary.last is None or _point_order(step, timestamp, value) > _point_order(
                *summary.last
            ):
                summary.last = (step, timestamp, value)
        return summary


def describe_point(point: tuple[int, int, float] | None) -> str:
    if point is None:
        return "none"
    step, timestamp, value = point
    return f"{format_value(value)} at step {step}, timestamp {timestamp}"


def same_point(a: tuple[int, int, float] | None, b: tuple[int, int, float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[1] == b[1] and _value_id(a[2]) == _value_id(b[2])


# -- the expected state of a record ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpectedModel:
    """A model of the record as its last ``model`` event says (what the mirror makes of it)."""

    model_id: str  # the record's id, the mirrored LoggedModel's ``syncd.model_id`` tag
    name: str
    status: str  # READY, FAILED or PENDING
    registered_model_name: str | None  # a version is expected only once READY
    alias: str | None


@dataclass(slots=True)
class Expected:
    """What MLflow should hold for one record, as a backfill of it would write it."""

    record_id: str | None = None
    experiment: str | None = None
    start_time: int | None = None
    parent_record_id: str | None = None
    status: str | None = None
    end_time: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    artifacts: dict[str, int] = field(default_factory=dict)  # artifact file -> size in bytes
    datasets: set[tuple[str, str]] = field(default_factory=set)  # name, digest
    models: dict[str, ExpectedModel] = field(default_factory=dict)  # by the record's model id
    lines: int = 0  # complete lines a sync consumes (up to a held-back line)
    offset: int = 0  # bytes of those lines
    size: int = 0  # the file's size when read
    fingerprint: str | None = None
    blocked_at: int | None = None  # line number held back (a newer format version)
    # the MLflow run this record continues (``mlflow_run_id``): it is found by that id,
    # and only what this record writes is expected of it (see ``Expected.partial``)
    mlflow_run_id: str | None = None
    status_set: bool = False  # the record changes the run's status (run_finished, ...)
    begun: int | None = None  # the record's run_started time (orders continuing records)

    @property
    def partial(self) -> bool:
        """The record writes into a run it did not create: its start time, name and
        experiment are the run's own, and other records write into it too."""
        return self.mlflow_run_id is not None

    def absorb(self, later: Expected) -> None:
        """Fold in what a record continuing this record's run (``mlflow_run_id``, synced
        after it) writes there: MLflow keeps the first value of a param, the latest of a
        tag or an artifact file, every metric point, and the latest status change."""
        for key, value in later.params.items():
            self.params.setdefault(key, value)
        self.tags.update(later.tags)
        for key, summary in later.metrics.items():
            mine = self.metrics.get(key)
            if mine is None:
                self.metrics[key] = summary
                continue
            mine.count += summary.count
            if summary.last is not None and (
                mine.last is None or _point_order(*summary.last) > _point_order(*mine.last)
            ):
                mine.last = summary.last
        self.artifacts.update(later.artifacts)
        self.datasets |= later.datasets
        if later.status_set:
            self.status, self.end_time = later.status, later.end_time

    def add_plan(self, plan: WritePlan, artifact_sizes: ArtifactSizes | None) -> None:
        """Fold one chunk's write plan in (chunks in record order); artifacts are expected
        when ``artifact_sizes`` can tell what an artifact event uploads."""
        if plan.run is not None and plan.run.mlflow_run_id:
            spec = plan.run  # an existing run: its experiment, start, name and status stay
            self.record_id = spec.record_id
            self.mlflow_run_id = spec.mlflow_run_id
            self.begun = spec.start_time
            self.parent_record_id = spec.parent_record_id
            self.tags.update(spec.tags)
        elif plan.run is not None:
            spec = plan.run
            self.record_id = spec.record_id
            self.experiment = spec.experiment
            self.start_time = spec.start_time
            self.parent_record_id = spec.parent_record_id
            self.status = "RUNNING"
            if spec.run_name:
                self.tags[RUN_NAME_TAG] = spec.run_name
            self.tags.update(spec.tags)
        accepted: set[str] = set()
        for batch in plan.batches:
            for metric in batch.metrics:
                summary = self.metrics.get(metric.key)
                if summary is None:
                    summary = self.metrics[metric.key] = MetricSummary()
                summary.add(metric.step, metric.timestamp, metric.value)
            for param in batch.params:
                if param.key not in self.params:  # MLflow params never change: the first wins
                    self.params[param.key] = param.value
                    accepted.add(param.key)
            for tag in batch.tags:
                self.tags[tag.key] = tag.value  # a later value wins
        for deletion in plan.deleted_tags:  # applied after the batches
            self.tags.pop(deletion.key, None)
        for text in plan.texts:
            key = text.artifact_file[len(LONG_PARAM_FOLDER) + 1 : -len(".txt")]
            if key in accepted:
                self.artifacts[text.artifact_file] = len(text.text.encode("utf-8"))
        if artifact_sizes is not None:
            for upload in plan.artifacts:
                self.artifacts.update(artifact_sizes(upload.path, upload.artifact_path))
        for ds in plan.datasets:
            self.datasets.add((ds.name, ds.digest))
        for model in plan.models:  # the last event of a model wins
            self.models[model.model_id] = ExpectedModel(
                model_id=model.model_id,
                name=model.name,
                status=model.status,
                registered_model_name=model.registered_model_name,
                alias=model.alias,
            )
        if plan.status is not None:
            self.status_set = True
            self.status = plan.status.status
            if plan.status.end_time is not None:  # resuming keeps the old end time
                self.end_time = plan.status.end_time


def artifact_files(run_dir: Path, path: str, artifact_path: str | None) -> dict[str, int]:
    """The artifact files (and sizes) an ``artifact`` event uploads; {} when syncd refuses it.

    A file lands as ``<artifact_path>/<name>``; a folder's content lands under
    ``<artifact_path>``, as ``MlflowClient.log_artifact(s)`` place them.
    """
    if artifact_path is not None:
        dest = PurePosixPath(artifact_path)
        if dest.is_absolute() or ".." in dest.parts:
            return {}
    try:
        target = confine(run_dir, path)
    except (ArtifactRefused, OSError):
        return {}  # reported by the sync as a line error; nothing is expected in MLflow
    base = posixpath.normpath(artifact_path) if artifact_path else ""
    base = "" if base == "." else base
    out: dict[str, int] = {}
    try:
        if target.is_file():
            out[posixpath.join(base, target.name)] = target.stat().st_size
            return out
        for dirpath, _dirnames, filenames in os.walk(target):
            for name in filenames:
                file = Path(dirpath) / name
                rel = file.relative_to(target).as_posix()
                out[posixpath.join(base, rel)] = file.stat().st_size
    except OSError:
        return {}
    return out


def read_expected(
    record: RecordFile,
    *,
    default_experiment: str | None = None,
    run_dir: Path | None = None,
    artifact_sizes: ArtifactSizes | None = None,
    chunk_bytes: int | None = None,
) -> Expected:
    """The expected MLflow state of ``record``, read in bounded chunks from the start.

    Artifacts are expected from the files under ``run_dir`` (a local record), or as
    ``artifact_sizes`` finds them (an S3 record); with neither, none are compared.
    """
    if artifact_sizes is None and run_dir is not None:
        artifact_sizes = partial(artifact_files, run_dir)
    size, _mtime = record.stat()
    expected = Expected(size=size)
    offset, line, last_seq, skipped = 0, 0, -1, 0
    while True:
        kwargs: dict[str, Any] = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        lines = read_complete_lines(record.read_at, size, offset, **kwargs)
        if not lines.lines:
            break
        if offset == 0 and lines.lines[0] is not None:
            expected.fingerprint = fingerprint_of(lines.lines[0])
        parsed = parse_lines(
            lines, first_line=line + 1, last_seq=last_seq, path=record.display, skipped=skipped
        )
        plan = plan_writes(
            parsed.events,
            path=record.display,
            source_uri=record.uri,
            default_experiment=default_experiment,
        )
        expected.add_plan(plan, artifact_sizes)
        offset += parsed.bytes_consumed
        line += parsed.lines_consumed
        last_seq, skipped = parsed.last_seq, parsed.skipped
        if parsed.held_back is not None:
            expected.blocked_at = parsed.held_back.line
            break
        if parsed.lines_consumed == 0:
            break
    expected.lines, expected.offset = line, offset
    return expected


# -- the found state ---------------------------------------------------------------------
