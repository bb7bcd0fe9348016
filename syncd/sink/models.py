"""Mirroring a record's models: a LoggedModel of the run, its files, a registered version.

Every step is idempotent, so a replay or a crash at any point converges:

- the LoggedModel is found again by its ``syncd.model_id`` tag before one is created;
- its files are uploaded until the model is READY (then never again);
- the run's output link is added only when the run does not list the model yet;
- a model version is created only when none of the registered model's versions
  already points at the mirrored model; the alias is set to that version.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import structlog

from syncd.artifacts import ArtifactRefused, ResolvedArtifact, staged
from syncd.errors import PermanentSinkError, RecordError
from syncd.projection import RECORD_ID_TAG, MetricPoint, ModelSpec
from syncd.sink.calls import Calls, classify
from syncd.sink.results import ApplyResult

log = structlog.get_logger("syncd.sink")
T = TypeVar("T")

MODEL_ID_TAG = "syncd.model_id"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # what mlflow's own registration sets
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
MAX_LINKED_PER_BATCH = 1000  # MLflow's log_batch limit of metrics per call


class Models:
    """Applies a plan's models to a known run."""

    def __init__(self, calls: Calls, tracking_uri: str) -> None:
        self.calls = calls
        self.tracking_uri = tracking_uri

    def write(
        self,
        spec: ModelSpec,
        result: ApplyResult,
        record_id: str | None,
        files: ResolvedArtifact | None,
    ) -> None:
        model = self._find(result.experiment_id, spec.model_id)
        if model is None:
            model = self._create(spec, result, record_id)
        else:
            self._update_tags(model, spec)
        if model.status.value != "READY":
            if spec.status == "READY":
                if files is None:
                    return  # reported by the engine: the folder could not be read
                if not self._upload(model.model_id, files, result):
                    return
            if spec.status != "PENDING":
                self.calls.call(
                    "finalize_logged_model",
                    self.calls.client.finalize_logged_model,
                    model.model_id,
                    spec.status,
                )
        self._link_output(result.run_id, model.model_id, spec.step)
        if spec.status == "READY":
            self._link_metrics(result.run_id, model.model_id, spec.step, spec.ts)
        if spec.registered_model_name and spec.status == "READY":
            version = self._register(spec.registered_model_name, model, result.run_id)
            if spec.alias:
                self.calls.call(
                    "set_registered_model_alias",
                    self.calls.client.set_registered_model_alias,
                    spec.registered_model_name,
                    spec.alias,
                    str(version),
                )

    # -- the LoggedModel -----------------------------------------------------------

    def _find(self, experiment_id: str, model_id: str) -> Any | None:
        found = self.calls.call(
            "search_logged_models",
            self.calls.client.search_logged_models,
            experiment_ids=[experiment_id],
            filter_string=f"tags.`{MODEL_ID_TAG}` = '{model_id}'",
            max_results=2,
        )
        return found[0] if found else None

    def _create(self, spec: ModelSpec, result: ApplyResult, record_id: str | None) -> Any:
        tags = dict(spec.tags)
        tags[MODEL_ID_TAG] = spec.model_id
        if record_id:
            tags[RECORD_ID_TAG] = record_id
        model = self._create_or_find(
            "create_logged_model",
            lambda: self.calls.client.create_logged_model(
                result.experiment_id,
                name=spec.name,
                source_run_id=result.run_id,
                tags=tags,
                params=spec.params or None,
                model_type=spec.model_type,
            ),
            lambda: self._find(result.experiment_id, spec.model_id),
        )
        log.debug("model_mirrored", model_id=model.model_id, record_model_id=spec.model_id)
        return model

    def _create_or_find(
        self, what: str, create: Callable[[], T], find: Callable[[], T | None]
    ) -> T:
        """Create, or find what a failed create may have made (its reply lost).

        MLflow's creates are not idempotent: never retried before looking up
        what they would have made. Transient failures are retried with backoff.
        """
        attempt = 0
        while True:
            try:
                with self.calls.bounded(what, self.calls.call_deadline):
                    return create()
            except Exception as exc:
                err = classify(exc)
                existing = find()
                if existing is not None:
                    return existing
                if isinstance(err, PermanentSinkError) or attempt + 1 >= self.calls.retry.attempts:
                    raise err from exc
                self.calls.note_retry(what, attempt, err)
                attempt += 1

    def _update_tags(self, model: Any, spec: ModelSpec) -> None:
        changed = {k: v for k, v in spec.tags.items() if model.tags.get(k) != v}
        if changed:
            self.calls.call(
                "set_logged_model_tags",
                self.calls.client.set_logged_model_tags,
                model.model_id,
                changed,
            )

    def _upload(self, model_id: str, files: ResolvedArtifact, result: ApplyResult) -> bool:
        with ExitStack() as stack:
            try:  # exactly the bytes checked now, whatever happens to the folder later
                local, _digest = stack.enter_context(staged(files))
            except ArtifactRefused as exc:
                result.problems.append(RecordError(str(exc), line=files.line, seq=files.seq))
                return False
            self.calls.call(
                "log_model_artifacts",
                self.calls.client.log_model_artifacts,
                model_id,
                str(local),
            )
        return True

    def _link_output(self, run_id: str, model_id: str, step: int) -> None:
        from mlflow.entities import LoggedModelOutput

        def linked() -> bool | None:
            run = self.calls.call("get_run", self.calls.client.get_run, run_id)
            outputs = run.outputs.model_outputs if run.outputs else []
            return True if any(o.model_id == model_id for o in outputs) else None

        if linked():
            return
        # Not idempotent either: MLflow refuses a second identical link (a unique key),
        # so a link whose reply was lost is looked up, never sent again blindly.
        self._create_or_find(
            "log_outputs",
            lambda: (
                self.calls.client.log_outputs(run_id, [LoggedModelOutput(model_id, step)]) or True
            ),
            linked,
        )

    def _link_metrics(self, run_id: str, model_id: str, step: int, until: int | None) -> None:
        """The run's points at the model's step, linked to the model as ``log_model`` does.

        MLflow's ``log_model`` logs the run's points of the model's step again with
        the model's id (``LoggedModel.metrics``); the record's points logged up to
        the model event are linked the same way. MLflow keeps such a point once
        per model, so a replay adds nothing.
        """
        from mlflow.entities import Metric

        client = self.calls.client
        run = self.calls.call("get_run", client.get_run, run_id)
        linked: list[Any] = []
        for key in sorted(run.data.metrics):
            history = self.calls.call("get_metric_history", client.get_metric_history, run_id, key)
            linked.extend(
                Metric(
                    key=m.key,
                    value=m.value,
                    timestamp=m.timestamp,
                    step=m.step,
                    run_id=run_id,
                    model_id=model_id,
                )
                for m in history
                if m.step == step and (until is None or m.timestamp <= until)
            )
        for i in range(0, len(linked), MAX_LINKED_PER_BATCH):
            self.calls.call(
                "log_batch",
                client.log_batch,
                run_id,
                metrics=linked[i : i + MAX_LINKED_PER_BATCH],
            )

    def link_points(self, result: ApplyResult, points: list[MetricPoint]) -> None:
        """Points of the run logged with a model's id, linked to the mirrored model too.

        They were logged as the run's points already; logging them again with the
        model's id adds the link only (MLflow keeps a point once). A model the sink
        does not hold (its ``model`` event not mirrored) leaves them the run's only.
        """
        from mlflow.entities import Metric

        by_model: dict[str, list[MetricPoint]] = {}
        for point in points:
            if point.model_id is not None:
                by_model.setdefault(point.model_id, []).append(point)
        for record_model_id, linked in by_model.items():
            model = self._find(result.experiment_id, record_model_id)
            if model is None:
                log.debug("points_not_linked", record_model_id=record_model_id, points=len(linked))
                continue
            for i in range(0, len(linked), MAX_LINKED_PER_BATCH):
                self.calls.call(
                    "log_batch",
                    self.calls.client.log_batch,
                    result.run_id,
                    metrics=[
                        Metric(
                            m.key,
                            m.value,
                            m.timestamp,
                            m.step,
                            model_id=model.model_id,
                            run_id=result.run_id,
                        )
                        for m in linked[i : i + MAX_LINKED_PER_BATCH]
                    ],
                )

    # -- the registry --------------------------------------------------------------

    def _register(self, name: str, model: Any, run_id: str) -> Any:
        """The version of ``name`` that holds the model, created when there is none."""
        client = self.calls.client
        if not self._registered(name):
            self._create_or_find(
                "create_registered_model",
                lambda: client.create_registered_model(name),
                lambda: True if self._registered(name) else None,
            )
        source = f"models:/{model.model_id}"

        def create_version() -> Any:
            with _global_tracking_uri(self.tracking_uri):
                return client.create_model_version(
                    name, source, run_id=run_id, model_id=model.model_id
                ).version

        version = self._version_of(name, model.model_id, run_id, source)
        if version is None:
            version = self._create_or_find(
                "create_model_version",
                create_version,
                lambda: self._version_of(name, model.model_id, run_id, source),
            )
            log.debug("model_version_created", name=name, version=version)
        self._link_version(model, name, version)
        return version

    def _registered(self, name: str) -> bool:
        found = self.calls.call(
            "search_registered_models",
            self.calls.client.search_registered_models,
            filter_string=f"name = '{_quote(name)}'",
        )
        return any(rm.name == name for rm in found)

    def _version_of(self, name: str, model_id: str, run_id: str, source: str) -> Any | None:
        versions = self.calls.call(
            "search_model_versions",
            self.calls.client.search_model_versions,
            f"name = '{_quote(name)}'",
        )
        for mv in versions:
            if getattr(mv, "model_id", None) == model_id or (
                mv.run_id == run_id and mv.source == source
            ):
                return mv.version
        return None

    def _link_version(self, model: Any, name: str, version: Any) -> None:
        """The ``mlflow.modelVersions`` tag that mlflow's own registration leaves on a model."""
        fresh = self.calls.call(
            "get_logged_model", self.calls.client.get_logged_model, model.model_id
        )
        try:
            links: list[dict[str, Any]] = json.loads(fresh.tags.get(MODEL_VERSIONS_TAG, "[]"))
        except ValueError:
            links = []
        entry = {"name": name, "version": version}
        if any(
            str(link.get("version")) == str(version) and link.get("name") == name for link in links
        ):
            return
        self.calls.call(
            "set_logged_model_tags",
            self.calls.client.set_logged_model_tags,
            model.model_id,
            {MODEL_VERSIONS_TAG: json.dumps([*links, entry])},
        )


_GLOBAL_URI = threading.Lock()


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's SQL registry resolves a ``models:/`` source with the process's tracking URI
    (``MlflowClient()``), not the client's: point it at this sink's store meanwhile.

    MLflow's helper also rewrites (or, restoring "unset", removes) the
    MLFLOW_TRACKING_URI variable: it is put back as it was.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _GLOBAL_URI:
        saved = os.environ.get(TRACKING_URI_ENV)
        try:
            with _use_tracking_uri(uri):
                yield
        finally:
            if saved is None:
                os.environ.pop(TRACKING_URI_ENV, None)
            else:
                os.environ[TRACKING_URI_ENV] = saved


def _quote(value: str) -> str:
    return value.replace("'", "\\'")
