"""Writing a plan to a run: batches (isolating entries MLflow refuses), artifacts,
datasets, status."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import structlog

from syncd.artifacts import ArtifactRefused, ResolvedArtifact, staged
from syncd.errors import PermanentSinkError, RecordError, SinkAccessDenied
from syncd.projection import (
    MAX_PARAMS_TAGS_PER_BATCH,
    PARENT_RUN_TAG,
    Batch,
    Entry,
    MetricPoint,
    WritePlan,
)
from syncd.sink.calls import Calls
from syncd.sink.models import Models
from syncd.sink.rest_batch import post_log_batch, rest_store_of
from syncd.sink.results import ApplyResult

log = structlog.get_logger("syncd.sink")

MIN_UPLOAD_BYTES_PER_S = 1024 * 1024


def _size_of(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


class Writes:
    """Applies the writes of a plan to a known run."""

    def __init__(self, calls: Calls, tracking_uri: str) -> None:
        self.calls = calls
        self.models = Models(calls, tracking_uri)

    def write(
        self,
        plan: WritePlan,
        result: ApplyResult,
        parent_run_id: str | None,
        uploads: list[ResolvedArtifact],
        model_files: Mapping[str, ResolvedArtifact] | None = None,
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
        for deletion in plan.deleted_tags:
            self._delete_tag(run_id, deletion.key)
        for text in plan.texts:
            self.calls.call(
                "log_text", self.calls.client.log_text, run_id, text.text, text.artifact_file
            )
        for upload in uploads:
            self._upload(run_id, upload, result)
        if plan.datasets:
            self._log_datasets(run_id, plan)
        record_id = plan.run.record_id if plan.run else None
        for model in plan.models:
            files = (model_files or {}).get(model.model_id)
            self.models.write(model, result, record_id, files)
        if plan.linked_metrics:  # after the models, which they are linked to
            self.models.link_points(result, plan.linked_metrics)
        if plan.status is not None:
            if plan.status.status == "RUNNING":
                self.calls.call(
                    "update_run", self.calls.client.update_run, run_id, status="RUNNING"
                )
            else:
                self.calls.call(
                    "set_terminated",
                    self.calls.client.set_terminated,
                    run_id,
                    status=plan.status.status,
                    end_time=plan.status.end_time,
                )

    def _log_batch(self, run_id: str, batch: Batch, result: ApplyResult) -> None:
        from mlflow.entities import Metric, Param, RunTag

        store = rest_store_of(self.calls.client)

        def call(metrics: list[MetricPoint], params: list[Entry], tags: list[Entry]) -> None:
            if store is not None:  # a tracking server: the same request, without protobuf
                self.calls.call("log_batch", post_log_batch, store, run_id, metrics, params, tags)
                return
            self.calls.call(
                "log_batch",
                self.calls.client.log_batch,
                run_id,
                metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in metrics],
                params=[Param(p.key, p.value) for p in params],
                tags=[RunTag(t.key, t.value) for t in tags],
                synchronous=True,
            )

        try:
            call(batch.metrics, batch.params, batch.tags)
            return
        except SinkAccessDenied:
            raise  # refused credentials say nothing about the entries: none is isolated
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

    def _delete_tag(self, run_id: str, key: str) -> None:
        """Delete a run tag; a tag already absent (a replay, or never set) is fine."""
        from mlflow.exceptions import MlflowException

        client = self.calls.client

        def delete() -> None:
            try:
                client.delete_tag(run_id, key)
            except MlflowException as exc:
                absent = "no tag with name" in str(exc).lower()
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or not absent:
                    raise

        self.calls.call("delete_tag", delete)

    def _try_entry(self, result: ApplyResult, line: int, seq: int, fn: Callable[[], None]) -> None:
        try:
            fn()
        except SinkAccessDenied:
            raise
        except PermanentSinkError as exc:
            result.problems.append(
                RecordError(f"MLflow refused: {_short(str(exc))}", line=line, seq=seq)
            )

    def _upload(self, run_id: str, upload: ResolvedArtifact, result: ApplyResult) -> None:
        # An upload may take longer than one request's timeout: allow for 1 MiB/s.
        saved, self.calls.call_deadline = (
            self.calls.call_deadline,
            self.calls.call_deadline
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
                    ("log_artifacts", self.calls.client.log_artifacts)
                    if upload.is_dir
                    else ("log_artifact", self.calls.client.log_artifact)
                )
                self.calls.call(call, fn, run_id, str(local), upload.artifact_path)
        finally:
            self.calls.call_deadline = saved
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
        self.calls.call("log_inputs", self.calls.client.log_inputs, run_id, datasets=inputs)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
