"""The MLflow tracking store behind ``MLFLOW_TRACKING_URI=syncd:///path``.

Unchanged MLflow code writes run records: every write call becomes an event
appended through :class:`~syncd.record.recorder.RecordWriter` (the writer
``RunRecorder`` uses), with MLflow's own timestamps and steps, and reads are
answered from the records. The daemon (``syncd run`` / ``syncd backfill``)
then mirrors the records into the real tracking store.

Layout under the root::

    experiments.json                       name -> id, written under experiments.lock
    <experiment>/<run name>-<id[:8]>/run_record.jsonl
    <experiment>/<run name>-<id[:8]>/artifacts/   the run's artifact_uri (file://)

The run id MLflow sees is the record's ``record_id`` (a uuid4 hex). Files that
MLflow writes into ``artifacts/`` (``log_artifact``, ``log_text``...) do not
go through the store: they are recorded as ``artifact`` events when the run
ends (``update_run_info`` to a final status).

Experiment creation is idempotent across processes that race for one name:
``mlflow.set_experiment`` asks for the experiment by name, creates it when
absent, and when another process created it in between it neither raises nor
makes it active (the next run would land in "Default"). So a process that was
told the name is absent and then finds it created by someone else gets that
experiment's id, as if its own create had won.

``syncd:s3://bucket/prefix`` roots: the store writes into a local spool folder
(:func:`syncd.uri_upload.spool_dir`) that a :class:`~syncd.uri_upload.SpoolUploader`
thread copies to the prefix; the end of a run and interpreter exit wait a
bounded time for an upload. Experiment ids there are derived from the name
(:func:`derived_experiment_id`), so hosts sharing a prefix agree without
coordination.

Any ``AbstractStore`` call this store cannot serve raises ``MlflowException``
naming the call and what to use instead; none returns None silently.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import (
    Dataset,
    DatasetInput,
    Experiment,
    ExperimentTag,
    InputTag,
    LifecycleStage,
    LoggedModel,
    LoggedModelParameter,
    LoggedModelStatus,
    LoggedModelTag,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunInputs,
    RunStatus,
    RunTag,
    ViewType,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_USER
from mlflow.utils.name_utils import _generate_random_name
from mlflow.utils.validation import (
    _validate_batch_log_data,
    _validate_batch_log_limits,
    _validate_experiment_name,
    _validate_logged_model_name,
)

from syncd.errors import RecordError
from syncd.record.events import RECORD_FILENAME, parse_line
from syncd.record.recorder import RecordWriter, _metric_value
from syncd.uri_upload import DEFAULT_FLUSH_TIMEOUT, DEFAULT_INTERVAL, SpoolUploader, env_seconds

DEFAULT_EXPERIMENT_ID = "0"
DEFAULT_EXPERIMENT_NAME = "Default"
EXPERIMENTS_FILE = "experiments.json"
RACE_S = 60.0  # a create this soon after "absent" that finds the name taken joins it
EXPERIMENTS_LOCK = "experiments.lock"
ARTIFACTS_FOLDER = "artifacts"
MODELS_FOLDER = "models"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # set by the daemon's own registration
CONTEXT_TAG = "mlflow.data.context"
_FINAL = frozenset({"FINISHED", "FAILED", "KILLED"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_log = logging.getLogger("syncd.mlflow")

_SERVER_HINT = (
    "the syncd: tracking URI only records runs, which the syncd daemon mirrors into MLflow;"
    " make this call against the tracking store the daemon writes to"
    " (MlflowClient(tracking_uri=...))"
)
_HINTS = {
    "delete_run": "runs are records: delete the run directory, or delete the mirrored run",
    "restore_run": "runs are records: restore the mirrored run",
    "delete_experiment": "delete the experiment in the mirrored tracking store",
    "restore_experiment": "restore the experiment in the mirrored tracking store",
    "rename_experiment": "rename the experiment in the mirrored tracking store",
    "delete_experiment_tag": "delete the tag in the mirrored tracking store",
    "search_logged_models": "search the logged models of the mirrored tracking store",
    "delete_logged_model": "delete the model in the mirrored tracking store",
}


def _slug(name: str, limit: int = 80) -> str:
    """A file-name-safe form of an experiment or run name."""
    slug = _UNSAFE.sub("_", name).strip("._") or "_"
    return slug[:limit]


def derived_experiment_id(name: str) -> str:
    """A stable numeric id for an experiment name (S3 roots: the same on every host)."""
    return str(int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:15], 16) or 1)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- experiments ------------------------------------------------------------------


class _Experiments:
    """Experiment names -> stable ids, in ``<root>/experiments.json``.

    Reads take the file as it is (it is only ever replaced whole, by rename);
    creation happens under an exclusive ``flock`` so that many training
    processes creating the same experiment at once agree on one id.
    """

    def __init__(self, root: Path, *, derived_ids: bool = False) -> None:
        self.root = root
        self.derived_ids = derived_ids
        self.path = root / EXPERIMENTS_FILE
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        data.setdefault("next_id", 1)
        data.setdefault("experiments", {})
        data["experiments"].setdefault(
            DEFAULT_EXPERIMENT_ID,
            {"name": DEFAULT_EXPERIMENT_NAME, "dir": DEFAULT_EXPERIMENT_NAME, "tags": {}},
        )
        return data

    def all(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            self._data = self._load()
            return dict(self._data["experiments"])

    def by_id(self, experiment_id: str) -> dict[str, Any] | None:
        with self._lock:
            exp: dict[str, Any] | None = self._data.get("experiments", {}).get(experiment_id)
            if exp is None:
                self._data = self._load()
                exp = self._data["experiments"].get(experiment_id)
            return exp

    def id_of(self, name: str) -> str | None:
        with self._lock:
            for refresh in (False, True):
                if refresh or not self._data:
                    self._data = self._load()
                for exp_id, exp in self._data["experiments"].items():
                    if exp["name"] == name:
                        return str(exp_id)
            return None

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The current data under the file lock; written back atomically on exit."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.root / EXPERIMENTS_LOCK, "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                data = self._load()
                before = json.dumps(data, sort_keys=True)
                yield data
                if json.dumps(data, sort_keys=True) != before:
                    tmp = self.path.with_name(f".{EXPERIMENTS_FILE}.{os.getpid()}.tmp")
                    with open(tmp, "w", encoding="utf-8") as fh:
                        json.dump(data, fh, indent=1, sort_keys=True)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, self.path)
                self._data = data
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def create(self, name: str, tags: dict[str, str]) -> tuple[str, bool]:
        """(id, created): the experiment's id, creating it when no experiment has the name."""
        with self._locked() as data:
            for exp_id, exp in data["experiments"].items():
                if exp["name"] == name:
                    return str(exp_id), False
            if self.derived_ids:
                exp_id = derived_experiment_id(name)
            else:
                exp_id = str(data["next_id"])
                data["next_id"] += 1
            used = {exp["dir"] for exp in data["experiments"].values()}
            folder = _slug(name)
            if folder in used or folder == ARTIFACTS_FOLDER:
                folder = f"{folder}-{exp_id}"
            data["experiments"][exp_id] = {
                "name": name,
                "dir": folder,
                "tags": dict(tags),
                "creation_time": _now_ms(),
            }
            return exp_id, True

    def set_tag(self, experiment_id: str, key: str, value: str) -> None:
        with self._locked() as data:
            exp = data["experiments"].get(experiment_id)
            if exp is None:
                raise _no_experiment(experiment_id)
            exp.setdefault("tags", {})[key] = value


def _no_experiment(experiment_id: str) -> MlflowException:
    return MlflowException(
        f"No experiment with id {experiment_id!r} in this syncd: root",
        RESOURCE_DOES_NOT_EXIST,
    )


# -- runs ---------------------------------------------------------------------


@dataclass
class _RunView:
    """A run as its record says so far, folded from the file incrementally."""

    path: Path
    offset: int = 0
    line: int = 0
    record_id: str = ""
    experiment: str = ""
    run_name: str | None = None
    start_time: int = 0
    end_time: int | None = None
    status: str = "RUNNING"
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[Metric]] = field(default_factory=dict)
    latest: dict[str, Metric] = field(default_factory=dict)
    datasets: list[DatasetInput] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # model_id -> last event

    def refresh(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        for raw in data[:end].split(b"\n")[:-1]:
            self.line += 1
            try:
                event = parse_line(raw, line=self.line, path=str(self.path))
            except RecordError:
                continue
            self._fold(event.type, event.ts, event.fields)
        self.offset += end

    def _fold(self, etype: str, ts: int, f: dict[str, Any]) -> None:
        if etype == "run_started":
            self.record_id = f["record_id"]
            self.experiment = f["experiment"] or ""
            self.run_name = f["run_name"]
            self.start_time = ts
            self.tags.update(f["tags"])
            if f["run_name"]:
                self.tags[MLFLOW_RUN_NAME] = f["run_name"]
            if f["parent_record_id"]:
                self.tags[MLFLOW_PARENT_RUN_ID] = f["parent_record_id"]
            if f["description"]:
                self.tags["mlflow.note.content"] = f["description"]
        elif etype == "params":
            for key, value in f["params"].items():
                self.params.setdefault(key, value)
        elif etype == "metrics":
            step = f["step"]
            for key, value in f["metrics"].items():
                metric = Metric(key, value, ts, step)
                self.history.setdefault(key, []).append(metric)
                last = self.latest.get(key)
                if last is None or (step, ts) >= (last.step, last.timestamp):
                    self.latest[key] = metric
        elif etype == "tags":
            self.tags.update(f["tags"])
            if MLFLOW_RUN_NAME in f["tags"]:
                self.run_name = f["tags"][MLFLOW_RUN_NAME]
        elif etype == "tag_deleted":
            self.tags.pop(f["key"], None)
        elif etype == "dataset":
            tags = [InputTag(CONTEXT_TAG, f["context"])] if f["context"] else []
            digest = f["digest"] or ""
            source = json.dumps({"uri": f["source"]})
            dataset = Dataset(f["name"], digest, _source_type(f["source"]), source)
            self.datasets.append(DatasetInput(dataset, tags))
        elif etype == "model":
            self.models[f["model_id"]] = {**f, "ts": ts}
        elif etype == "run_resumed":
            self.status, self.end_time = "RUNNING", None
        elif etype == "run_finished":
            self.status, self.end_time = f["status"], ts


def _source_type(source: str) -> str:
    from syncd.projection import dataset_source_type

    return dataset_source_type(source)


class _Run:
    """A run this process writes or reads: its directory, writer and view."""

    def __init__(self, record_id: str, run_dir: Path, experiment_id: str) -> None:
        self.record_id = record_id
        self.run_dir = run_dir
        self.experiment_id = experiment_id
        self.writer = RecordWriter(run_dir / RECORD_FILENAME)
        self.view = _RunView(run_dir / RECORD_FILENAME)
        self.lock = threading.RLock()
        self.params: dict[str, str] | None = None  # what was logged, once known
        self.models: dict[str, _Model] = {}  # models this process logs to the run
        # start time, name, status, end time and user as this process wrote them: ending
        # a run answers from these, never by reading back the whole record.
        self.info: dict[str, Any] | None = None

    def run_info(self) -> dict[str, Any]:
        if self.info is None:
            self.view.refresh()
            self.info = {
                "start_time": self.view.start_time,
                "run_name": self.view.run_name,
                "status": self.view.status,
                "end_time": self.view.end_time,
                "user": self.view.tags.get(MLFLOW_USER, ""),
            }
        return self.info

    @property
    def artifact_uri(self) -> str:
        return (self.run_dir / ARTIFACTS_FOLDER).as_uri()

    def ensure_open(self) -> None:
        """Open the writer (again, after the run ended) to append more events."""
        if not self.writer.is_open:
            existing = self.writer.open()
            if existing is None or existing[0] != self.record_id:
                self.writer.close(fsync=False)
                raise MlflowException(
                    f"record {self.writer.path} no longer belongs to run {self.record_id}",
                    INVALID_STATE,
                )

    def known_params(self) -> dict[str, str]:
        if self.params is None:
            with self.lock:
                self.view.refresh()
                self.params = dict(self.view.params)
        return self.params


@dataclass
class _Model:
    """A LoggedModel of a run: files under ``<run dir>/models/<id>/``, a ``model`` event."""

    model_id: str
    name: str
    run_id: str
    experiment_id: str
    folder: Path
    created: int
    updated: int
    model_type: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    status: str = "PENDING"
    step: int = 0
    registered_model_name: str | None = None
    recorded: bool = False  # a model event was written: later changes write another

    @classmethod
    def from_event(cls, f: dict[str, Any], run: _Run) -> _Model:
        return cls(
            model_id=f["model_id"],
            name=f["name"],
            run_id=run.record_id,
            experiment_id=run.experiment_id,
            folder=run.run_dir / f["path"],
            created=f["ts"],
            updated=f["ts"],
            model_type=f["model_type"],
            params=dict(f["params"]),
            tags=dict(f["tags"]),
            status=f["status"],
            step=f["step"],
            registered_model_name=f["registered_model_name"],
            recorded=True,
        )

    def entity(self) -> LoggedModel:
        return LoggedModel(
            experiment_id=self.experiment_id,
            model_id=self.model_id,
            name=self.name,
            artifact_location=self.folder.as_uri(),
            creation_timestamp=self.created,
            last_updated_timestamp=self.updated,
            model_type=self.model_type,
            source_run_id=self.run_id,
            status=LoggedModelStatus(self.status),
            tags=dict(self.tags),
            params=dict(self.params),
        )

    def event_fields(self, run_dir: Path) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "model_id": self.model_id,
            "name": self.name,
            "path": self.folder.relative_to(run_dir).as_posix(),
            "flavors": _flavors_of(self.folder),
            "params": self.params,
            "tags": self.tags,
            "status": self.status,
            "step": self.step,
        }
        if self.model_type:
            fields["model_type"] = self.model_type
        if self.registered_model_name:
            fields["registered_model_name"] = self.registered_model_name
        return fields


def _flavors_of(folder: Path) -> list[str]:
    from syncd.record.recorder import _flavors

    return _flavors(folder)


def _refuse(name: str) -> Callable[..., Any]:
    hint = _HINTS.get(name, _SERVER_HINT)

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise MlflowException(f"{name} is not supported by the syncd: tracking store: {hint}")

    refused.__name__ = name
    refused.__qualname__ = f"SyncdStore.{name}"
    refused._syncd_refused = True  # type: ignore[attr-defined]
    return refused


# AbstractStore methods whose inherited bodies only delegate to methods implemented here.
INHERITED = frozenset(
    {
        "log_metric",
        "log_param",
        "set_tag",
        "log_metric_async",
        "log_param_async",
        "set_tag_async",
        "log_batch_async",
        "end_async_logging",
        "flush_async_logging",
        "shut_down_async_logging",
        "search_runs",
        "supports_workspaces",
        "supports_trace_archival",
    }
)


class SyncdStore(AbstractStore):
    """An MLflow tracking store that writes run records under one root folder."""

    def __init__(self, root: Path, s3: tuple[str, str] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.root = root
        self.experiments = _Experiments(root, derived_ids=s3 is not None)
        self.uploader: SpoolUploader | None = None
        if s3 is not None:
            self.uploader = SpoolUploader(
                root, *s3, interval=env_seconds("SYNCD_UPLOAD_INTERVAL", DEFAULT_INTERVAL)
            )
            self.uploader.start()
            atexit.register(self.flush_uploads)
        # names this process was told are absent, and when (see the module docstring)
        self._absent: dict[str, float] = {}
        self._absent_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._runs_lock = threading.Lock()
        self._model_runs: dict[str, str] = {}  # model id -> run id

    def flush_uploads(self) -> bool:
        """S3 roots: upload what the spool holds, waiting at most ``SYNCD_UPLOAD_TIMEOUT`` s.

        True when everything is uploaded; False (logged, never raised) when S3
        could not be reached in time: the spool keeps it for a later upload.
        """
        if self.uploader is None:
            return True
        timeout = env_seconds("SYNCD_UPLOAD_TIMEOUT", DEFAULT_FLUSH_TIMEOUT)
        ok = self.uploader.flush(timeout)
        if not ok:
            _log.warning(
                "syncd: run records under %s not uploaded to s3://%s/%s within %ss (%s);"
                " the spool keeps them for the next upload",
                self.root,
                self.uploader.bucket,
                self.uploader.prefix,
                timeout,
                self.uploader.last_error or "still uploading",
            )
        return ok

    # -- experiments ---------------------------------------------------------------

    def _experiment(self, experiment_id: str, info: dict[str, Any]) -> Experiment:
        return Experiment(
            experiment_id=experiment_id,
            name=info["name"],
            artifact_location=(self.root / info["dir"]).as_uri(),
            lifecycle_stage=LifecycleStage.ACTIVE,
            tags=[ExperimentTag(k, v) for k, v in info.get("tags", {}).items()],
            creation_time=info.get("creation_time"),
            last_update_time=info.get("creation_time"),
        )

    def create_experiment(
        self, name: str, artifact_location: str | None = None, tags: list[Any] | None = None
    ) -> str:
        _validate_experiment_name(name)  # type: ignore[no-untyped-call]
        if artifact_location:
            raise MlflowException(
                "create_experiment: the syncd: tracking store keeps artifacts in each run's"
                " directory; create the experiment without artifact_location",
                INVALID_PARAMETER_VALUE,
            )
        exp_id, created = self.experiments.create(name, {t.key: t.value for t in tags or []})
        with self._absent_lock:
            told_absent = self._absent.pop(name, None)
        if not created and told_absent is not None and time.monotonic() - told_absent < RACE_S:
            return exp_id
        if not created:
            raise MlflowException(
                f"Experiment(name={name}) already exists.", RESOURCE_ALREADY_EXISTS
            )
        return exp_id

    def get_experiment(self, experiment_id: str) -> Experiment:
        info = self.experiments.by_id(str(experiment_id))
        if info is None:
            raise _no_experiment(str(experiment_id))
        return self._experiment(str(experiment_id), info)

    def get_experiment_by_name(self, experiment_name: str) -> Experiment | None:
        exp_id = self.experiments.id_of(experiment_name)
        if exp_id is None:
            with self._absent_lock:
                self._absent[experiment_name] = time.monotonic()
            return None
        return self.get_experiment(exp_id)

    def search_experiments(
        self,
        view_type: int = ViewType.ACTIVE_ONLY,
        max_results: int = 1000,
        filter_string: str | None = None,
        order_by: list[str] | None = None,
        page_token: str | None = None,
    ) -> PagedList[Experiment]:
        if filter_string or order_by or page_token:
            raise MlflowException(
                "search_experiments: the syncd: tracking store lists experiments without"
                " filter_string, order_by or page_token; search the mirrored tracking store",
                INVALID_PARAMETER_VALUE,
            )
        exps = [self._experiment(i, e) for i, e in sorted(self.experiments.all().items())]
        if view_type == ViewType.DELETED_ONLY:
            exps = []
        return PagedList(exps[:max_results], None)

    def set_experiment_tag(self, experiment_id: str, tag: ExperimentTag) -> None:
        self.experiments.set_tag(str(experiment_id), tag.key, tag.value)

    # -- runs ------------------------------------------------------------------------

    def delete_tag(self, run_id: str, key: str) -> None:
        """A ``tag_deleted`` event; like MLflow's stores, a tag that is not set is an error."""
        run = self._run(run_id)
        with run.lock:
            run.view.refresh()
            if key not in run.view.tags:
                raise MlflowException(
                    f"No tag with name: {key} in run with id {run_id}", RESOURCE_DOES_NOT_EXIST
                )
            run.ensure_open()
            run.writer.write("tag_deleted", {"key": key})

    def _run(self, run_id: str) -> _Run:
        with self._runs_lock:
            run = self._runs.get(run_id)
        if run is not None:
            return run
        found = self._find_run_dir(run_id)
        if found is None:
            raise MlflowException(
                f"Run {run_id!r} not found under the syncd: root {self.root}",
                RESOURCE_DOES_NOT_EXIST,
            )
        run_dir, exp_id = found
        with self._runs_lock:
            return self._runs.setdefault(run_id, _Run(run_id, run_dir, exp_id))

    def _find_run_dir(self, run_id: str) -> tuple[Path, str] | None:
        if not re.fullmatch(r"[0-9a-f]{32}", run_id):
            return None
        for exp_id, info in self.experiments.all().items():
            for path in (self.root / info["dir"]).glob(f"*-{run_id[:8]}*/{RECORD_FILENAME}"):
                try:
                    with open(path, "rb") as fh:
                        first = json.loads(fh.readline())
                except (OSError, ValueError):
                    continue
                if isinstance(first, dict) and first.get("record_id") == run_id:
                    return path.parent, exp_id
        return None

    def create_run(
        self,
        experiment_id: str | None,
        user_id: str | None,
        start_time: int | None,
        tags: list[RunTag] | None,
        run_name: str | None,
    ) -> Run:
        exp_id = DEFAULT_EXPERIMENT_ID if experiment_id is None else str(experiment_id)
        info = self.experiments.by_id(exp_id)
        if info is None:
            raise MlflowException(
                f"Could not create run under experiment with ID {exp_id} - no such experiment"
                " exists.",
                RESOURCE_DOES_NOT_EXIST,
            )
        tag_map = {t.key: t.value for t in tags or []}
        name_tag = tag_map.pop(MLFLOW_RUN_NAME, None)
        if run_name and name_tag and run_name != name_tag:
            raise MlflowException(
                "Both 'run_name' argument and 'mlflow.runName' tag are specified, but with"
                f" different values (run_name='{run_name}', mlflow.runName='{name_tag}').",
                INVALID_PARAMETER_VALUE,
            )
        run_name = run_name or name_tag or _generate_random_name()  # type: ignore[no-untyped-call]
        parent = tag_map.pop(MLFLOW_PARENT_RUN_ID, None)
        if user_id and MLFLOW_USER not in tag_map:
            tag_map[MLFLOW_USER] = user_id
        _validate_batch_log_data([], [], [RunTag(k, v) for k, v in tag_map.items()])  # type: ignore[no-untyped-call]
        record_id = uuid.uuid4().hex
        run_dir = self.root / info["dir"] / f"{_slug(run_name)}-{record_id[:8]}"
        if run_dir.exists():
            run_dir = run_dir.with_name(f"{_slug(run_name)}-{record_id}")
        run = _Run(record_id, run_dir, exp_id)
        fields: dict[str, Any] = {
            "record_id": record_id,
            "experiment": info["name"],
            "run_name": run_name,
            "tags": tag_map,
        }
        if parent:
            fields["parent_record_id"] = parent
        if run.writer.open() is not None:
            run.writer.close(fsync=False)
            raise MlflowException(f"run directory {run_dir} already holds a record", INVALID_STATE)
        ts = _now_ms() if start_time is None else start_time
        run.writer.write("run_started", fields, ts=ts)
        run.params = {}
        run.info = {
            "start_time": ts,
            "run_name": run_name,
            "status": "RUNNING",
            "end_time": None,
            "user": tag_map.get(MLFLOW_USER, ""),
        }
        with self._runs_lock:
            self._runs[record_id] = run
        return self.get_run(record_id)

    def get_run(self, run_id: str) -> Run:
        run = self._run(run_id)
        with run.lock:
            view = run.view
            view.refresh()
            info = RunInfo(
                run_id=run_id,
                experiment_id=run.experiment_id,
                user_id=view.tags.get(MLFLOW_USER, ""),
                status=view.status,
                start_time=view.start_time,
                end_time=view.end_time,
                lifecycle_stage=LifecycleStage.ACTIVE,
                artifact_uri=run.artifact_uri,
                run_name=view.run_name,
            )
            data = RunData(
                metrics=list(view.latest.values()),
                params=[Param(k, v) for k, v in view.params.items()],
                tags=[RunTag(k, v) for k, v in view.tags.items()],
            )
            inputs = RunInputs(dataset_inputs=list(view.datasets))
        return Run(run_info=info, run_data=data, run_inputs=inputs)

    def log_batch(
        self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]
    ) -> None:
        _validate_batch_log_limits(metrics, params, tags)  # type: ignore[no-untyped-call]
        metrics, params, tags = _validate_batch_log_data(metrics, params, tags)  # type: ignore[no-untyped-call]
        run = self._run(run_id)
        with run.lock:
            if any(getattr(m, "model_id", None) for m in metrics):
                metrics = self._without_model_copies(run, metrics)
            known = run.known_params()
            new_params: dict[str, str] = {}
            for p in params:
                value = str(p.value)
                seen = known.get(p.key, new_params.get(p.key))
                if seen is None:
                    new_params[p.key] = value
                elif seen != value:
                    raise MlflowException(
                        f"Changing param values is not allowed. Param with key='{p.key}' was"
                        f" already logged with value='{seen}' for run ID='{run_id}'."
                        f" Attempted logging new value '{value}'.",
                        INVALID_PARAMETER_VALUE,
                    )
            run.ensure_open()
            write = run.writer.write
            if new_params:
                write("params", {"params": new_params})
                known.update(new_params)
            group: dict[str, float | str] = {}
            group_key: tuple[int, int, str | None] | None = None

            def write_group() -> None:
                if group and group_key is not None:
                    fields: dict[str, Any] = {"step": group_key[1], "metrics": group}
                    if group_key[2]:
                        fields["model_id"] = group_key[2]
                    write("metrics", fields, ts=group_key[0])

            for m in metrics:
                key = (int(m.timestamp), int(m.step), getattr(m, "model_id", None) or None)
                if key != group_key or m.key in group:
                    write_group()
                    group, group_key = {}, key
                group[m.key] = _metric_value(m.key, m.value)
            write_group()
            if tags:
                tag_map = {t.key: str(t.value) for t in tags}
                write("tags", {"tags": tag_map})
                if MLFLOW_RUN_NAME in tag_map and run.info is not None:
                    run.info["run_name"] = tag_map[MLFLOW_RUN_NAME]

    @staticmethod
    def _without_model_copies(run: _Run, metrics: list[Metric]) -> list[Metric]:
        """``log_model`` logs the run's points again, linked to the model: not new points."""
        run.view.refresh()
        kept = []
        for m in metrics:
            if m.model_id:
                points = run.view.history.get(m.key, [])
                if any(
                    (p.timestamp, p.step, p.value) == (m.timestamp, m.step, m.value) for p in points
                ):
                    continue
            kept.append(m)
        return kept

    def log_inputs(
        self,
        run_id: str,
        datasets: list[DatasetInput] | None = None,
        models: list[Any] | None = None,
    ) -> None:
        if models:
            raise MlflowException(
                "log_inputs: model inputs (LoggedModelInput) are not recorded by the syncd:"
                " tracking store yet; log datasets only"
            )
        run = self._run(run_id)
        with run.lock:
            run.ensure_open()
            for ds_input in datasets or []:
                ds = ds_input.dataset
                fields: dict[str, Any] = {
                    "name": ds.name,
                    "source": _dataset_uri(ds.source, ds.source_type),
                    "digest": ds.digest,
                }
                context = next((t.value for t in ds_input.tags if t.key == CONTEXT_TAG), None)
                if context is not None:
                    fields["context"] = context
                run.writer.write("dataset", fields)

    def update_run_info(
        self, run_id: str, run_status: Any, end_time: int | None, run_name: str | None
    ) -> RunInfo:
        status = run_status if isinstance(run_status, str) else RunStatus.to_string(run_status)
        run = self._run(run_id)
        try:
            return self._update_run_info(run, run_id, status, end_time, run_name)
        finally:
            if status in _FINAL:
                self.flush_uploads()

    def _update_run_info(
        self, run: _Run, run_id: str, status: str, end_time: int | None, run_name: str | None
    ) -> RunInfo:
        with run.lock:
            info = run.run_info()
            run.ensure_open()
            if run_name and run_name != info["run_name"]:
                _validate_batch_log_data([], [], [RunTag(MLFLOW_RUN_NAME, run_name)])  # type: ignore[no-untyped-call]
                run.writer.write("tags", {"tags": {MLFLOW_RUN_NAME: run_name}})
                info["run_name"] = run_name
            if status in _FINAL:
                self._record_artifacts(run)
                ts = _now_ms() if end_time is None else int(end_time)
                run.writer.write("run_finished", {"status": status}, ts=ts)
                run.writer.close(fsync=True)
                info["status"], info["end_time"] = status, ts
            elif status == "RUNNING" and info["status"] in _FINAL:
                run.writer.write("run_resumed", {})
                info["status"], info["end_time"] = "RUNNING", None
            return RunInfo(
                run_id=run_id,
                experiment_id=run.experiment_id,
                user_id=info["user"],
                status=info["status"],
                start_time=info["start_time"],
                end_time=info["end_time"],
                lifecycle_stage=LifecycleStage.ACTIVE,
                artifact_uri=run.artifact_uri,
                run_name=info["run_name"],
            )

    def _record_artifacts(self, run: _Run) -> None:
        """An ``artifact`` event for every file MLflow wrote into the run's artifacts folder."""
        folder = run.run_dir / ARTIFACTS_FOLDER
        if not folder.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            rel = Path(dirpath).relative_to(folder).as_posix()
            for name in sorted(filenames):
                fields: dict[str, Any] = {"path": f"{ARTIFACTS_FOLDER}/{rel}/{name}"}
                if rel == ".":
                    fields["path"] = f"{ARTIFACTS_FOLDER}/{name}"
                else:
                    fields["artifact_path"] = rel
                run.writer.write("artifact", fields)

    def get_metric_history(
        self,
        run_id: str,
        metric_key: str,
        max_results: int | None = None,
        page_token: str | None = None,
    ) -> PagedList[Metric]:
        if page_token:
            raise MlflowException(
                "get_metric_history: the syncd: tracking store returns the whole history"
                " in one page; call it without page_token",
                INVALID_PARAMETER_VALUE,
            )
        run = self._run(run_id)
        with run.lock:
            run.view.refresh()
            points = list(run.view.history.get(metric_key, []))
        if max_results is not None:
            points = points[:max_results]
        return PagedList(points, None)

    def _search_runs(
        self,
        experiment_ids: list[str],
        filter_string: str | None,
        run_view_type: int,
        max_results: int,
        order_by: list[str] | None,
        page_token: str | None,
    ) -> tuple[list[Run], str | None]:
        if filter_string or order_by or page_token:
            raise MlflowException(
                "search_runs: the syncd: tracking store lists the runs of experiments without"
                " filter_string, order_by or page_token; search the mirrored tracking store"
                " for anything else",
                INVALID_PARAMETER_VALUE,
            )
        if run_view_type == ViewType.DELETED_ONLY:
            return [], None
        runs: list[Run] = []
        all_exps = self.experiments.all()
        for exp_id in experiment_ids:
            info = all_exps.get(str(exp_id))
            if info is None:
                continue
            for path in (self.root / info["dir"]).glob(f"*/{RECORD_FILENAME}"):
                try:
                    with open(path, "rb") as fh:
                        first = json.loads(fh.readline())
                    record_id = str(first["record_id"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                with self._runs_lock:
                    self._runs.setdefault(record_id, _Run(record_id, path.parent, str(exp_id)))
                runs.append(self.get_run(record_id))
        runs.sort(key=lambda r: (-r.info.start_time, r.info.run_id))
        return runs[:max_results], None

    # -- logged models (what mlflow.<flavor>.log_model calls) ------------------------

    def create_logged_model(
        self,
        experiment_id: str = DEFAULT_EXPERIMENT_ID,
        name: str | None = None,
        source_run_id: str | None = None,
        tags: list[LoggedModelTag] | None = None,
        params: list[LoggedModelParameter] | None = None,
        model_type: str | None = None,
    ) -> LoggedModel:
        """A PENDING model whose files go to ``<run dir>/models/<id>/``; recorded when final."""
        if not source_run_id:
            raise MlflowException(
                "create_logged_model: the syncd: tracking store records models of runs;"
                " log the model inside a run (mlflow.start_run())",
                INVALID_PARAMETER_VALUE,
            )
        _validate_logged_model_name(name)
        run = self._run(source_run_id)
        if str(experiment_id) != run.experiment_id:
            raise MlflowException(
                f"create_logged_model: run {source_run_id} belongs to experiment"
                f" {run.experiment_id}, not {experiment_id}",
                INVALID_PARAMETER_VALUE,
            )
        model_id = f"m-{uuid.uuid4().hex}"
        now = _now_ms()
        model = _Model(
            model_id=model_id,
            name=name or _generate_random_name(),  # type: ignore[no-untyped-call]
            run_id=run.record_id,
            experiment_id=run.experiment_id,
            folder=run.run_dir / MODELS_FOLDER / model_id,
            created=now,
            updated=now,
            model_type=model_type,
            params={p.key: str(p.value) for p in params or []},
            tags={t.key: str(t.value) for t in tags or []},
        )
        model.folder.mkdir(parents=True, exist_ok=True)
        with run.lock:
            run.models[model_id] = model
        with self._runs_lock:
            self._model_runs[model_id] = run.record_id
        return model.entity()

    def _model(self, model_id: str) -> tuple[_Run, _Model]:
        with self._runs_lock:
            run_id = self._model_runs.get(model_id)
        if run_id is None:
            found = self._find_model_run(model_id)
            if found is None:
                raise MlflowException(
                    f"Logged model {model_id!r} not found under the syncd: root {self.root}",
                    RESOURCE_DOES_NOT_EXIST,
                )
            run_id = found
        run = self._run(run_id)
        with run.lock:
            model = run.models.get(model_id)
            if model is None:
                run.view.refresh()
                event = run.view.models.get(model_id)
                if event is None:
                    raise MlflowException(
                        f"Logged model {model_id!r} not found", RESOURCE_DOES_NOT_EXIST
                    )
                model = run.models[model_id] = _Model.from_event(event, run)
        return run, model

    def _find_model_run(self, model_id: str) -> str | None:
        """The run whose record holds a model event for ``model_id`` (a scan of the root)."""
        needle = f'"model_id":"{model_id}"'.encode()
        for path in self.root.glob(f"*/*/{RECORD_FILENAME}"):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if needle in data:
                first = json.loads(data[: data.find(b"\n")])
                record_id = str(first["record_id"])
                with self._runs_lock:
                    self._model_runs[model_id] = record_id
                return record_id
        return None

    def _record_model(self, run: _Run, model: _Model) -> None:
        """Append the model's current state as a ``model`` event (the last one wins)."""
        run.ensure_open()
        model.updated = _now_ms()
        run.writer.write("model", model.event_fields(run.run_dir), ts=model.updated)
        model.recorded = True

    def get_logged_model(self, model_id: str, allow_deleted: bool = False) -> LoggedModel:
        run, model = self._model(model_id)
        with run.lock:
            return model.entity()

    def log_outputs(self, run_id: str, models: list[Any]) -> None:
        run = self._run(run_id)
        for output in models:
            owner, model = self._model(output.model_id)
            if owner is not run:
                raise MlflowException(
                    f"log_outputs: the syncd: tracking store records a model as an output of"
                    f" the run that logged it ({owner.record_id}), not of run {run_id}",
                    INVALID_PARAMETER_VALUE,
                )
            with run.lock:
                model.step = int(output.step or 0)
                if model.recorded:
                    self._record_model(run, model)

    def finalize_logged_model(self, model_id: str, status: Any) -> LoggedModel:
        run, model = self._model(model_id)
        text = status.value if isinstance(status, LoggedModelStatus) else str(status)
        if text not in ("READY", "FAILED"):
            raise MlflowException(
                f"finalize_logged_model: status must be READY or FAILED, not {text}",
                INVALID_PARAMETER_VALUE,
            )
        with run.lock:
            model.status = text
            self._record_model(run, model)
            return model.entity()

    def set_logged_model_tags(self, model_id: str, tags: list[LoggedModelTag]) -> None:
        run, model = self._model(model_id)
        with run.lock:
            # The mirror's registration sets mlflow.modelVersions with the real version.
            changes = {t.key: str(t.value) for t in tags if t.key != MODEL_VERSIONS_TAG}
            if not changes:
                return
            model.tags.update(changes)
            if model.recorded:
                self._record_model(run, model)

    def delete_logged_model_tag(self, model_id: str, key: str) -> None:
        run, model = self._model(model_id)
        with run.lock:
            if key not in model.tags:
                raise MlflowException(
                    f"No tag with key {key!r} found for model with ID {model_id!r}.",
                    RESOURCE_DOES_NOT_EXIST,
                )
            del model.tags[key]
            if model.recorded:
                self._record_model(run, model)

    def log_logged_model_params(self, model_id: str, params: list[LoggedModelParameter]) -> None:
        run, model = self._model(model_id)
        with run.lock:
            model.params.update({p.key: str(p.value) for p in params})
            if model.recorded:
                self._record_model(run, model)

    def register_model_version(self, model_id: str, registered_model_name: str) -> None:
        """Ask the daemon to register the model as a version of ``registered_model_name``."""
        run, model = self._model(model_id)
        with run.lock:
            model.registered_model_name = registered_model_name
            self._record_model(run, model)


def _dataset_uri(source: str, source_type: str) -> str:
    """The URI a dataset event records for an MLflow dataset source (a JSON document)."""
    try:
        doc = json.loads(source)
    except ValueError:
        return source
    if isinstance(doc, dict):
        for key in ("uri", "url", "path", "table_name"):
            value = doc.get(key)
            if isinstance(value, str) and value:
                return value
    return source_type or source


def _install_refusals() -> None:
    """Every public AbstractStore method not served here raises MlflowException."""
    for name in dir(AbstractStore):
        if name.startswith("_") or name in INHERITED or name in SyncdStore.__dict__:
            continue
        if callable(getattr(AbstractStore, name, None)):
            setattr(SyncdStore, name, _refuse(name))


_install_refusals()
