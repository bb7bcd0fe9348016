"""Projection: validated events in, an MLflow write plan out (pure: no I/O, no clock).

MLflow's rules live here and only here: name validation, value length limits,
``log_batch`` chunk limits and param immutability within a plan. Timestamps
come from the record, never from the clock, so a replay plans the same rows and
MLflow's own primary keys make the repeated writes no-ops.

The steps run in one direction: validate names -> fit values to limits ->
order and de-duplicate -> chunk into batches -> plan.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
import re
from dataclasses import dataclass, field

from syncd.errors import RecordError
from syncd.record.events import Event

# MLflow's limits (mlflow.utils.validation), restated so the core needs no MLflow import.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_BYTES = 900_000  # MLflow refuses REST batches over 1 MB; keep a margin
MAX_DATASET_DIGEST_LENGTH = 36
MODEL_NAME_FORBIDDEN = ("/", ":", ".", "%", '"', "'")  # _validate_logged_model_name

RECORD_ID_TAG = "syncd.record_id"
SOURCE_TAG = "syncd.source"
PARENT_RUN_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
LONG_PARAM_FOLDER = "syncd/params"
_NAME_PATTERN = re.compile(r"^[/\w.\- :]*$")


@dataclass(frozen=True, slots=True)
class MetricPoint:
    key: str
    value: float
    timestamp: int
    step: int
    line: int = 0  # where it came from, to report a refusal
    seq: int = 0
    model_id: str | None = None  # the record's model the point is linked to


@dataclass(frozen=True, slots=True)
class Entry:
    """A param or tag with the line it came from."""

    key: str
    value: str
    line: int = 0
    seq: int = 0


@dataclass(slots=True)
class Batch:
    """One ``log_batch`` call, within MLflow's per-call limits."""

    metrics: list[MetricPoint] = field(default_factory=list)
    params: list[Entry] = field(default_factory=list)
    tags: list[Entry] = field(default_factory=list)
    size_bytes: int = 0

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """The run to create (or adopt) for a record."""

    record_id: str
    experiment: str
    run_name: str | None
    start_time: int
    tags: dict[str, str]
    parent_record_id: str | None
    # An existing MLflow run this record continues (``mlflow_run_id`` of run_started):
    # it is neither created nor tagged with the record's id (the run keeps the tags of
    # the record that created it).
    mlflow_run_id: str | None = None


@dataclass(frozen=True, slots=True)
class ArtifactUpload:
    """A file or folder of the run directory to upload (resolved and confined later)."""

    path: str
    artifact_path: str | None
    line: int
    seq: int


@dataclass(frozen=True, slots=True)
class TextArtifact:
    """Text syncd itself writes as an artifact (the whole value of an over-long param)."""

    artifact_file: str
    text: str


@dataclass(frozen=True, slots=True)
class TagDeletion:
    """A run tag to delete, after the plan's batches (deleting an absent tag is a no-op)."""

    key: str
    line: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class DatasetInput:
    name: str
    digest: str
    source_type: str
    source: str
    context: str | None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A logged model of the run: its files (a folder of the run directory) and metadata.

    ``model_id`` is the writer's id; the mirrored LoggedModel is found again by
    the ``syncd.model_id`` tag, so a replay never makes a second one.
    """

    model_id: str
    name: str
    path: str
    model_type: str | None
    params: dict[str, str]
    tags: dict[str, str]
    status: str  # READY, FAILED or PENDING
    step: int
    registered_model_name: str | None
    alias: str | None
    line: int = 0
    seq: int = 0
    ts: int | None = None  # the model event's time: points up to it are linked to the model


@dataclass(frozen=True, slots=True)
class StatusChange:
    status: str  # RUNNING, FINISHED, FAILED or KILLED
    end_time: int | None


@dataclass(slots=True)
class WritePlan:
    """Everything one run of events asks of MLflow, in the order to apply it."""

    run: RunSpec | None = None
    batches: list[Batch] = field(default_factory=list)
    deleted_tags: list[TagDeletion] = field(default_factory=list)
    texts: list[TextArtifact] = field(default_factory=list)
    artifacts: list[ArtifactUpload] = field(default_factory=list)
    datasets: list[DatasetInput] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)
    linked_metrics: list[MetricPoint] = field(default_factory=list)  # also in batches
    status: StatusChange | None = None
    problems: list[RecordError] = field(default_factory=list)
    extensions: list[Event] = field(default_factory=list)
    event_count: int = 0
    metric_points: int = 0

    @property
    def is_empty(self) -> bool:
        return (
            not (
                self.run
                or self.batches
                or self.deleted_tags
                or self.texts
                or self.artifacts
                or self.datasets
                or self.models
            )
            and self.status is None
        )


@functools.lru_cache(maxsize=4096)  # the same few keys repeat in every event
def name_problem(kind: str, name: str) -> str | None:
    """Why MLflow would refuse ``name`` as a metric, param or tag key (None if it would not)."""
    if not name:
        return f"{kind} name must not be empty"
    if len(name) > MAX_KEY_LENGTH:
        return f"{kind} name {name[:40]!r}... is longer than {MAX_KEY_LENGTH} characters"
    if not _NAME_PATTERN.match(name):
        return (
            f"{kind} name {name!r} has characters MLflow refuses (allowed: letters, digits,"
            " '_', '-', '.', ' ', ':' and '/')"
        )
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        return f"{kind} name {name!r} is not a normalised relative path, which MLflow refuses"
    return None


def truncation_marker(artifact_file: str) -> str:
    return f"...[truncated by syncd; full value in artifact {artifact_file}]"


class _Planner:
    def __init__(self, path: str, source_uri: str, default_experiment: str | None) -> None:
        self.path = path
        self.source_uri = source_uri
        self.default_experiment = default_experiment
        self.plan = WritePlan()
        self.batch = Batch()
        self.params_seen: dict[str, str] = {}

    def problem(self, event: Event, reason: str) -> None:
        self.plan.problems.append(
            RecordError(reason, path=self.path, line=event.line, seq=event.seq)
        )

    # -- chunking ------------------------------------------------------------------

    def _room(self, metrics: int = 0, params: int = 0, tags: int = 0, size: int = 0) -> bool:
        b = self.batch
        return (
            len(b.metrics) + metrics <= MAX_METRICS_PER_BATCH
            and len(b.params) + params <= MAX_PARAMS_TAGS_PER_BATCH
            and len(b.tags) + tags <= MAX_PARAMS_TAGS_PER_BATCH
            and len(b) + metrics + params + tags <= MAX_ENTITIES_PER_BATCH
            and b.size_bytes + size <= MAX_BATCH_BYTES
        )

    def _flush(self) -> None:
        if len(self.batch):
            self.plan.batches.append(self.batch)
            self.batch = Batch()

    def add_metric(self, point: MetricPoint) -> None:
        size = len(point.key) + 48
        if not self._room(metrics=1, size=size):
            self._flush()
        self.batch.metrics.append(point)
        self.batch.size_bytes += size
        self.plan.metric_points += 1

    def add_param(self, entry: Entry) -> None:
        size = len(entry.key) + len(entry.value) + 16
        if not self._room(params=1, size=size):
            self._flush()
        self.batch.params.append(entry)
        self.batch.size_bytes += size

    def add_tag(self, entry: Entry) -> None:
        self._undelete(entry.key)
        size = len(entry.key) + len(entry.value) + 16
        for i, existing in enumerate(self.batch.tags):
            if existing.key == entry.key:  # a later value wins; one key per call
                self.batch.tags[i] = entry
                self.batch.size_bytes += size
                return
        if not self._room(tags=1, size=size):
            self._flush()
        self.batch.tags.append(entry)
        self.batch.size_bytes += size

    # -- event types ---------------------------------------------------------------

    def run_started(self, event: Event) -> None:
        f = event.fields
        experiment = f["experiment"] or self.default_experiment
        if not experiment:
            self.problem(event, "run_started has no experiment and its root sets no default")
            return
        tags = self._valid_tags(event, f["tags"])
        if not f.get("mlflow_run_id"):
            tags[RECORD_ID_TAG] = f["record_id"]
            tags[SOURCE_TAG] = self.source_uri
        if f["description"]:
            tags[NOTE_TAG] = f["description"]
        self.plan.run = RunSpec(
            record_id=f["record_id"],
            experiment=experiment,
            run_name=f["run_name"],
            start_time=event.ts,
            tags=tags,
            parent_record_id=f["parent_record_id"],
            mlflow_run_id=f.get("mlflow_run_id"),
        )

    def params(self, event: Event) -> None:
        for key, value in event.fields["params"].items():
            reason = name_problem("param", key)
            if reason:
                self.problem(event, reason)
                continue
            seen = self.params_seen.get(key)
            if seen is not None:
                if seen != value:
                    self.problem(
                        event,
                        f"param {key!r} was already logged as {seen[:80]!r};"
                        f" MLflow params cannot change (new value {value[:80]!r} dropped)",
                    )
                continue
            self.params_seen[key] = value
            if len(value) > MAX_PARAM_VALUE_LENGTH:
                artifact_file = f"{LONG_PARAM_FOLDER}/{key}.txt"
                self.plan.texts.append(TextArtifact(artifact_file, value))
                marker = truncation_marker(artifact_file)
                value = value[: MAX_PARAM_VALUE_LENGTH - len(marker)] + marker
            self.add_param(Entry(key, value, event.line, event.seq))

    def metrics(self, event: Event) -> None:
        step = event.fields["step"]
        model_id = event.fields.get("model_id")
        for key, value in event.fields["metrics"].items():
            reason = name_problem("metric", key)
            if reason:
                self.problem(event, reason)
                continue
            point = MetricPoint(key, value, event.ts, step, event.line, event.seq, model_id)
            self.add_metric(point)
            if model_id is not None:
                self.plan.linked_metrics.append(point)

    def tags(self, event: Event) -> None:
        for key, value in self._valid_tags(event, event.fields["tags"]).items():
            self.add_tag(Entry(key, value, event.line, event.seq))

    def tag_deleted(self, event: Event) -> None:
        """The tag goes, whatever this plan set before; a later set brings it back."""
        key = event.fields["key"]
        reason = name_problem("tag", key)
        if reason is None and key.startswith("syncd."):
            reason = f"tag {key!r} is syncd's own and cannot be deleted"
        if reason:
            self.problem(event, reason)
            return
        for batch in [*self.plan.batches, self.batch]:
            batch.tags = [t for t in batch.tags if t.key != key]
        self._undelete(key)
        self.plan.deleted_tags.append(TagDeletion(key, event.line, event.seq))

    def _undelete(self, key: str) -> None:
        if self.plan.deleted_tags:
            self.plan.deleted_tags = [d for d in self.plan.deleted_tags if d.key != key]

    def _valid_tags(self, event: Event, raw: dict[str, str]) -> dict[str, str]:
        tags: dict[str, str] = {}
        for key, value in raw.items():
            reason = name_problem("tag", key)
            if reason:
                self.problem(event, reason)
                continue
            if len(value) > MAX_TAG_VALUE_LENGTH:
                self.problem(
                    event,
                    f"tag {key!r}: value of {len(value)} characters truncated to"
                    f" MLflow's limit of {MAX_TAG_VALUE_LENGTH}",
                )
                value = value[:MAX_TAG_VALUE_LENGTH]
            tags[key] = value
        return tags

    def artifact(self, event: Event) -> None:
        f = event.fields
        self.plan.artifacts.append(
            ArtifactUpload(f["path"], f["artifact_path"], line=event.line, seq=event.seq)
        )

    def dataset(self, event: Event) -> None:
        f = event.fields
        digest = f["digest"]
        if digest is None:
            digest = hashlib.sha256(f"{f['name']}\0{f['source']}".encode()).hexdigest()[:16]
        elif len(digest) > MAX_DATASET_DIGEST_LENGTH:
            self.problem(
                event,
                f"dataset {f['name']!r}: digest longer than {MAX_DATASET_DIGEST_LENGTH}"
                " characters, truncated",
            )
            digest = digest[:MAX_DATASET_DIGEST_LENGTH]
        self.plan.datasets.append(
            DatasetInput(
                name=f["name"],
                digest=digest,
                source_type=dataset_source_type(f["source"]),
                source=f["source"],
                context=f["context"],
            )
        )

    def model(self, event: Event) -> None:
        """A model; a later event for the same ``model_id`` replaces it (the last one wins)."""
        f = event.fields
        if any(c in f["name"] for c in MODEL_NAME_FORBIDDEN):
            self.problem(
                event,
                f"model name {f['name']!r} has characters MLflow refuses"
                f" ({' '.join(MODEL_NAME_FORBIDDEN)}); model not mirrored",
            )
            return
        params: dict[str, str] = {}
        for key, value in f["params"].items():
            reason = name_problem("param", key)
            if reason is None and len(value) > MAX_PARAM_VALUE_LENGTH:
                reason = f"model param {key!r}: value longer than {MAX_PARAM_VALUE_LENGTH}"
            if reason:
                self.problem(event, reason)
            else:
                params[key] = value
        tags = {
            k: v
            for k, v in self._valid_tags(event, f["tags"]).items()
            if not k.startswith("syncd.")
        }
        spec = ModelSpec(
            model_id=f["model_id"],
            name=f["name"],
            path=f["path"],
            model_type=f["model_type"],
            params=params,
            tags=tags,
            status=f["status"],
            step=f["step"],
            registered_model_name=f["registered_model_name"],
            alias=f["alias"],
            line=event.line,
            seq=event.seq,
            ts=event.ts,
        )
        models = [m for m in self.plan.models if m.model_id != spec.model_id]
        self.plan.models = [*models, spec]

    def run_resumed(self, event: Event) -> None:
        self.plan.status = StatusChange("RUNNING", None)

    def run_finished(self, event: Event) -> None:
        self.plan.status = StatusChange(event.fields["status"], event.ts)

    def add(self, event: Event) -> None:
        self.plan.event_count += 1
        for reason in event.problems:
            self.problem(event, reason)
        if event.is_extension:
            self.plan.extensions.append(event)
            return
        getattr(self, event.type)(event)

    def finish(self) -> WritePlan:
        self._flush()
        if self.plan.deleted_tags:  # a batch may have lost every tag to a deletion
            self.plan.batches = [b for b in self.plan.batches if len(b)]
        return self.plan


def dataset_source_type(source: str) -> str:
    """MLflow's dataset source type for a URI (``s3``, ``http``, ``local``...)."""
    scheme, sep, _ = source.partition("://")
    if not sep:
        return "local"
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme == "file":
        return "local"
    return scheme


def plan_writes(
    events: list[Event],
    *,
    path: str = "",
    source_uri: str = "",
    default_experiment: str | None = None,
) -> WritePlan:
    """Plan the MLflow writes for a run of events of one record, in seq order."""
    planner = _Planner(path, source_uri, default_experiment)
    for event in events:
        planner.add(event)
    return planner.finish()
