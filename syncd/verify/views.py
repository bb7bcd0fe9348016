"""What MLflow and the ledger hold, read without writing."""

from __future__ import annotations

import os
import posixpath
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa

from syncd.config import Settings
from syncd.errors import ConfigError, LedgerError, PermanentSinkError, SinkError
from syncd.ledger import records as ledger_records
from syncd.ledger import runs as ledger_runs
from syncd.logging import redact_text
from syncd.projection import (
    RECORD_ID_TAG,
)
from syncd.sink import RetryPolicy, classify, sqlite_path
from syncd.verify.compare import MODEL_ID_TAG, Found, FoundModel, LedgerRecord, RunRef
from syncd.verify.expected import Expected, MetricSummary

T = TypeVar("T")

_RUNS_PAGE = 1000
_EXPERIMENTS_PER_SEARCH = 100


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

    def exists(self, run_id: str) -> bool:
        """MLflow knows the run (deleted or not)."""
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            if isinstance(classify(exc), PermanentSinkError):
                return False
            self._call(self.client.get_run, run_id)  # transient: retried, raises when it stays
            return True
        if not self.experiments:
            self.load_experiments()
        return run is not None

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
            models=self.models(str(info.experiment_id), expected),
        )

    def models(self, experiment_id: str, expected: Expected) -> dict[str, FoundModel]:
        """The mirrored LoggedModel of each model the record logs (by its ``syncd.model_id``
        tag), with the versions of the expected registered model that hold it and the
        version the expected alias points at."""
        out: dict[str, FoundModel] = {}
        registered: dict[str, tuple[list[Any], dict[str, str]]] = {}
        for mid, want in sorted(expected.models.items()):
            found = self._call(
                self.client.search_logged_models,
                experiment_ids=[experiment_id],
                filter_string=f"tags.`{MODEL_ID_TAG}` = '{_quote(mid)}'",
                max_results=2,
            )
            if not found:
                continue
            model = found[0]
            versions: tuple[str, ...] = ()
            alias_version: str | None = None
            name = want.registered_model_name
            if name and want.status == "READY":
                if name not in registered:
                    registered[name] = self._registered(name)
                all_versions, aliases = registered[name]
                versions = tuple(
                    str(mv.version)
                    for mv in all_versions
                    if getattr(mv, "model_id", None) == model.model_id
                    or mv.source == f"models:/{model.model_id}"
                )
                if want.alias:
                    alias_version = aliases.get(want.alias)
            out[mid] = FoundModel(
                model_id=model.model_id,
                status=str(model.status.value if hasattr(model.status, "value") else model.status),
                source_run_id=model.source_run_id,
                versions=versions,
                alias_version=alias_version,
            )
        return out

    def _registered(self, name: str) -> tuple[list[Any], dict[str, str]]:
        """The versions and aliases (alias -> version) of a registered model; none when absent."""
        quoted = _quote(name)
        models = self._call(self.client.search_registered_models, f"name = '{quoted}'")
        match = [rm for rm in models if rm.name == name]
        if not match:
            return [], {}
        aliases = {str(k): str(v) for k, v in (match[0].aliases or {}).items()}
        versions = list(self._call(self.client.search_model_versions, f"name = '{quoted}'"))
        return versions, aliases


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


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
