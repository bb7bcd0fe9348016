"""``syncd verify``: compare each run record with its MLflow run, writing nothing.

Three parts, kept apart:

- the **expected** state of a record, built with the reader and projection
  syncd itself uses (``read_complete_lines`` -> ``parse_lines`` -> ``plan_writes``,
  in bounded chunks), so verify expects exactly what a backfill writes: names
  MLflow refuses are not expected, long params are truncated, a param keeps its
  first value, a blocked record is expected up to the held-back line;
- the **found** state, read through ``MlflowClient`` (:class:`MlflowView`) and
  the ledger opened read-only (:class:`LedgerView`);
- :func:`compare`, pure: expected and found in, differences out.

Memory stays flat whatever the number of records: records are read one at a
time, a metric is summarised (points, last point) instead of kept, and the
record_id -> run index holds only ids.
"""

from __future__ import annotations

import math
import os
import posixpath
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa

from syncd.artifacts import ArtifactRefused, confine
from syncd.config import Root, Settings
from syncd.errors import ConfigError, LedgerError, PermanentSinkError, SinkError
from syncd.ledger import records as ledger_records
from syncd.ledger import runs as ledger_runs
from syncd.logging import redact_text
from syncd.projection import (
    LONG_PARAM_FOLDER,
    PARENT_RUN_TAG,
    RECORD_ID_TAG,
    WritePlan,
    plan_writes,
)
from syncd.record.reader import (
    Checkpoint,
    fingerprint_of,
    parse_lines,
    read_complete_lines,
    replaced_reason,
)
from syncd.sink import RetryPolicy, classify, sqlite_path
from syncd.sources import RecordFile
from syncd.sources.local import LocalRecord
from syncd.sources.s3 import S3Record

T = TypeVar("T")

RUN_NAME_TAG = "mlflow.runName"
MLFLOW_TAG_PREFIX = "mlflow."
_MAX_FLOAT = 1.7976931348623157e308  # MLflow's SQL stores keep +/-inf as +/-max float
_RUNS_PAGE = 1000
_EXPERIMENTS_PER_SEARCH = 100

__all__ = [
    "Difference",
    "Expected",
    "Found",
    "LedgerView",
    "MetricSummary",
    "MlflowView",
    "RecordResult",
    "RunRef",
    "VerifyTotals",
    "compare",
    "read_expected",
    "verify_records",
]


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
    lines: int = 0  # complete lines a sync consumes (up to a held-back line)
    offset: int = 0  # bytes of those lines
    size: int = 0  # the file's size when read
    fingerprint: str | None = None
    blocked_at: int | None = None  # line number held back (a newer format version)

    def add_plan(self, plan: WritePlan, run_dir: Path | None) -> None:
        """Fold one chunk's write plan in (chunks in record order)."""
        if plan.run is not None:
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
        for text in plan.texts:
            key = text.artifact_file[len(LONG_PARAM_FOLDER) + 1 : -len(".txt")]
            if key in accepted:
                self.artifacts[text.artifact_file] = len(text.text.encode("utf-8"))
        if run_dir is not None:
            for upload in plan.artifacts:
                self.artifacts.update(artifact_files(run_dir, upload.path, upload.artifact_path))
        for ds in plan.datasets:
            self.datasets.add((ds.name, ds.digest))
        if plan.status is not None:
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
    chunk_bytes: int | None = None,
) -> Expected:
    """The expected MLflow state of ``record``, read in bounded chunks from the start."""
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
        expected.add_plan(plan, run_dir)
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


@dataclass(frozen=True, slots=True)
class RunRef:
    """One run carrying a ``syncd.record_id`` tag: ids only (the index of a whole store)."""

    run_id: str
    experiment_id: str
    start_time: int
    deleted: bool


@dataclass(slots=True)
class Found:
    """What MLflow holds for one run."""

    run_id: str
    experiment_name: str | None
    experiment_deleted: bool
    deleted: bool
    status: str
    start_time: int | None
    end_time: int | None
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, MetricSummary]
    artifacts: dict[str, int | None]  # artifact file -> size; only the folders asked for
    datasets: set[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    offset: int
    line: int
    seq: int
    fingerprint: str | None
    state: str


@dataclass(frozen=True, slots=True)
class Difference:
    """One way MLflow differs from a record."""

    kind: str  # see docs/cli-json.md
    what: str
    expected: str
    found: str
    key: str | None = None

    def text(self, file: str) -> str:
        """``file: what differs (expected X, found Y)``, secrets in URIs removed."""
        return redact_text(f"{file}: {self.what} (expected {self.expected}, found {self.found})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "what": redact_text(self.what),
            "expected": redact_text(self.expected),
            "found": redact_text(self.found),
        }


# -- comparison (pure) -------------------------------------------------------------------


def _q(value: str | None, limit: int = 120) -> str:
    if value is None:
        return "none"
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _ms(value: int | None) -> str:
    return "none" if value is None else str(value)


def pick_run(refs: list[RunRef], ledger_run_id: str | None) -> RunRef:
    """The run to compare with among several: the ledger's, else the one adopted first."""
    for ref in refs:
        if ref.run_id == ledger_run_id:
            return ref
    return min(refs, key=lambda r: (r.start_time, r.run_id))


def compare_index(
    expected: Expected, refs: list[RunRef], ledger_run_id: str | None
) -> list[Difference]:
    """Run missing, duplicated, or not the one the ledger maps the record to."""
    rid = expected.record_id
    if not refs:
        return [
            Difference(
                "run_missing",
                "run",
                f"a run tagged {RECORD_ID_TAG}={rid}",
                "none",
            )
        ]
    diffs: list[Difference] = []
    if len(refs) > 1:
        ids = ", ".join(r.run_id for r in sorted(refs, key=lambda r: (r.start_time, r.run_id)))
        diffs.append(
            Difference(
                "run_duplicated",
                f"runs tagged {RECORD_ID_TAG}={rid}",
                "1",
                f"{len(refs)} ({ids})",
            )
        )
    if ledger_run_id is not None and all(r.run_id != ledger_run_id for r in refs):
        diffs.append(
            Difference(
                "ledger_run",
                "run of the ledger's record -> run map",
                ledger_run_id,
                ", ".join(r.run_id for r in refs),
            )
        )
    return diffs


def compare(
    expected: Expected, found: Found, *, parent_run_id: str | None, parent_known: bool
) -> list[Difference]:
    """Every difference between a record's expected state and its run (pure).

    ``parent_run_id`` is the run of the record's parent record (None when the
    record has no parent or the parent has no run: ``parent_known`` tells which).
    """
    diffs: list[Difference] = []
    add = diffs.append
    if found.deleted:
        add(Difference("run_deleted", f"run {found.run_id}", "active", "deleted"))
    if expected.experiment is not None and found.experiment_name != expected.experiment:
        add(
            Difference(
                "experiment", "experiment", _q(expected.experiment), _q(found.experiment_name)
            )
        )
    elif found.experiment_deleted:
        add(
            Difference("experiment", f"experiment {_q(found.experiment_name)}", "active", "deleted")
        )
    if expected.status is not None and found.status != expected.status:
        add(Difference("status", "status", expected.status, found.status))
    if expected.start_time is not None and found.start_time != expected.start_time:
        add(Difference("start_time", "start time", _ms(expected.start_time), _ms(found.start_time)))
    if found.end_time != expected.end_time:
        add(Difference("end_time", "end time", _ms(expected.end_time), _ms(found.end_time)))

    for key, value in expected.params.items():
        got = found.params.get(key)
        if got != value:
            add(Difference("param", f"param {key!r}", _q(value), _q(got), key))
    for key in sorted(found.params.keys() - expected.params.keys()):
        add(Difference("param", f"param {key!r}", "none", _q(found.params[key]), key))

    for key, value in expected.tags.items():
        got = found.tags.get(key)
        if got != value:
            add(Difference("tag", f"tag {key!r}", _q(value), _q(got), key))
    for key in sorted(found.tags.keys() - expected.tags.keys()):
        if not key.startswith(MLFLOW_TAG_PREFIX):  # MLflow's own tags the record does not set
            add(Difference("tag", f"tag {key!r}", "none", _q(found.tags[key]), key))

    for key, want in expected.metrics.items():
        have = found.metrics.get(key) or MetricSummary()
        if have.count != want.count:
            add(
                Difference(
                    "metric_points",
                    f"metric {key!r} points",
                    str(want.count),
                    str(have.count),
                    key,
                )
            )
        if not same_point(want.last, have.last):
            add(
                Difference(
                    "metric_last",
                    f"metric {key!r} last value",
                    describe_point(want.last),
                    describe_point(have.last),
                    key,
                )
            )
    for key in sorted(found.metrics.keys() - expected.metrics.keys()):
        add(
            Difference(
                "metric_points",
                f"metric {key!r} points",
                "0",
                str(found.metrics[key].count),
                key,
            )
        )

    for path, size in sorted(expected.artifacts.items()):
        got_size = found.artifacts.get(path)
        if path not in found.artifacts:
            add(Difference("artifact", f"artifact {path!r}", f"{size} bytes", "none", path))
        elif got_size != size:
            add(
                Difference(
                    "artifact",
                    f"artifact {path!r} size",
                    f"{size} bytes",
                    "unknown" if got_size is None else f"{got_size} bytes",
                    path,
                )
            )

    for name, digest in sorted(expected.datasets - found.datasets):
        add(Difference("dataset", f"dataset input {name!r}", f"digest {digest}", "none", name))
    for name, digest in sorted(found.datasets - expected.datasets):
        add(Difference("dataset", f"dataset input {name!r}", "none", f"digest {digest}", name))

    got_parent = found.tags.get(PARENT_RUN_TAG)
    if expected.parent_record_id is not None:
        if not parent_known:
            add(
                Difference(
                    "parent",
                    f"parent link ({PARENT_RUN_TAG})",
                    f"the run of record {expected.parent_record_id}",
                    f"no run for that record (tag is {_q(got_parent)})",
                )
            )
        elif got_parent != parent_run_id:
            add(
                Difference(
                    "parent",
                    f"parent link ({PARENT_RUN_TAG})",
                    str(parent_run_id),
                    got_parent or "none",
                )
            )
    elif got_parent is not None and PARENT_RUN_TAG not in expected.tags:
        add(Difference("parent", f"parent link ({PARENT_RUN_TAG})", "none", got_parent))
    return diffs


def compare_progress(
    expected: Expected, row: LedgerRecord | None, reason: str | None
) -> list[Difference]:
    """Complete lines the ledger has not checkpointed yet (``reason``: file replaced)."""
    diffs: list[Difference] = []
    if reason is not None:
        diffs.append(
            Difference(
                "replaced",
                "file continues what was synced",
                "yes",
                f"no: {reason}",
            )
        )
    done = 0 if (row is None or reason is not None) else row.line
    pending = expected.lines - done
    if pending > 0:
        where = "no checkpoint" if row is None else f"checkpoint at line {done}"
        diffs.append(
            Difference(
                "unmirrored",
                f"complete lines not yet mirrored ({where})",
                "0",
                str(pending),
            )
        )
    return diffs


# -- MLflow, read-only -------------------------------------------------------------------


class MlflowView:
    """Reads one tracking store through ``MlflowClient``; never writes."""

    def __init__(self, tracking_uri: str, *, retry: RetryPolicy | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.retry = retry or RetryPolicy(attempts=5, max_delay=5.0)
        db = sqlite_path(tracking_uri)
        if db is not None and not db.is_file():
            # MlflowClient would create and migrate an empty store: verify writes nothing.
            raise ConfigError(f"the MLflow store {db} does not exist")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
        from mlflow.tracking import MlflowClient

        self.client: Any = MlflowClient(tracking_uri=tracking_uri)
        self.experiments: dict[str, tuple[str, bool]] = {}  # id -> (name, deleted)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                err = classify(exc)
                if isinstance(err, PermanentSinkError) or attempt + 1 >= self.retry.attempts:
                    raise SinkError(f"reading MLflow failed: {err}") from exc
                time.sleep(self.retry.delay(attempt))  # backoff before retrying a read
                attempt += 1

    def load_experiments(self) -> None:
        from mlflow.entities import ViewType

        token: str | None = None
        while True:
            page = self._call(
                self.client.search_experiments,
                view_type=ViewType.ALL,
                max_results=1000,
                page_token=token,
            )
            for exp in page:
                self.experiments[str(exp.experiment_id)] = (
                    exp.name,
                    exp.lifecycle_stage != "active",
                )
            token = page.token
            if not token:
                break

    def index(self) -> dict[str, list[RunRef]]:
        """record_id -> the runs tagged with it, over every experiment (deleted ones too)."""
        from mlflow.entities import ViewType

        if not self.experiments:
            self.load_experiments()
        ids = sorted(self.experiments)
        out: dict[str, list[RunRef]] = {}
        for i in range(0, len(ids), _EXPERIMENTS_PER_SEARCH):
            token: str | None = None
            while True:
                page = self._call(
                    self.client.search_runs,
                    ids[i : i + _EXPERIMENTS_PER_SEARCH],
                    filter_string=f"tags.`{RECORD_ID_TAG}` LIKE '%'",
                    run_view_type=ViewType.ALL,
                    max_results=_RUNS_PAGE,
                    order_by=["attributes.start_time ASC"],
                    page_token=token,
                )
                for run in page:
                    rid = run.data.tags.get(RECORD_ID_TAG)
                    if rid is None:
                        continue
                    out.setdefault(rid, []).append(
                        RunRef(
                            run_id=run.info.run_id,
                            experiment_id=str(run.info.experiment_id),
                            start_time=int(run.info.start_time or 0),
                            deleted=run.info.lifecycle_stage != "active",
                        )
                    )
                token = page.token
                if not token:
                    break
        return out

    def fetch(self, run_id: str, expected: Expected) -> Found:
        """The run's details: attributes, params, tags, inputs, the metric summaries and
        the artifact files in the folders ``expected`` has files in."""
        run = self._call(self.client.get_run, run_id)
        info = run.info
        exp = self.experiments.get(str(info.experiment_id))
        metrics: dict[str, MetricSummary] = {}
        for key in sorted(set(run.data.metrics) | set(expected.metrics)):
            history = self._call(self.client.get_metric_history, run_id, key)
            metrics[key] = MetricSummary.of((m.step, m.timestamp, m.value) for m in history)
            if not metrics[key].count and key not in run.data.metrics:
                del metrics[key]
        artifacts: dict[str, int | None] = {}
        for folder in sorted({posixpath.dirname(p) for p in expected.artifacts}):
            for item in self._call(self.client.list_artifacts, run_id, folder or None):
                if not item.is_dir:
                    artifacts[item.path] = item.file_size
        datasets = {
            (d.dataset.name, d.dataset.digest)
            for d in (run.inputs.dataset_inputs if run.inputs else [])
        }
        return Found(
            run_id=run_id,
            experiment_name=exp[0] if exp else None,
            experiment_deleted=exp[1] if exp else False,
            deleted=info.lifecycle_stage != "active",
            status=str(info.status),
            start_time=info.start_time,
            end_time=info.end_time,
            params=dict(run.data.params),
            tags=dict(run.data.tags),
            metrics=metrics,
            artifacts=artifacts,
            datasets=datasets,
        )


# -- the ledger, read-only ---------------------------------------------------------------


class LedgerView:
    """Checkpoints and the run map of one sink, read without writing a byte."""

    def __init__(self, engine: sa.Engine, sink: str, url: str) -> None:
        self.engine = engine
        self.sink = sink
        self.url = url
        self._conn: sa.Connection | None = None

    @classmethod
    def open(cls, settings: Settings, sink: str) -> LedgerView | None:
        """The ledger of ``settings`` opened read-only; None when there is none."""
        url = settings.ledger_url_resolved
        try:
            parsed = sa.engine.make_url(url)
            if parsed.get_backend_name() == "sqlite":
                database = parsed.database
                if not database or database == ":memory:":
                    return None
                path = Path(database)
                if not path.is_file():
                    return None
                engine = _sqlite_read_only(path)
            else:
                engine = sa.create_engine(url, pool_pre_ping=True)
            if not sa.inspect(engine).has_table(ledger_records.name) or not _has_sink(engine, sink):
                engine.dispose()  # no ledger for this sink: nothing says what was synced
                return None
        except (sa.exc.SQLAlchemyError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot read the ledger at {redact_text(url)}: {exc}") from exc
        return cls(engine, sink, url)

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    def record(self, source: str) -> LedgerRecord | None:
        t = ledger_records
        try:
            row = (
                self._connection()
                .execute(
                    sa.select(t.c.offset, t.c.line, t.c.seq, t.c.fingerprint, t.c.state).where(
                        t.c.sink == self.sink, t.c.source == source
                    )
                )
                .first()
            )
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(f"ledger read failed: {exc}") from exc
        if row is None:
            return None
        return LedgerRecord(row.offset, row.line, row.seq, row.fingerprint, row.state)

    def run_id(self, record_id: str) -> str | None:
        t = ledger_runs
        try:
            found = (
                self._connection()
                .execute(
                    sa.select(t.c.run_id).where(t.c.sink == self.sink, t.c.record_id == record_id)
                )
                .scalar()
            )
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(f"ledger read failed: {exc}") from exc
        return None if found is None else str(found)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.engine.dispose()


def _has_sink(engine: sa.Engine, sink: str) -> bool:
    t = ledger_records
    with engine.connect() as conn:
        return (
            conn.execute(sa.select(t.c.sink).where(t.c.sink == sink).limit(1)).first() is not None
        )


def _sqlite_read_only(path: Path) -> sa.Engine:
    """A read-only SQLite engine. Without a ``-wal`` file no writer is mid-way, and the
    file is opened immutable so SQLite creates no ``-wal``/``-shm`` beside it either."""
    wal = path.with_name(path.name + "-wal")
    mode = "ro" if wal.exists() else "ro&immutable=1"
    uri = f"file:{quote(str(path.resolve()))}?mode={mode}"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)

    return sa.create_engine("sqlite://", creator=connect, poolclass=sa.pool.NullPool)


# -- the whole pass ----------------------------------------------------------------------


@dataclass(slots=True)
class RecordResult:
    file: str
    record_id: str | None
    run_id: str | None
    differences: list[Difference]

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "record_id": self.record_id,
            "run_id": self.run_id,
            "differences": [d.as_dict() for d in self.differences],
        }


@dataclass(slots=True)
class VerifyTotals:
    tracking_uri: str
    ledger: str | None
    records: int = 0
    clean: int = 0
    with_differences: int = 0
    differences: int = 0
    not_projected: int = 0  # records without a valid run_started (nothing expected)
    duration_s: float = 0.0

    def add(self, result: RecordResult) -> None:
        self.records += 1
        if result.differences:
            self.with_differences += 1
            self.differences += len(result.differences)
        else:
            self.clean += 1
        if result.record_id is None:
            self.not_projected += 1

    @property
    def ok(self) -> bool:
        return self.differences == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "ledger": self.ledger,
            "records": self.records,
            "clean": self.clean,
            "with_differences": self.with_differences,
            "differences": self.differences,
            "not_projected": self.not_projected,
            "duration_s": self.duration_s,
        }

    def line(self) -> str:
        verdict = "mirror complete" if self.ok else "mirror differs"
        return (
            f"{verdict}: {self.records} records verified, {self.clean} clean,"
            f" {self.with_differences} with {self.differences} differences"
            f" ({self.duration_s:.1f}s) against {self.tracking_uri}"
        )


def check_roots(roots: Iterable[Root]) -> list[Root]:
    """The roots, each checked to exist (ConfigError otherwise) before anything is read."""
    checked = list(roots)
    if not checked:
        raise ConfigError("no roots: give ROOT arguments or 'roots' in the config file")
    for root in checked:
        if not root.is_s3 and not Path(root.path).exists():
            raise ConfigError(f"root {root.path} does not exist")
    return checked


def verify_records(settings: Settings) -> tuple[VerifyTotals, Iterator[RecordResult]]:
    """Check the roots and open MLflow and the ledger, then verify record by record.

    Usage errors (a missing root, no store) raise here, before any result; the
    iterator yields one result per record and fills ``totals`` as it goes.
    """
    from syncd.backfill import sink_key

    roots = check_roots(settings.roots)
    sink = sink_key(settings.tracking_uri)
    view = MlflowView(settings.tracking_uri)
    ledger = LedgerView.open(settings, sink)
    totals = VerifyTotals(tracking_uri=sink, ledger=redact_text(ledger.url) if ledger else None)
    return totals, _results(roots, view, ledger, totals, settings.timeouts.http)


def _results(
    roots: list[Root],
    view: MlflowView,
    ledger: LedgerView | None,
    totals: VerifyTotals,
    timeout: float,
) -> Iterator[RecordResult]:
    from syncd.backfill import iter_records

    started = time.perf_counter()
    try:
        index = view.index()
        for root, record in iter_records(roots, timeout=timeout):
            result = verify_one(record, root.experiment, view, index, ledger)
            totals.add(result)
            totals.duration_s = round(time.perf_counter() - started, 3)
            yield result
    finally:
        if ledger is not None:
            ledger.close()
    totals.duration_s = round(time.perf_counter() - started, 3)


def verify_one(
    record: LocalRecord | S3Record,
    default_experiment: str | None,
    view: MlflowView,
    index: dict[str, list[RunRef]],
    ledger: LedgerView | None,
) -> RecordResult:
    """Expected vs found for one record (its history is summarised, then dropped)."""
    progress: list[Difference] = []
    try:
        try:
            # Artifacts are compared for local records (S3 ones: not yet).
            run_dir = record.run_dir if isinstance(record, LocalRecord) else None
            expected = read_expected(record, default_experiment=default_experiment, run_dir=run_dir)
        except FileNotFoundError:
            return RecordResult(record.display, None, None, [])  # gone since it was found
        except OSError as exc:
            unreadable = Difference("unreadable", "record file", "readable", str(exc))
            return RecordResult(record.display, None, None, [unreadable])
        if ledger is not None:
            row = ledger.record(record.uri)
            reason = None
            if row is not None:
                checkpoint = Checkpoint(row.offset, row.line, row.seq, row.fingerprint)
                reason = replaced_reason(record.read_at, expected.size, checkpoint)
            progress = compare_progress(expected, row, reason)
    finally:
        record.close()
    rid = expected.record_id
    if rid is None:  # no valid run_started: a sync projects nothing of this record
        return RecordResult(record.display, None, None, progress)
    refs = index.get(rid, [])
    ledger_run = ledger.run_id(rid) if ledger is not None else None
    diffs = compare_index(expected, refs, ledger_run)
    if not refs:
        return RecordResult(record.display, rid, None, [*diffs, *progress])
    chosen = pick_run(refs, ledger_run)
    found = view.fetch(chosen.run_id, expected)
    parent_run_id: str | None = None
    parent_known = False
    if expected.parent_record_id is not None:
        parents = index.get(expected.parent_record_id, [])
        if parents:
            parent_known = True
            parent_ledger = ledger.run_id(expected.parent_record_id) if ledger else None
            parent_run_id = pick_run(parents, parent_ledger).run_id
    diffs += compare(expected, found, parent_run_id=parent_run_id, parent_known=parent_known)
    return RecordResult(record.display, rid, chosen.run_id, [*diffs, *progress])
