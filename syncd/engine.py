"""The engine: one record, one step: tail -> parse -> plan -> write -> checkpoint.

``backfill`` calls :meth:`Engine.sync` once per record; the daemon schedules the
same call whenever a source says a record changed. The checkpoint is committed
only after the sink accepted the writes: a crash replays them (MLflow writes are
idempotent), it never loses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from syncd.artifacts import ArtifactRefused, ResolvedArtifact
from syncd.errors import PermanentSinkError, RecordError, TransientSinkError
from syncd.ledger import (
    BLOCKED,
    ERROR,
    FAILED,
    GONE,
    PENDING,
    SETTLED_STATES,
    SYNCED,
    Ledger,
    Progress,
    RecordRow,
    RunRow,
    extension_body,
)
from syncd.projection import WritePlan, plan_writes
from syncd.record.reader import (
    Checkpoint,
    ParsedLines,
    fingerprint_of,
    parse_lines,
    read_complete_lines,
    replaced_reason,
)
from syncd.sink import ApplyResult
from syncd.sources import RecordFile

log = structlog.get_logger("syncd.engine")


class Sink(Protocol):
    def apply(
        self,
        plan: WritePlan,
        *,
        run_id: str | None,
        experiment_id: str | None,
        parent_run_id: str | None,
        uploads: list[ResolvedArtifact],
    ) -> ApplyResult: ...

    def link_parent(self, run_id: str, parent_run_id: str) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What one sync of one record did."""

    source: str
    state: str
    skipped: bool = False
    events: int = 0
    metric_points: int = 0
    artifacts: int = 0
    errors: list[RecordError] = field(default_factory=list)
    retry_later: bool = False
    message: str | None = None
    run_id: str | None = None
    offset: int = 0  # bytes of the record consumed after this sync


class _Unset:
    pass


_UNSET = _Unset()


class Engine:
    def __init__(
        self,
        ledger: Ledger,
        sink: Sink,
        *,
        default_experiment: Callable[[RecordFile], str | None] | None = None,
        dry_run: bool = False,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.sink = sink
        self.default_experiment = default_experiment or (lambda _record: None)
        self.dry_run = dry_run
        self.on_step = on_step or (lambda: None)

    def sync(self, record: RecordFile, row: RecordRow | _Unset | None = _UNSET) -> Outcome:
        """Bring MLflow up to date with the complete lines of ``record``.

        ``row`` is the record's ledger row when the caller already holds it (one
        query for a whole tree); unchanged records are skipped without a read.
        """
        if isinstance(row, _Unset):
            row = self.ledger.get_record(record.uri)
        try:
            size, mtime_ns = record.stat()
        except FileNotFoundError:
            return self._gone(record, row)
        if (
            row is not None
            and row.size == size
            and row.mtime_ns == mtime_ns
            and row.state in SETTLED_STATES
        ):
            return Outcome(source=record.display, state=row.state, skipped=True)

        row = row or RecordRow(source=record.uri)
        reason = replaced_reason(record.read_at, size, _checkpoint(row))
        if reason is not None:
            log.warning("record_replaced", file=record.display, reason=reason)
            if not self.dry_run:
                row = self.ledger.restart_record(row, reason)
            else:
                row = RecordRow(source=record.uri)

        outcome = Outcome(source=record.display, state=row.state)
        while True:
            lines = read_complete_lines(record.read_at, size, row.offset)
            if not lines.lines:
                break
            if row.offset == 0 and lines.lines[0] is not None:
                row.fingerprint = fingerprint_of(lines.lines[0])
            parsed = parse_lines(
                lines,
                first_line=row.line + 1,
                last_seq=row.seq,
                path=record.display,
                skipped=row.skipped,
            )
            settled = lines.reached_end or parsed.held_back is not None
            if not self._step(record, row, parsed, (size, mtime_ns) if settled else None, outcome):
                break
            self.on_step()
            if parsed.held_back is not None or parsed.lines_consumed == 0:
                break
        if row.offset == 0 and row.state == PENDING and not self.dry_run:
            row.size, row.mtime_ns = size, mtime_ns
            self.ledger.commit(Progress(record=row, kind="pending"))
        elif not outcome.retry_later and row.state != FAILED:
            self._settle(row, size, mtime_ns)
        outcome.state = row.state
        outcome.offset = row.offset
        return outcome

    # -- one step ------------------------------------------------------------------

    def _step(
        self,
        record: RecordFile,
        row: RecordRow,
        parsed: ParsedLines,
        settled_stat: tuple[int, int] | None,
        outcome: Outcome,
    ) -> bool:
        """Apply one run of parsed lines and commit; False when the record must wait."""
        plan = plan_writes(
            parsed.events,
            path=record.display,
            source_uri=record.uri,
            default_experiment=self.default_experiment(record),
        )
        errors = [*parsed.errors, *plan.problems]
        record_id = plan.run.record_id if plan.run else row.record_id
        run = self.ledger.get_run(record_id) if record_id else None
        progress = Progress(
            record=row,
            kind="applied",
            first_seq=parsed.events[0].seq if parsed.events else None,
            last_seq=parsed.last_seq if parsed.events else None,
            events=plan.event_count,
            metric_points=plan.metric_points,
            extensions=[(e.seq, e.type, extension_body(e.fields)) for e in plan.extensions],
        )
        row.record_id = record_id

        projectable = [e for e in parsed.events if not e.is_extension]
        if run is None and plan.run is None:
            if projectable:
                first = projectable[0]
                errors.append(
                    RecordError(
                        "no valid run_started at seq 0: the record's events cannot be projected",
                        path=record.display,
                        line=first.line,
                        seq=first.seq,
                    )
                )
        elif not plan.is_empty and not self.dry_run:
            uploads = self._resolve_uploads(record, plan, record_id, errors)
            parent_record_id = (
                plan.run.parent_record_id if plan.run else (run.parent_record_id if run else None)
            )
            parent_run_id = None
            if parent_record_id and not (run and run.parent_linked):
                parent = self.ledger.get_run(parent_record_id)
                parent_run_id = parent.run_id if parent else None
            try:
                result = self.sink.apply(
                    plan,
                    run_id=run.run_id if run else None,
                    experiment_id=run.experiment_id if run else None,
                    parent_run_id=parent_run_id,
                    uploads=uploads,
                )
            except TransientSinkError as exc:
                outcome.retry_later = True
                outcome.message = str(exc)
                log.warning("sink_unavailable", file=record.display, error=str(exc)[:300])
                return False
            except PermanentSinkError as exc:
                row.state = FAILED
                row.last_error = str(exc)
                outcome.message = str(exc)
                log.error("sink_refused", file=record.display, error=str(exc)[:500])
                self.ledger.commit(Progress(record=row, kind="failed", detail=str(exc)[:2000]))
                return False
            for problem in result.problems:
                problem.path = record.display
            errors.extend(result.problems)
            progress.run = RunRow(
                record_id=str(record_id),
                run_id=result.run_id,
                experiment_id=result.experiment_id,
                parent_record_id=parent_record_id,
                parent_linked=bool(parent_run_id) or bool(run and run.parent_linked),
            )
            progress.artifacts = result.uploaded
            outcome.run_id = result.run_id
            outcome.artifacts += len(result.uploaded)

        row.offset += parsed.bytes_consumed
        row.line += parsed.lines_consumed
        row.seq = parsed.last_seq
        row.skipped = parsed.skipped
        if parsed.held_back is not None:
            if row.state != BLOCKED:
                errors.append(parsed.held_back)
            row.state = BLOCKED
            progress.kind = "held"
        else:
            row.state = ERROR if (errors or row.error_count) else SYNCED
        progress.errors = errors
        for err in errors:
            log.warning(
                "record_error",
                file=err.path or record.display,
                line=err.line,
                seq=err.seq,
                reason=err.reason,
            )
        outcome.events += plan.event_count
        outcome.metric_points += plan.metric_points
        outcome.errors.extend(errors)
        if self.dry_run:
            row.error_count += len(errors)
            return True
        if settled_stat is not None:  # only once every complete line is in: else re-read
            row.size, row.mtime_ns = settled_stat
        self.ledger.commit(progress)
        if plan.run is not None and progress.run is not None:
            self._link_children(progress.run)
        return True

    def _resolve_uploads(
        self, record: RecordFile, plan: WritePlan, record_id: str | None, errors: list[RecordError]
    ) -> list[ResolvedArtifact]:
        if not plan.artifacts:
            return []
        done = self.ledger.artifact_digests(record_id) if record_id else {}
        uploads: dict[str, ResolvedArtifact] = {}
        for item in plan.artifacts:
            try:
                resolved = record.resolve_artifact(item.path, item.artifact_path)
            except (ArtifactRefused, OSError) as exc:
                errors.append(
                    RecordError(str(exc), path=record.display, line=item.line, seq=item.seq)
                )
                continue
            if done.get(resolved.key) != resolved.digest:
                uploads[resolved.key] = resolved  # the last event for a path wins
        return list(uploads.values())

    def _link_children(self, parent: RunRow) -> None:
        """Children seen before their parent get ``mlflow.parentRunId`` now."""
        for child in self.ledger.unlinked_children(parent.record_id):
            try:
                self.sink.link_parent(child.run_id, parent.run_id)
            except (TransientSinkError, PermanentSinkError) as exc:
                log.warning("parent_link_failed", child_run_id=child.run_id, error=str(exc))
                continue
            self.ledger.mark_linked(child.record_id)

    def _settle(self, row: RecordRow, size: int, mtime_ns: int) -> None:
        """Remember the file's size and mtime so an unchanged file is skipped unread."""
        if self.dry_run or (row.size == size and row.mtime_ns == mtime_ns):
            return
        row.size, row.mtime_ns = size, mtime_ns
        self.ledger.commit(Progress(record=row, kind="settled"))

    def _gone(self, record: RecordFile, row: RecordRow | None) -> Outcome:
        if row is None:
            return Outcome(source=record.display, state=GONE, skipped=True)
        if row.state != GONE and not self.dry_run:
            log.warning("record_gone", file=record.display, record_id=row.record_id)
            row.state = GONE
            self.ledger.commit(Progress(record=row, kind="gone", detail="source file deleted"))
        return Outcome(source=record.display, state=GONE)


def _checkpoint(row: RecordRow) -> Checkpoint:
    return Checkpoint(offset=row.offset, line=row.line, seq=row.seq, fingerprint=row.fingerprint)
