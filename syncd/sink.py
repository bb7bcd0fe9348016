"""The MLflow sink: applies a write plan through ``MlflowClient`` (never the fluent API).

Everything MLflow-specific at run time lives here: experiment get-or-create
that survives a concurrent create, run adoption by the ``syncd.record_id`` tag
(so a lost ledger or a crash between "run created" and "checkpoint committed"
never duplicates a run), retries with backoff for transient failures, and an
interprocess lock around writes to a SQLite store so several syncd processes
never contend for it. MLflow, SQLAlchemy, requests and botocore errors are
mapped to the syncd error tree here, in one place.
"""

from __future__ import annotations

import fcntl
import gc
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from syncd.artifacts import ArtifactRefused, ResolvedArtifact, staged
from syncd.errors import PermanentSinkError, RecordError, SinkError, TransientSinkError
from syncd.projection import (
    MAX_PARAMS_TAGS_PER_BATCH,
    PARENT_RUN_TAG,
    RECORD_ID_TAG,
    Batch,
    Entry,
    MetricPoint,
    RunSpec,
    WritePlan,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = structlog.get_logger("syncd.sink")
T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
_TRANSIENT_TEXT = ("database is locked", "database table is locked", "Connection refused")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped; ``attempts`` tries in all."""

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(slots=True)
class ApplyResult:
    run_id: str
    experiment_id: str
    created: bool
    problems: list[RecordError] = field(default_factory=list)
    uploaded: dict[str, str] = field(default_factory=dict)  # artifact key -> digest


def classify(exc: BaseException) -> SinkError:
    """Map an MLflow / SQLAlchemy / HTTP / S3 error to a transient or permanent SinkError."""
    if isinstance(exc, SinkError):
        return exc
    text = str(exc)
    name = type(exc).__name__
    module = type(exc).__module__
    code = getattr(exc, "error_code", None)
    if any(t in text for t in _TRANSIENT_TEXT):
        return TransientSinkError(text)
    if code is not None:  # MlflowException and RestException
        if code in _TRANSIENT_CODES:
            return TransientSinkError(text)
        return PermanentSinkError(text)
    if module.startswith(("requests", "urllib3", "botocore", "boto3")) or name in (
        "OperationalError",
        "TimeoutError",
        "ConnectionError",
    ):
        return TransientSinkError(f"{name}: {text}")
    if isinstance(exc, OSError):
        return TransientSinkError(f"{name}: {text}")
    return PermanentSinkError(f"{name}: {text}")


def is_sqlite_uri(uri: str) -> bool:
    return uri.startswith("sqlite:")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return Path(path) if path and path != ":memory:" else None


def default_artifact_root(tracking_uri: str) -> str | None:
    """Where artifacts of a SQLite store go: ``mlartifacts`` beside the database.

    MLflow's own default is ``./mlruns`` of whatever folder the process runs in.
    """
    db = sqlite_path(tracking_uri)
    return str(db.absolute().parent / "mlartifacts") if db else None


@contextmanager
def _anchored_artifacts(root: str | None) -> Iterator[None]:
    """Build a SQLite store whose default artifact root (experiment 0's) is ``root``.

    MLflow reads the root for stores built without one from this variable
    (``_get_sqlalchemy_store``); it is set only while the client is built.
    """
    name = "_MLFLOW_SERVER_ARTIFACT_ROOT"
    if root is None or name in os.environ:
        yield
        return
    os.environ[name] = root
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _folder_name(experiment: str) -> str:
    """A readable, unique folder name for an experiment's artifacts."""
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment).strip("-.")[:60] or "experiment"
    return f"{slug}-{hashlib.sha256(experiment.encode()).hexdigest()[:8]}"


MIN_UPLOAD_BYTES_PER_S = 1024 * 1024


def _size_of(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


class Bounded(Protocol):
    def __call__(self, what: str, seconds: float) -> AbstractContextManager[None]: ...


@contextmanager
def unbounded(what: str, seconds: float) -> Iterator[None]:
    """No supervisor: calls are bounded by their own timeouts only."""
    yield


class _FileLock:
    """An interprocess lock (flock) beside a SQLite store; re-entrant within a thread.

    Waiting for it is bounded: past ``timeout`` the write is a transient failure
    (the record waits and is retried) instead of a daemon that hangs.
    """

    def __init__(self, path: Path, timeout: float = 300.0) -> None:
        self.path = path
        self.timeout = timeout
        self._local = threading.RLock()
        self._fd: int | None = None
        self._depth = 0
        self._owner: int | None = None

    @property
    def owned(self) -> bool:
        return self._owner == threading.get_ident() and self._depth > 0

    def acquire_within(self) -> None:
        """Take the lock (one level), polling up to ``timeout``; TransientSinkError after."""
        self._local.acquire()
        try:
            if self._depth == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                deadline = time.monotonic() + self.timeout
                delay = 0.005
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            os.close(fd)
                            raise TransientSinkError(
                                f"the store lock {self.path} was held by another process"
                                f" for over {self.timeout:.0f}s"
                            ) from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.25)
                self._fd = fd
                self._owner = threading.get_ident()
            self._depth += 1
        except BaseException:
            self._local.release()
            raise

    def release_once(self) -> None:
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
                self._owner = None
        finally:
            self._local.release()

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire_within()
        try:
            yield
        finally:
            self.release_once()


class MlflowSink:
    """Applies write plans to one MLflow tracking URI."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        retry: RetryPolicy | None = None,
        artifact_root: str | None = None,
        call_deadline: float = 35.0,
        lock_timeout: float = 300.0,
        bounded: Bounded | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.retry = retry or RetryPolicy()
        # Every MLflow call runs under ``bounded(what, seconds)``: the daemon's
        # supervisor keeps the watchdog fed while a call is within its deadline.
        self.bounded: Bounded = bounded or unbounded
        self.call_deadline = call_deadline
        self._client: MlflowClient | None = None
        self._experiments: dict[str, str] = {}
        # Experiments this sink created: they hold no runs but the ones it made itself,
        # so a record without a ledger mapping needs no adoption search there, unless
        # a create of that record failed or went unanswered (``_uncertain``).
        self._created_experiments: set[str] = set()
        self._uncertain: set[str] = set()
        db = sqlite_path(tracking_uri)
        self._lock = (
            _FileLock(db.with_name(db.name + ".syncd-lock"), timeout=lock_timeout) if db else None
        )
        self.artifact_root = artifact_root or default_artifact_root(tracking_uri)
        self._retries = 0
        self._heap_frozen = False
        if self.artifact_root:
            log.info("artifact_root", path=self.artifact_root)

    # -- plumbing ------------------------------------------------------------------

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            # syncd retries itself (with backoff it controls) and owns the log format.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
            from mlflow.tracking import MlflowClient

            def build() -> MlflowClient:
                db = sqlite_path(self.tracking_uri)
                if db is not None:
                    from syncd.store_schema import create_store

                    if create_store(db):
                        log.info("store_created", store=str(db))
                self.check_schema()
                with _anchored_artifacts(self.artifact_root):
                    return MlflowClient(tracking_uri=self.tracking_uri)

            # Building the client opens (and for a new SQLite store, creates) the store:
            # its errors are sink errors like any call's.
            with self._serialised():
                self._client = self._call("open tracking store", build)
        return self._client

    @contextmanager
    def _serialised(self) -> Iterator[None]:
        if self._lock is None:
            yield
            return
        if self._lock.owned:  # re-entered: no wait
            self._lock.acquire_within()
        else:
            with self.bounded("waiting for the store lock", self._lock.timeout + 5):
                self._lock.acquire_within()
        try:
            yield
        finally:
            self._lock.release_once()

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call MLflow, retrying transient failures with backoff; raise SinkError otherwise."""
        attempt = 0
        while True:
            try:
                with self.bounded(what, self.call_deadline):
                    return fn(*args, **kwargs)
            except Exception as exc:
                err = classify(exc)
                if isinstance(err, PermanentSinkError) or attempt + 1 >= self.retry.attempts:
                    raise err from exc
                self._note_retry(what, attempt, err)
                attempt += 1

    def _note_retry(self, what: str, attempt: int, err: SinkError) -> None:
        """Log and count a retry, then wait out its backoff."""
        delay = self.retry.delay(attempt)
        log.warning(
            "sink_retry",
            call=what,
            attempt=attempt + 1,
            delay_s=round(delay, 3),
            error=str(err)[:300],
        )
        self._retries += 1
        time.sleep(delay)

    def check_schema(self) -> None:
        """StoreSchemaError unless a SQLite store is fresh or at this MLflow's schema."""
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            from syncd.store_schema import check_store

            check_store(db)

    def upgrade_store(self) -> Path | None:
        """Back up and migrate an older SQLite store (the backup's path, or None)."""
        db = sqlite_path(self.tracking_uri)
        if db is None:
            return None
        from syncd.store_schema import upgrade_store

        with self._serialised():
            backup = upgrade_store(db)
        if backup is not None:
            log.warning("store_upgraded", store=str(db), backup=str(backup))
        return backup

    def check(self) -> None:
        """Raise SinkError unless the tracking store answers (used for readiness)."""
        with self._serialised():
            self._call("search_experiments", self.client.search_experiments, max_results=1)

    def take_retries(self) -> int:
        """Calls retried since the last time this was asked (for the retries counter)."""
        count, self._retries = self._retries, 0
        return count

    # -- experiments and runs --------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        cached = self._experiments.get(name)
        if cached is not None:
            return cached
        from mlflow.entities import LifecycleStage

        exp = self._call("get_experiment_by_name", self.client.get_experiment_by_name, name)
        if exp is None:
            try:
                location = (
                    f"{self.artifact_root.rstrip('/')}/{_folder_name(name)}"
                    if self.artifact_root
                    else None
                )
                exp_id = self.client.create_experiment(name, artifact_location=location)
                self._created_experiments.add(str(exp_id))
            except Exception as exc:
                err = classify(exc)
                if isinstance(err, TransientSinkError):
                    raise err from exc
                # Someone else created it between our lookup and create: use theirs.
                exp = self._call("get_experiment_by_name", self.client.get_experiment_by_name, name)
                if exp is None:
                    raise err from exc
                exp_id = exp.experiment_id
        else:
            if exp.lifecycle_stage == LifecycleStage.DELETED:
                raise PermanentSinkError(
                    f"experiment {name!r} is deleted in MLflow; restore it"
                    f" (mlflow experiments restore --experiment-id {exp.experiment_id})"
                    " or permanently delete it to let syncd recreate it"
                )
            exp_id = exp.experiment_id
        self._experiments[name] = exp_id
        return str(exp_id)

    def find_run(self, experiment_id: str, record_id: str) -> Any | None:
        """The run already carrying ``syncd.record_id``, if any (adoption)."""
        from mlflow.entities import ViewType

        found = self._call(
            "search_runs",
            self.client.search_runs,
            [experiment_id],
            filter_string=f"tags.`{RECORD_ID_TAG}` = '{record_id}'",
            run_view_type=ViewType.ALL,
            max_results=2,
            order_by=["attributes.start_time ASC"],
        )
        return found[0] if found else None

    # -- apply ---------------------------------------------------------------------

    def resolve_run(self, spec: RunSpec, parent_run_id: str | None) -> ApplyResult:
        """The record's run: adopted by its ``syncd.record_id`` tag, or created with it.

        The tag is part of the create call, so a run that exists always names its
        record. A create that failed or went unanswered may still have happened:
        before creating again, the run is looked up by its tag. MLflow's create
        calls are not idempotent, so they are never retried blindly.
        """
        with self._serialised():
            experiment_id = self.experiment_id(spec.experiment)
            search = (
                spec.record_id in self._uncertain or experiment_id not in self._created_experiments
            )
            tags = dict(spec.tags)
            if parent_run_id:
                tags[PARENT_RUN_TAG] = parent_run_id
            attempt = 0
            while True:
                if search:
                    existing = self.find_run(experiment_id, spec.record_id)
                    if existing is not None:
                        self._ensure_active(existing)
                        self._uncertain.discard(spec.record_id)
                        log.debug(
                            "run_adopted", run_id=existing.info.run_id, record_id=spec.record_id
                        )
                        return ApplyResult(
                            run_id=existing.info.run_id, experiment_id=experiment_id, created=False
                        )
                try:
                    with self.bounded("create_run", self.call_deadline):
                        run = self.client.create_run(
                            experiment_id,
                            start_time=spec.start_time,
                            tags=tags,
                            run_name=spec.run_name,
                        )
                except Exception as exc:
                    err = classify(exc)
                    self._uncertain.add(spec.record_id)
                    search = True
                    if isinstance(err, PermanentSinkError) or attempt + 1 >= self.retry.attempts:
                        raise err from exc
                    self._note_retry("create_run", attempt, err)
                    attempt += 1
                    continue
                self._uncertain.discard(spec.record_id)
                log.debug("run_created", run_id=run.info.run_id, record_id=spec.record_id)
                return ApplyResult(
                    run_id=run.info.run_id, experiment_id=experiment_id, created=True
                )

    def apply(
        self,
        plan: WritePlan,
        *,
        run: ApplyResult,
        parent_run_id: str | None,
        uploads: list[ResolvedArtifact],
    ) -> ApplyResult:
        """Apply a plan to the record's run; entries MLflow refuses are reported."""
        result = ApplyResult(
            run_id=run.run_id, experiment_id=run.experiment_id, created=run.created
        )
        with self._serialised():
            self._write(plan, result, parent_run_id, uploads)
        if not self._heap_frozen:
            # MLflow, SQLAlchemy and their stores are loaded now and live as long as the
            # process. Moving them out of the cyclic GC's reach keeps its full
            # collections, which MLflow's many short-lived ORM objects trigger, from
            # rescanning a few hundred thousand permanent objects each time.
            gc.freeze()
            self._heap_frozen = True
        return result

    def _write(
        self,
        plan: WritePlan,
        result: ApplyResult,
        parent_run_id: str | None,
        uploads: list[ResolvedArtifact],
    ) -> None:
        run_id = result.run_id
        batches = list(plan.batches)
        if not result.created:
            # A known or adopted run: the run's tags again when replayed from the start
            # (idempotent), and the parent link whenever the engine asks for it.
            run_tags = [Entry(k, v) for k, v in plan.run.tags.items()] if plan.run else []
            if parent_run_id:
                run_tags.append(Entry(PARENT_RUN_TAG, parent_run_id))
            batches[:0] = [
                Batch(tags=run_tags[i : i + MAX_PARAMS_TAGS_PER_BATCH])
                for i in range(0, len(run_tags), MAX_PARAMS_TAGS_PER_BATCH)
            ]
        for batch in batches:
            self._log_batch(run_id, batch, result)
        for text in plan.texts:
            self._call("log_text", self.client.log_text, run_id, text.text, text.artifact_file)
        for upload in uploads:
            self._upload(run_id, upload, result)
        if plan.datasets:
            self._log_datasets(run_id, plan)
        if plan.status is not None:
            if plan.status.status == "RUNNING":
                self._call("update_run", self.client.update_run, run_id, status="RUNNING")
            else:
                self._call(
                    "set_terminated",
                    self.client.set_terminated,
                    run_id,
                    status=plan.status.status,
                    end_time=plan.status.end_time,
                )

    def link_parent(self, run_id: str, parent_run_id: str) -> None:
        with self._serialised():
            self._call("set_tag", self.client.set_tag, run_id, PARENT_RUN_TAG, parent_run_id)

    def _ensure_active(self, run: Any) -> None:
        if run.info.lifecycle_stage != "active":
            raise PermanentSinkError(
                f"run {run.info.run_id} is deleted in MLflow; restore it"
                f" (mlflow runs restore --run-id {run.info.run_id}) to resume syncing"
            )

    def _log_batch(self, run_id: str, batch: Batch, result: ApplyResult) -> None:
        from mlflow.entities import Metric, Param, RunTag

        def call(metrics: list[MetricPoint], params: list[Entry], tags: list[Entry]) -> None:
            self._call(
                "log_batch",
                self.client.log_batch,
                run_id,
                metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in metrics],
                params=[Param(p.key, p.value) for p in params],
                tags=[RunTag(t.key, t.value) for t in tags],
                synchronous=True,
            )

        try:
            call(batch.metrics, batch.params, batch.tags)
            return
        except PermanentSinkError as exc:
            if "active" in str(exc) and "state" in str(exc):
                raise
            first_error = exc
        # MLflow refused the batch as a whole: find the entries it refuses, keep the rest.
        log.info("batch_refused_isolating", run_id=run_id, error=str(first_error)[:300])
        for metric in batch.metrics:
            self._try_entry(result, metric.line, metric.seq, partial(call, [metric], [], []))
        for param in batch.params:
            self._try_entry(result, param.line, param.seq, partial(call, [], [param], []))
        for tag in batch.tags:
            self._try_entry(result, tag.line, tag.seq, partial(call, [], [], [tag]))

    def _try_entry(self, result: ApplyResult, line: int, seq: int, fn: Callable[[], None]) -> None:
        try:
            fn()
        except PermanentSinkError as exc:
            result.problems.append(
                RecordError(f"MLflow refused: {_short(str(exc))}", line=line, seq=seq)
            )

    def _upload(self, run_id: str, upload: ResolvedArtifact, result: ApplyResult) -> None:
        # An upload may take longer than one request's timeout: allow for 1 MiB/s.
        saved, self.call_deadline = (
            self.call_deadline,
            self.call_deadline
            + (upload.size if upload.size is not None else _size_of(upload.local_path))
            / MIN_UPLOAD_BYTES_PER_S,
        )
        try:
            with ExitStack() as stack:
                try:  # exactly the bytes checked now, whatever happens to the path later
                    local, digest = stack.enter_context(staged(upload))
                except ArtifactRefused as exc:
                    result.problems.append(RecordError(str(exc), line=upload.line, seq=upload.seq))
                    return
                call, fn = (
                    ("log_artifacts", self.client.log_artifacts)
                    if upload.is_dir
                    else ("log_artifact", self.client.log_artifact)
                )
                self._call(call, fn, run_id, str(local), upload.artifact_path)
        finally:
            self.call_deadline = saved
        result.uploaded[upload.key] = digest

    def _log_datasets(self, run_id: str, plan: WritePlan) -> None:
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for ds in plan.datasets:
            tags = [InputTag("mlflow.data.context", ds.context)] if ds.context else []
            dataset = Dataset(
                name=ds.name,
                digest=ds.digest,
                source_type=ds.source_type,
                source=json.dumps({"uri": ds.source}),
            )
            inputs.append(DatasetInput(dataset=dataset, tags=tags))
        self._call("log_inputs", self.client.log_inputs, run_id, datasets=inputs)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
