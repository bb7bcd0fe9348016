"""Experiments and runs: get-or-create by name, adoption by tag, identity before writes."""

from __future__ import annotations

from typing import Any

import structlog

from syncd.errors import PermanentSinkError, SinkAccessDenied, TransientSinkError
from syncd.projection import PARENT_RUN_TAG, RECORD_ID_TAG, RunSpec
from syncd.sink.calls import Calls, classify
from syncd.sink.results import ApplyResult

log = structlog.get_logger("syncd.sink")


class Runs:
    """Finds or creates the experiment and the run of a record, never twice."""

    def __init__(
        self, calls: Calls, artifact_root: str | None, created_experiments: set[str] | None = None
    ) -> None:
        self.calls = calls
        self.artifact_root = artifact_root
        self._experiments: dict[str, str] = {}
        # Experiments this sink created: they hold no runs but the ones it made itself,
        # so a record without a ledger mapping needs no adoption search there, unless
        # a create of that record failed or went unanswered (``_uncertain``) or this
        # sink already created its run (``_created_runs``: the ledger lost the binding,
        # e.g. its commit failed, and the record is resolved again). Shared by the
        # sinks of one process's writers over one ledger (see ``experiment_created``).
        self._created_experiments: set[str] = (
            created_experiments if created_experiments is not None else set()
        )
        self._uncertain: set[str] = set()
        self._created_runs: set[str] = set()
        # Records the last find_run found no run for (the engine looks under the record's
        # lease just before resolving it): a second search right after would ask again.
        self._absent: set[tuple[str, str]] = set()

    def experiment_id(self, name: str) -> str:
        cached = self._experiments.get(name)
        if cached is not None:
            return cached
        from mlflow.entities import LifecycleStage

        exp = self.calls.call(
            "get_experiment_by_name", self.calls.client.get_experiment_by_name, name
        )
        attempt = 0
        while exp is None:
            try:
                location = (
                    f"{self.artifact_root.rstrip('/')}/{_folder_name(name)}"
                    if self.artifact_root
                    else None
                )
                exp_id = self.calls.client.create_experiment(name, artifact_location=location)
                self._created_experiments.add(str(exp_id))
                break
            except Exception as exc:
                err = classify(exc)
                if isinstance(err, TransientSinkError):
                    # MLflow's client does not retry a create: wait and look again (a
                    # create whose reply was lost may have happened), then create again.
                    if attempt + 1 >= self.calls.retry.attempts:
                        raise err from exc
                    self.calls.note_retry("create_experiment", attempt, err)
                    attempt += 1
                elif isinstance(err, SinkAccessDenied):
                    raise err from exc
                # Someone else created it between our lookup and create: use theirs.
                exp = self.calls.call(
                    "get_experiment_by_name", self.calls.client.get_experiment_by_name, name
                )
                if exp is None and not isinstance(err, TransientSinkError):
                    raise err from exc
        if exp is not None:
            if exp.lifecycle_stage == LifecycleStage.DELETED:
                raise PermanentSinkError(
                    f"experiment {name!r} is deleted in MLflow; restore it"
                    f" (mlflow experiments restore --experiment-id {exp.experiment_id})"
                    " or permanently delete it to let syncd recreate it"
                )
            exp_id = exp.experiment_id
        self._experiments[name] = exp_id
        return str(exp_id)

    def experiment_created(self, experiment_id: str) -> bool:
        """True when this sink (or one sharing its set) created the experiment: it held
        no run then, so every run in it was made by a writer of this process or fleet."""
        return experiment_id in self._created_experiments

    def find_run(self, experiment_id: str, record_id: str) -> Any | None:
        """The run already carrying ``syncd.record_id``, if any (adoption)."""
        from mlflow.entities import ViewType

        found = self.calls.call(
            "search_runs",
            self.calls.client.search_runs,
            [experiment_id],
            filter_string=f"tags.`{RECORD_ID_TAG}` = '{record_id}'",
            run_view_type=ViewType.ALL,
            max_results=2,
            order_by=["attributes.start_time ASC"],
        )
        if not found:
            self._absent.add((experiment_id, record_id))
        return found[0] if found else None

    def resolve_run(self, spec: RunSpec, parent_run_id: str | None) -> ApplyResult:
        """The record's run: adopted by its ``syncd.record_id`` tag, or created with it.

        The tag is part of the create call, so a run that exists always names its
        record. A create that failed or went unanswered may still have happened:
        before creating again, the run is looked up by its tag. MLflow's create
        calls are not idempotent, so they are never retried blindly.
        """
        if spec.mlflow_run_id:
            return self.continue_run(spec)
        with self.calls.serialised():
            experiment_id = self.experiment_id(spec.experiment)
            just_searched = (experiment_id, spec.record_id) in self._absent
            self._absent.clear()  # only the search made for this very resolve counts
            search = (
                spec.record_id in self._uncertain
                or spec.record_id in self._created_runs
                or (experiment_id not in self._created_experiments and not just_searched)
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
                    with self.calls.bounded("create_run", self.calls.call_deadline):
                        run = self.calls.client.create_run(
                            experiment_id,
                            start_time=spec.start_time,
                            tags=tags,
                            run_name=spec.run_name,
                        )
                except Exception as exc:
                    err = classify(exc)
                    self._uncertain.add(spec.record_id)
                    search = True
                    if (
                        isinstance(err, PermanentSinkError)
                        or attempt + 1 >= self.calls.retry.attempts
                    ):
                        raise err from exc
                    self.calls.note_retry("create_run", attempt, err)
                    attempt += 1
                    continue
                self._uncertain.discard(spec.record_id)
                self._created_runs.add(spec.record_id)
                log.debug("run_created", run_id=run.info.run_id, record_id=spec.record_id)
                return ApplyResult(
                    run_id=run.info.run_id, experiment_id=experiment_id, created=True
                )

    def continue_run(self, spec: RunSpec) -> ApplyResult:
        """The existing run a record names by ``mlflow_run_id``: never created, never tagged
        with this record's id (the run may belong to another record that created it)."""
        assert spec.mlflow_run_id
        with self.calls.serialised():
            try:
                with self.calls.bounded("get_run", self.calls.call_deadline):
                    run = self.calls.client.get_run(spec.mlflow_run_id)
            except Exception as exc:
                err = classify(exc)
                if isinstance(err, PermanentSinkError):
                    raise PermanentSinkError(
                        f"mlflow_run_id {spec.mlflow_run_id}: no such run in MLflow ({err})"
                    ) from exc
                raise err from exc
        self._ensure_active(run)
        log.debug("run_continued", run_id=run.info.run_id, record_id=spec.record_id)
        return ApplyResult(
            run_id=run.info.run_id, experiment_id=str(run.info.experiment_id), created=False
        )

    def link_parent(self, run_id: str, parent_run_id: str) -> None:
        with self.calls.serialised():
            self.calls.call(
                "set_tag", self.calls.client.set_tag, run_id, PARENT_RUN_TAG, parent_run_id
            )

    def _ensure_active(self, run: Any) -> None:
        if run.info.lifecycle_stage != "active":
            raise PermanentSinkError(
                f"run {run.info.run_id} is deleted in MLflow; restore it"
                f" (mlflow runs restore --run-id {run.info.run_id}) to resume syncing"
            )


def _folder_name(experiment: str) -> str:
    """A readable, unique folder name for an experiment's artifacts."""
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment).strip("-.")[:60] or "experiment"
    return f"{slug}-{hashlib.sha256(experiment.encode()).hexdigest()[:8]}"
