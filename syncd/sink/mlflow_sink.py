"""The MLflow sink: applies write plans through ``MlflowClient`` (never the fluent API).

One sink per tracking URI (and per writer thread). It is a small facade over
four parts with one job each:

- :mod:`syncd.sink.calls`: the client, error mapping, retries, deadlines, the
  store lock;
- :mod:`syncd.sink.store`: SQLite paths, the lock file, atomic creation and
  the schema guard, artifacts anchored beside the database;
- :mod:`syncd.sink.runs`: experiments get-or-create, run adoption by the
  ``syncd.record_id`` tag, run identity before any write;
- :mod:`syncd.sink.writes`: batches within MLflow's limits (isolating entries
  MLflow refuses), artifacts staged from exactly the checked bytes, datasets,
  status.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from syncd.artifacts import ResolvedArtifact
from syncd.projection import RunSpec, WritePlan
from syncd.sink.calls import Bounded, Calls, RetryPolicy, unbounded
from syncd.sink.results import ApplyResult
from syncd.sink.runs import Runs
from syncd.sink.store import StoreLock, default_artifact_root, open_client, sqlite_path
from syncd.sink.writes import Writes

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = structlog.get_logger("syncd.sink")


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
        created_experiments: set[str] | None = None,
    ) -> None:
        """``created_experiments``: one set shared by the sinks of one process's writers
        over one ledger (the experiments any of them created)."""
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root or default_artifact_root(tracking_uri)
        db = sqlite_path(tracking_uri)
        lock = (
            StoreLock(db.with_name(db.name + ".syncd-lock"), timeout=lock_timeout) if db else None
        )
        self.calls = Calls(
            partial(open_client, tracking_uri, self.artifact_root),
            retry=retry or RetryPolicy(),
            bounded=bounded or unbounded,
            call_deadline=call_deadline,
            lock=lock,
        )
        self.runs = Runs(self.calls, self.artifact_root, created_experiments)
        self.writes = Writes(self.calls, tracking_uri)
        self._heap_frozen = False
        if self.artifact_root:
            log.info("artifact_root", path=self.artifact_root)

    @property
    def client(self) -> MlflowClient:
        return self.calls.client

    def check(self) -> None:
        """Raise SinkError unless the tracking store answers (used for readiness)."""
        with self.calls.serialised():
            self.calls.call(
                "search_experiments", self.calls.client.search_experiments, max_results=1
            )

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

        with self.calls.serialised():
            backup = upgrade_store(db)
        if backup is not None:
            log.warning("store_upgraded", store=str(db), backup=str(backup))
        return backup

    def take_retries(self) -> int:
        return self.calls.take_retries()

    def experiment_id(self, name: str) -> str:
        return self.runs.experiment_id(name)

    def experiment_created(self, experiment_id: str) -> bool:
        return self.runs.experiment_created(experiment_id)

    def find_run(self, experiment_id: str, record_id: str) -> Any | None:
        return self.runs.find_run(experiment_id, record_id)

    def resolve_run(self, spec: RunSpec, parent_run_id: str | None) -> ApplyResult:
        return self.runs.resolve_run(spec, parent_run_id)

    def link_parent(self, run_id: str, parent_run_id: str) -> None:
        self.runs.link_parent(run_id, parent_run_id)

    def apply(
        self,
        plan: WritePlan,
        *,
        run: ApplyResult,
        parent_run_id: str | None,
        uploads: list[ResolvedArtifact],
        model_files: Mapping[str, ResolvedArtifact] | None = None,
    ) -> ApplyResult:
        """Apply a plan to the record's run; entries MLflow refuses are reported."""
        result = ApplyResult(
            run_id=run.run_id, experiment_id=run.experiment_id, created=run.created
        )
        with self.calls.serialised():
            self.writes.write(plan, result, parent_run_id, uploads, model_files)
        if not self._heap_frozen:
            # MLflow, SQLAlchemy and their stores are loaded now and live as long as the
            # process. Moving them out of the cyclic GC's reach keeps its full
            # collections, which MLflow's many short-lived ORM objects trigger, from
            # rescanning a few hundred thousand permanent objects each time.
            gc.freeze()
            self._heap_frozen = True
        return result
