"""The engine: one record, one step: tail -> parse -> plan -> write -> checkpoint.

``backfill`` calls :meth:`Engine.sync` once per record; the daemon schedules the
same call whenever a source says a record changed. The checkpoint is committed
only after the sink accepted the writes: a crash replays them (MLflow writes are
idempotent), it never loses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from syncd.artifacts import ArtifactRefused, ResolvedArtifact
from syncd.errors import (
    LedgerError,
    PermanentSinkError,
    RecordError,
    SinkError,
    SourceError,
    TransientSinkError,
)
from syncd.lease_heartbeat import LeaseHeartbeat
from syncd.ledger import (
    BLOCKED,
    BOUND,
    ERROR,
    FAILED,
    GONE,
    PENDING,
    RETRY_STATES,
    SETTLED_STATES,
    SYNCED,
    WAITING,
    Lease,
    LeaseHolder,
    LeaseLost,
    Ledger,
    Progress,
    RecordRow,
    RunRow,
    extension_body,
)
from syncd.logging import redact_text
from syncd.projection import RunSpec, WritePlan, plan_writes
from syncd.record.reader import (
    Checkpoint,
    ParsedLines,
    fingerprint_of,
    parse_lines,
    read_complete_lines,
    replaced_reason,
    tail_at,
    tail_of,
)
from syncd.sink import ApplyResult, Bounded, unbounded
from syncd.snapshot.translate import PROBLEM_EVENT
from syncd.sources import RecordFile, etag_of
from syncd.sources.local import path_from_uri

log = structlog.get_logger("syncd.engine")

ARTIFACT_READ_DEADLINE = 600.0  # seconds to find and digest one artifact (a big file)
LEASE_TTL = 120.0  # seconds a lease lasts unless renewed (at every step, and every ttl/3)


def worker_id(suffix: str = "") -> str:
    """A name for one writer that no other process, host or restart uses."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}{suffix}"


class Sink(Protocol):
    def resolve_run(self, spec: RunSpec, parent_run_id: str | None) -> ApplyResult: ...

    def apply(
        self,
        plan: WritePlan,
        *,
        run: ApplyResult,
        parent_run_id: str | None,
        uploads: list[ResolvedArtifact],
        model_files: Mapping[str, ResolvedArtifact] | None = None,
    ) -> ApplyResult: ...

    def link_parent(self, run_id: str, parent_run_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryBackoff:
    """When a waiting or failed record is tried again: exponential, capped, jittered."""

    base: float = 5.0
    cap: float = 300.0

    def delay(self, attempts: int) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)


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
    stopped: bool = False  # stopped between chunks (shutdown); the rest comes next time
    busy: bool = False  # another worker holds the record's lease: nothing done here
    busy_for: float = 0.0  # seconds that lease lasts at most, unless its holder renews it


class _Unset:
    pass


_UNSET = _Unset()


def settled_and_unchanged(
    row: RecordRow,
    size: int,
    mtime_ns: int,
    etag: str | None = None,
    *,
    recheck_blocked: bool = False,
) -> bool:
    """The ledger settled this record at exactly this size, mtime (and ETag, for an S3
    object): nothing to read.

    ``recheck_blocked``: a ``blocked`` record is not settled for this reader, which
    may be a newer syncd than the one that held the record back (it knows the event
    type or version now) or may find the other claimant of its record_id gone.
    """
    return (
        row.size == size
        and row.mtime_ns == mtime_ns
        and row.etag == etag
        and row.state in SETTLED_STATES
        and not (recheck_blocked and row.state == BLOCKED)
    )


class Engine:
    """Syncs one record at a time; whatever fails stays with that record."""

    def __init__(
        self,
        ledger: Ledger,
        sink: Sink,
        *,
        default_experiment: Callable[[RecordFile], str | None] | None = None,
        dry_run: bool = False,
        on_step: Callable[[], None] | None = None,
        backoff: RetryBackoff | None = None,
        bounded: Bounded | None = None,
        should_stop: Callable[[], bool] | None = None,
        worker: str | None = None,
        lease_ttl: float = LEASE_TTL,
        locate: Callable[[str], RecordFile | None] | None = None,
        progressing: Callable[[], bool] | None = None,
        trust_new_experiments: bool = False,
    ) -> None:
        self.ledger = ledger
        self.sink = sink
        self.default_experiment = default_experiment or (lambda _record: None)
        self.dry_run = dry_run
        self.on_step = on_step or (lambda: None)
        self.backoff = backoff or RetryBackoff()
        self.bounded: Bounded = bounded or unbounded
        # Asked between chunks: True stops a long record there (what was acknowledged
        # is kept; the rest is read on the next sync).
        self.should_stop = should_stop or (lambda: False)
        # The lease owner name of this engine: one per writer (thread), never shared.
        self.worker = worker or worker_id()
        self.lease_ttl = lease_ttl
        # One pass (a backfill): an experiment its writers created during the pass holds
        # no run but theirs, so a record no writer noted an intent for is not searched
        # for there. A daemon lives on while other processes (a manual backfill with
        # another state dir) may create runs in its experiments: it always searches.
        self.trust_new_experiments = trust_new_experiments
        self._lease: Lease | None = None
        # Renews the held lease while one long call runs (``progressing``: the
        # supervisor's verdict; a wedged call lets the lease expire).
        self.heartbeat = LeaseHeartbeat(ledger, name=self.worker, progressing=progressing)
        # The record at a ledger URI (None: a source this process cannot ask), to tell
        # whether an earlier holder of a record_id still exists.
        self.locate = locate or locate_local
        # Blocked records this engine has read once: each is read again once per
        # engine (a process start, an upgrade), then only when its file changes.
        self._rechecked: set[str] = set()

    def sync(self, record: RecordFile, row: RecordRow | _Unset | None = _UNSET) -> Outcome:
        """Bring MLflow up to date with the complete lines of ``record``.

        ``row`` is the record's ledger row when the caller already holds it (one
        query for a whole tree); unchanged records are skipped without a read.

        This is the record boundary: no exception from one record escapes it but
        a ledger failure (the ledger is shared by every record) and signals. MLflow
        being unavailable leaves the record ``waiting``; anything else leaves it
        ``failed`` with the reason. Both are retried with backoff. A record that
        vanishes while it is read is ``gone`` (no error: it was deleted).
        """
        if isinstance(row, _Unset):
            row = self.ledger.get_record(record.uri)
        unchanged, stat = self._unchanged(record, row)
        if unchanged is not None:
            return unchanged
        if self.dry_run:
            return self._contained(record, row, stat)
        # One worker projects a record at a time, anywhere in the fleet: the lease is
        # taken first, then the checkpoint read again (another worker may have moved
        # it, or died mid-record: we continue from what it committed).
        lease = self.ledger.acquire_lease(record.uri, self.worker, self.lease_ttl)
        if isinstance(lease, LeaseHolder):
            log.debug("record_leased_elsewhere", file=record.display, owner=lease.owner)
            return Outcome(
                source=record.display,
                state=row.state if row else PENDING,
                skipped=True,
                busy=True,
                busy_for=lease.expires_in,
                message=f"leased by {lease.owner} for {lease.expires_in:.0f}s more",
            )
        self._lease = lease
        self.heartbeat.hold(lease)
        try:
            current = self.ledger.get_record(record.uri)
            if (current.version if current else 0) != (row.version if row else 0):
                stat = None  # another worker moved it since our stat: look again
            return self._contained(record, current, stat)
        except LeaseLost as exc:
            log.warning("record_lease_lost", file=record.display, error=str(exc))
            current = self.ledger.get_record(record.uri)
            return Outcome(
                source=record.display,
                state=current.state if current else PENDING,
                skipped=True,
                busy=True,
                busy_for=self.lease_ttl,
                message=str(exc),
            )
        finally:
            self.heartbeat.release()
            self._lease = None
            try:
                self.ledger.release_lease(lease)
            except LedgerError as exc:  # it expires on its own
                log.warning("lease_release_failed", file=record.display, error=str(exc))

    def _unchanged(
        self, record: RecordFile, row: RecordRow | None
    ) -> tuple[Outcome | None, tuple[int, int] | None]:
        """The skip of a settled record whose file has not changed: no lease, no read.

        Also returns the stat, so the sync that follows does not ask the source again
        (on S3 that is a HEAD request).
        """
        try:
            size, mtime_ns = record.stat()
        except OSError:
            return None, None  # the sync reports it (or marks the record gone)
        if row is not None and settled_and_unchanged(
            row, size, mtime_ns, etag_of(record), recheck_blocked=self._recheck(row)
        ):
            return Outcome(source=record.display, state=row.state, skipped=True), None
        return None, (size, mtime_ns)

    def _recheck(self, row: RecordRow) -> bool:
        """True the first time this engine meets ``row`` blocked (see settled_and_unchanged)."""
        return row.state == BLOCKED and row.source not in self._rechecked

    def _commit(self, progress: Progress) -> None:
        progress.worker = self.worker
        if self._lease is not None:
            self.heartbeat.check()  # lost while a call ran: commit nothing
        self.ledger.commit(progress, self._lease)

    def _renew(self) -> None:
        """Between chunks and before each MLflow write: still ours, for a full ttl.

        Between these steps the heartbeat renews it (one step may be one long call);
        a renewal of its that found the lease taken over stops the record here.
        """
        if self._lease is not None:
            self.heartbeat.check()
            self.ledger.renew_lease(self._lease)

    def _contained(
        self, record: RecordFile, row: RecordRow | None, stat: tuple[int, int] | None = None
    ) -> Outcome:
        try:
            return self._sync(record, row, stat)
        except LedgerError:
            raise
        except _Claimed as exc:
            return self._block(record, str(exc))
        except FileNotFoundError:
            # Deleted between its discovery (a listing, a stat) and a read: gone, as if
            # never listed; what was acknowledged stays, and it is read again if it returns.
            return self._gone(record, self.ledger.get_record(record.uri))
        except TransientSinkError as exc:
            return self._hold(record, WAITING, exc)
        except SourceError as exc:  # S3 cannot be read now: the record is not at fault
            return self._hold(record, WAITING, exc, source=True)
        except Exception as exc:  # the record boundary: contain, report, go on
            return self._hold(record, FAILED, exc)

    def _sync(
        self, record: RecordFile, row: RecordRow | None, stat: tuple[int, int] | None = None
    ) -> Outcome:
        try:
            size, mtime_ns = stat if stat is not None else record.stat()
        except FileNotFoundError:
            return self._gone(record, row)
        etag = etag_of(record)  # of the version just stat-ed, which the reads are pinned to
        if row is not None and settled_and_unchanged(
            row, size, mtime_ns, etag, recheck_blocked=self._recheck(row)
        ):
            return Outcome(source=record.display, state=row.state, skipped=True)
        self._rechecked.add(record.uri)

        row = row or RecordRow(source=record.uri)
        reason = replaced_reason(record.read_at, size, _checkpoint(row))
        if reason is not None:
            log.warning("record_replaced", file=record.display, reason=reason)
            if not self.dry_run:
                row = self.ledger.restart_record(row, reason, self._lease)
            else:
                row = RecordRow(source=record.uri)

        outcome = Outcome(source=record.display, state=row.state)
        while True:
            if self.should_stop():
                outcome.stopped = True
                break
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
            parsed_tail: str | None = row.tail
            if parsed.lines_consumed:
                last = lines.lines[parsed.lines_consumed - 1]
                parsed_tail = (
                    tail_of(last)
                    if last is not None
                    else tail_at(record.read_at, row.offset + parsed.bytes_consumed)
                )
            self._step(
                record,
                row,
                parsed,
                (size, mtime_ns, etag) if settled else None,
                outcome,
                tail=parsed_tail,
            )
            self.on_step()
            if parsed.held_back is not None or parsed.lines_consumed == 0:
                break
        if outcome.stopped:
            pass  # not settled: the rest of the file is read on the next sync
        elif row.state in (PENDING, BOUND, WAITING, FAILED) and row.offset == 0:
            # No complete line yet: nothing to write until the file changes.
            if not self.dry_run and (row.size, row.mtime_ns, row.etag, row.state) != (
                size,
                mtime_ns,
                etag,
                PENDING,
            ):
                row.size, row.mtime_ns, row.etag, row.state = size, mtime_ns, etag, PENDING
                row.attempts, row.next_attempt_at = 0, None
                self._commit(Progress(record=row, kind="pending"))
        else:
            recovered = row.state in RETRY_STATES or row.state == BOUND
            if recovered:  # every line is acknowledged now: the retry is over
                row.state = ERROR if row.error_count else SYNCED
                row.attempts, row.next_attempt_at, row.last_error = 0, None, None
            self._settle(row, (size, mtime_ns, etag), force=recovered)
        outcome.state = row.state
        outcome.offset = row.offset
        return outcome

    def _block(self, record: RecordFile, reason: str) -> Outcome:
        """Hold the whole record back (``blocked``) until its file changes."""
        log.error("record_blocked", file=record.display, reason=reason)
        outcome = Outcome(source=record.display, state=BLOCKED, message=reason)
        outcome.errors.append(RecordError(reason, path=record.display, line=1, seq=0))
        if self.dry_run:
            return outcome
        row = self.ledger.get_record(record.uri) or RecordRow(source=record.uri)
        with contextlib.suppress(OSError):  # settled: looked at again when the file changes
            row.size, row.mtime_ns = record.stat()
            row.etag = etag_of(record)
        row.state = BLOCKED
        self._commit(Progress(record=row, kind="held", errors=list(outcome.errors), detail=reason))
        return outcome

    def _claimed_elsewhere(self, record: RecordFile, record_id: str) -> None:
        """Raise _Claimed when another live record file already holds ``record_id``."""
        for other in self.ledger.claimants(record_id, besides=record.uri):
            if self._vanished(other.source):
                continue  # moved or deleted: this record continues the run
            raise _Claimed(
                f"record_id {record_id} is already used by {_display(other.source)};"
                f" {record.display} is held back (give one of them a new record_id)"
            )

    def _vanished(self, uri: str) -> bool:
        """True when the record at ``uri`` is gone (a stat: a HEAD for an S3 object).

        A source that cannot be asked (an unknown scheme) counts as present; a source
        that cannot answer now (an endpoint down) raises, and the record is retried.
        """
        other = self.locate(uri)
        if other is None:
            return False
        try:
            other.stat()
        except (FileNotFoundError, NotADirectoryError):
            return True
        finally:
            close = getattr(other, "close", None)
            if close is not None:
                close()
        return False

    def _hold(
        self, record: RecordFile, state: str, exc: BaseException, *, source: bool = False
    ) -> Outcome:
        """Leave the record at its last acknowledged offset, ``waiting`` or ``failed``.

        ``source``: its source (S3) cannot be read now; it waits for its own retry,
        and MLflow is not taken for down (``retry_later`` stays False).
        """
        message = redact_text(_describe(exc))[:2000]
        outcome = Outcome(source=record.display, state=state, message=message)
        outcome.retry_later = state == WAITING and not source
        if state == FAILED:
            log.error("record_failed", file=record.display, error=message[:500])
            log.debug("record_failed_detail", file=record.display, exc_info=exc)
        else:
            event = "source_unavailable" if source else "sink_unavailable"
            log.warning(event, file=record.display, error=message[:300])
        if self.dry_run:
            return outcome
        row = self.ledger.get_record(record.uri) or RecordRow(source=record.uri)
        row.attempts += 1
        row.state = state
        row.last_error = message
        row.next_attempt_at = time.time() + self.backoff.delay(row.attempts)
        self._commit(Progress(record=row, kind=state, detail=f"attempt {row.attempts}: {message}"))
        outcome.offset = row.offset
        return outcome

    # -- one step ------------------------------------------------------------------

    def _step(
        self,
        record: RecordFile,
        row: RecordRow,
        parsed: ParsedLines,
        settled_stat: tuple[int, int, str | None] | None,
        outcome: Outcome,
        *,
        tail: str | None = None,
    ) -> None:
        """Apply one run of parsed lines and commit; raises when the sink did not ack."""
        plan = plan_writes(
            parsed.events,
            path=record.display,
            source_uri=record.uri,
            default_experiment=self.default_experiment(record),
        )
        errors = [*parsed.errors, *plan.problems, *_derived_problems(plan, record)]
        record_id = plan.run.record_id if plan.run else row.record_id
        if plan.run is not None and row.record_id != plan.run.record_id:
            self._claimed_elsewhere(record, plan.run.record_id)
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
            parent_record_id = (
                plan.run.parent_record_id if plan.run else (run.parent_record_id if run else None)
            )
            parent_run_id = None
            if parent_record_id and not (run and run.parent_linked):
                parent = self.ledger.get_run(parent_record_id)
                parent_run_id = parent.run_id if parent else None
            if run is None:
                assert plan.run is not None
                run = self._bind(row, plan.run, parent_record_id, parent_run_id)
                fresh = True
            else:
                fresh = False
            uploads = self._resolve_uploads(record, plan, record_id, errors)
            model_files = self._resolve_model_files(record, plan, errors)
            self._renew()  # a full ttl for this chunk's writes; the commit renews again
            try:
                result = self.sink.apply(
                    plan,
                    run=ApplyResult(
                        run_id=run.run_id, experiment_id=run.experiment_id, created=fresh
                    ),
                    parent_run_id=parent_run_id,
                    uploads=uploads,
                    model_files=model_files,
                )
            except PermanentSinkError as exc:
                raise _SinkRefused(str(exc)) from exc
            for problem in result.problems:
                problem.path = record.display
            errors.extend(result.problems)
            progress.run = RunRow(
                record_id=str(record_id),
                run_id=result.run_id,
                experiment_id=result.experiment_id,
                parent_record_id=parent_record_id,
                parent_linked=bool(parent_run_id) or run.parent_linked,
            )
            progress.artifacts = result.uploaded
            outcome.run_id = result.run_id
            outcome.artifacts += len(result.uploaded)

        row.offset += parsed.bytes_consumed
        row.tail = tail
        row.line += parsed.lines_consumed
        row.seq = parsed.last_seq
        row.skipped = parsed.skipped
        if row.state in RETRY_STATES:  # acknowledged: the failure no longer applies
            row.last_error = None
        row.attempts, row.next_attempt_at = 0, None
        if parsed.held_back is not None:
            if row.state != BLOCKED:
                errors.append(parsed.held_back)
            row.state = BLOCKED
            progress.kind = "held"
        else:
            if row.state == BLOCKED:
                # read past what held it back: that report was no loss (its line has
                # landed now), so it no longer counts against the record
                row.error_count = max(0, row.error_count - 1)
                row.last_error = None
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
            return
        if settled_stat is not None:  # only once every complete line is in: else re-read
            row.size, row.mtime_ns, row.etag = settled_stat
        self._commit(progress)
        if plan.run is not None and progress.run is not None:
            self._link_children(progress.run)
        if progress.run is not None and not progress.run.parent_linked:
            self._link_to_parent(progress.run)

    def _bind(
        self,
        row: RecordRow,
        spec: RunSpec,
        parent_record_id: str | None,
        parent_run_id: str | None,
    ) -> RunRow:
        """Create or adopt the record's run and commit the binding before any other write.

        Only under the record's lease, renewed just before: no other worker can be
        creating a run for this record now. One may have created it and died before
        binding it, so the run is first looked up by its tag.
        """
        first = self._note_intent(spec)
        resolved = self._adopt(spec, first) or self.sink.resolve_run(spec, parent_run_id)
        run = RunRow(
            record_id=spec.record_id,
            run_id=resolved.run_id,
            experiment_id=resolved.experiment_id,
            parent_record_id=parent_record_id,
            parent_linked=bool(parent_run_id),
        )
        if row.state == PENDING:
            row.state = BOUND
        self._commit(Progress(record=row, kind="bound", run=run, detail=f"run {resolved.run_id}"))
        return run

    def _note_intent(self, spec: RunSpec) -> bool:
        """Renew the lease and note in the ledger that a run may be created for this
        record from now on. True when no worker noted it before."""
        if self._lease is None or spec.mlflow_run_id:
            self._renew()
            return False
        self.heartbeat.check()
        return self.ledger.note_run_intent(spec.record_id, self._lease)

    def _adopt(self, spec: RunSpec, first_intent: bool) -> ApplyResult | None:
        """The run another writer created for this record and did not bind, if any.

        Other writers (threads, daemons) may have created one, unless none ever noted
        the intent to (``first_intent``) and the experiment is one this pass's writers
        created (it held no run then; ``trust_new_experiments``): only there is the
        search skipped.
        """
        find_run = getattr(self.sink, "find_run", None)
        experiment_of = getattr(self.sink, "experiment_id", None)
        created_here = getattr(self.sink, "experiment_created", None)
        if spec.mlflow_run_id:  # an existing run, named by the record: nothing to search
            return None
        if self._lease is None or find_run is None or experiment_of is None:
            return None
        calls = getattr(self.sink, "calls", None)  # a SQLite store's lock, when it has one
        with calls.serialised() if calls is not None else contextlib.nullcontext():
            experiment_id = str(experiment_of(spec.experiment))
            if (
                first_intent
                and self.trust_new_experiments
                and created_here is not None
                and created_here(experiment_id)
            ):
                return None
            existing = find_run(experiment_id, spec.record_id)
        if existing is None:
            return None
        if existing.info.lifecycle_stage != "active":
            raise PermanentSinkError(
                f"run {existing.info.run_id} is deleted in MLflow; restore it"
                f" (mlflow runs restore --run-id {existing.info.run_id}) to resume syncing"
            )
        log.info("run_adopted", run_id=existing.info.run_id, record_id=spec.record_id)
        return ApplyResult(run_id=existing.info.run_id, experiment_id=experiment_id, created=False)

    def _link_to_parent(self, child: RunRow) -> None:
        """A child bound while its parent was not yet: link it if the parent is bound now.

        The parent links the children it finds after binding, the child looks for the
        parent after binding: whichever commits second sees the other.
        """
        if not child.parent_record_id:
            return
        parent = self.ledger.get_run(child.parent_record_id)
        if parent is None:
            return
        try:
            self.sink.link_parent(child.run_id, parent.run_id)
        except SinkError as exc:
            log.warning("parent_link_failed", child_run_id=child.run_id, error=str(exc))
            return
        self.ledger.mark_linked(child.record_id)

    def _resolve_uploads(
        self, record: RecordFile, plan: WritePlan, record_id: str | None, errors: list[RecordError]
    ) -> list[ResolvedArtifact]:
        if not plan.artifacts:
            return []
        done = self.ledger.artifact_digests(record_id) if record_id else {}
        uploads: dict[str, ResolvedArtifact] = {}
        for item in plan.artifacts:
            try:
                with self.bounded(f"reading artifact {item.path}", ARTIFACT_READ_DEADLINE):
                    resolved = record.resolve_artifact(item.path, item.artifact_path)
            except SourceError:
                raise  # S3 cannot be asked now: the line is read again later, not skipped
            except (ArtifactRefused, OSError) as exc:
                errors.append(
                    RecordError(str(exc), path=record.display, line=item.line, seq=item.seq)
                )
                continue
            if done.get(resolved.key) != resolved.digest:  # the last event for a path wins
                uploads[resolved.key] = dataclasses.replace(resolved, line=item.line, seq=item.seq)
        return list(uploads.values())

    def _resolve_model_files(
        self, record: RecordFile, plan: WritePlan, errors: list[RecordError]
    ) -> dict[str, ResolvedArtifact]:
        """Each model's folder, confined to the run directory and digested."""
        files: dict[str, ResolvedArtifact] = {}
        for model in plan.models:
            if model.status != "READY":
                continue
            try:
                with self.bounded(f"reading model {model.path}", ARTIFACT_READ_DEADLINE):
                    resolved = record.resolve_artifact(model.path, None)
                if not resolved.is_dir:
                    raise ArtifactRefused(f"model {model.path} is not a folder")
            except (ArtifactRefused, OSError) as exc:
                errors.append(
                    RecordError(str(exc), path=record.display, line=model.line, seq=model.seq)
                )
                continue
            files[model.model_id] = dataclasses.replace(resolved, line=model.line, seq=model.seq)
        return files

    def _link_children(self, parent: RunRow) -> None:
        """Children seen before their parent get ``mlflow.parentRunId`` now."""
        for child in self.ledger.unlinked_children(parent.record_id):
            try:
                self.sink.link_parent(child.run_id, parent.run_id)
            except SinkError as exc:
                log.warning("parent_link_failed", child_run_id=child.run_id, error=str(exc))
                continue
            self.ledger.mark_linked(child.record_id)

    def _settle(
        self, row: RecordRow, stat: tuple[int, int, str | None], *, force: bool = False
    ) -> None:
        """Remember the size, mtime (and ETag) so an unchanged record is skipped unread."""
        if self.dry_run or ((row.size, row.mtime_ns, row.etag) == stat and not force):
            return
        row.size, row.mtime_ns, row.etag = stat
        self._commit(Progress(record=row, kind="settled"))

    def _gone(self, record: RecordFile, row: RecordRow | None) -> Outcome:
        if row is None:
            return Outcome(source=record.display, state=GONE, skipped=True)
        if row.state != GONE and not self.dry_run:
            log.warning("record_gone", file=record.display, record_id=row.record_id)
            row.state = GONE
            self._commit(Progress(record=row, kind="gone", detail="source file deleted"))
        return Outcome(source=record.display, state=GONE)


def _derived_problems(plan: WritePlan, record: RecordFile) -> list[RecordError]:
    """Mapping problems a derived record carries (``x-syncd-problem`` lines), reported
    once each, naming the source file, the field and the mapping entry."""
    out = []
    for event in plan.extensions:
        if event.type == PROBLEM_EVENT:
            f = event.fields
            reason = f"field {f.get('field')!r}: {f.get('reason')} (mapping entry {f.get('entry')})"
            path = str(f.get("file") or record.display)
            out.append(RecordError(reason, path=path, line=event.line, seq=event.seq))
    return out


def locate_local(uri: str) -> RecordFile | None:
    """The local record at a ``file://`` URI; None for any other source."""
    from syncd.sources.local import LocalRecord

    return LocalRecord(path_from_uri(uri)) if uri.startswith("file://") else None


class _Claimed(Exception):
    """Another record file already holds this record_id."""


def _display(source: str) -> str:
    return str(path_from_uri(source)) if source.startswith("file://") else source


class _SinkRefused(Exception):
    """MLflow refused a write for good: the record fails (retried later with backoff)."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _SinkRefused | SinkError):
        return f"MLflow refused: {exc}" if isinstance(exc, _SinkRefused) else str(exc)
    if isinstance(exc, SourceError):  # already one line naming the object and why
        return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _checkpoint(row: RecordRow) -> Checkpoint:
    return Checkpoint(
        offset=row.offset, line=row.line, seq=row.seq, fingerprint=row.fingerprint, tail=row.tail
    )
