"""One pass over every record under some roots: what ``syncd backfill`` does."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import structlog

from syncd.artifacts import clean_stale_stages
from syncd.config import Root, Settings
from syncd.engine import Engine, Outcome, locate_local, settled_and_unchanged, worker_id
from syncd.errors import ConfigError
from syncd.ledger import (
    BLOCKED,
    ERROR,
    FAILED,
    GONE,
    PENDING,
    SYNCED,
    WAITING,
    Ledger,
    RecordRow,
)
from syncd.logging import redact_text
from syncd.sink import MlflowSink, RetryPolicy
from syncd.snapshot.derived import (
    DerivedRecord,
    LocalRunDir,
    S3RunDir,
    SnapshotTranslator,
    Translator,
)
from syncd.snapshot.dvclive import DvcliveTranslator
from syncd.snapshot.mapping import Mapping, cached_mapping
from syncd.snapshot.tensorboard import EVENT_FILE_PREFIX, TensorboardTranslator
from syncd.sources import RecordFile, etag_of
from syncd.sources.local import LocalRecord, find_records, path_from_uri
from syncd.sources.s3 import (
    S3Object,
    S3Record,
    S3SourceError,
    client_for,
    list_records,
    posix_dirname,
    split_uri,
)
from syncd.store_schema import StoreSchemaError
from syncd.writers import WriterPool, writer_count

log = structlog.get_logger("syncd.backfill")


class Progress(Protocol):
    """A progress display, told after each record: its file and the events read from it."""

    def advance(self, file: str, events: int) -> None: ...


class _NoProgress:
    def advance(self, file: str, events: int) -> None:
        pass


@dataclass(slots=True)
class Summary:
    """Totals of a backfill; ``errors`` lists every line reported in this pass."""

    tracking_uri: str
    records: int = 0
    synced: int = 0
    unchanged: int = 0
    with_errors: int = 0
    failed: int = 0
    waiting: int = 0
    blocked: int = 0
    pending: int = 0
    gone: int = 0
    busy: int = 0  # another worker (another syncd) was syncing the record: left to it
    events: int = 0
    metric_points: int = 0
    artifacts: int = 0
    duration_s: float = 0.0
    aborted: str | None = None
    roots_failed: int = 0  # s3:// roots that could not be listed (the others are synced)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.records += 1
        if outcome.busy:
            self.busy += 1
        elif outcome.skipped:
            self.unchanged += 1
        counter = {
            SYNCED: "synced",
            ERROR: "with_errors",
            FAILED: "failed",
            WAITING: "waiting",
            BLOCKED: "blocked",
            PENDING: "pending",
            GONE: "gone",
        }.get(outcome.state)
        if counter and not outcome.busy:
            setattr(self, counter, getattr(self, counter) + 1)
        self.events += outcome.events
        self.metric_points += outcome.metric_points
        self.artifacts += outcome.artifacts
        for err in outcome.errors:
            self.errors.append(
                {
                    "file": err.path or outcome.source,
                    "line": err.line,
                    "seq": err.seq,
                    "reason": err.reason,
                }
            )
        if outcome.message and outcome.state in (FAILED, WAITING):
            self.errors.append(
                {"file": outcome.source, "line": None, "seq": None, "reason": outcome.message}
            )

    @property
    def clean(self) -> bool:
        return not (
            self.with_errors
            or self.failed
            or self.waiting
            or self.blocked
            or self.aborted
            or self.roots_failed
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sink_key(tracking_uri: str) -> str:
    """The ledger's name for a sink: the tracking URI without credentials."""
    return redact_text(tracking_uri)


def open_ledger(settings: Settings, *, read_only: bool = False) -> Ledger | None:
    """The ledger of ``settings``; None when read-only and there is none yet."""
    url = settings.ledger_url_resolved
    if settings.ledger_url is None:
        path = settings.state_dir / "ledger.db"
        if read_only and not path.exists():
            return None
        folder = settings.state_dir
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"state_dir {folder} is not a directory (a file is in the way)")
        try:
            created = not folder.exists()
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created:  # mkdir's mode is filtered by the umask
                folder.chmod(0o700)
        except OSError as exc:
            raise ConfigError(f"state_dir {folder}: cannot create it: {exc.strerror}") from exc
        if not read_only and not os.access(folder, os.W_OK | os.X_OK):
            # also true for root on a read-only file system (EROFS)
            raise ConfigError(f"state_dir {folder} is not writable (a read-only file system?)")
    return Ledger(url, sink_key(settings.tracking_uri))


def forget_records(settings: Settings, paths: list[Path | str]) -> int:
    """Make the ledger forget ``paths`` (or s3:// URIs) and every record it knew under them."""
    ledger = open_ledger(settings)
    assert ledger is not None
    try:
        sources = {path if isinstance(path, str) else path.absolute().as_uri() for path in paths}
        for root in settings.roots:
            if root.is_s3:
                bucket, prefix = split_uri(root.path)
                under = f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"
                sources.update(ledger.sources_under(under))
                continue
            folder = Path(root.path).absolute()
            if folder.is_dir():
                sources.update(ledger.sources_under(folder.as_uri().rstrip("/") + "/"))
            else:
                sources.add(folder.as_uri())
        forgotten = ledger.forget(sorted(sources))
    finally:
        ledger.close()
    log.info("resync_forgot", records=len(forgotten))
    return len(forgotten)


def iter_record_files(roots: Iterable[Root]) -> Iterator[tuple[Root, Path]]:
    """Record files under the local roots (s3:// roots are listed by :func:`iter_records`)."""
    for root in roots:
        if root.is_s3:
            continue
        path = Path(root.path)
        if not path.exists():
            raise ConfigError(f"root {root.path} does not exist")
        seen: set[Path] = set()
        for record in find_records(path, root.record_pattern):
            if root.format == "tensorboard":  # one run per folder, whatever its event files
                if record.parent in seen:
                    continue
                seen.add(record.parent)
            yield root, record


SourceRecord = LocalRecord | S3Record | DerivedRecord


def iter_records(
    roots: Iterable[Root],
    *,
    timeout: float = 30.0,
    on_root_error: Callable[[Root, S3SourceError], None] | None = None,
    state_dir: Path | None = None,
    read_only: bool = False,
) -> Iterator[tuple[Root, SourceRecord]]:
    """Every record under the roots, local and S3 mixed, in root order.

    An S3 record carries its listing (size, ETag, LastModified), so an unchanged one
    is skipped without a request. An S3 root that cannot be listed goes to
    ``on_root_error`` (raised when there is none); the other roots go on. A snapshot
    root yields derived records (kept under ``state_dir``; None: in memory).
    """
    for root in roots:
        if not root.is_s3:
            for _root, path in iter_record_files([root]):
                yield root, record_at(root, path, state_dir, read_only=read_only)
            continue
        client = client_for(root, timeout)
        try:
            listed = list_records(client, root.path, root.record_pattern)
            if root.derived:
                for run in s3_run_dirs(root, listed):
                    yield root, s3_derived_record(root, client, run, state_dir, read_only=read_only)
                continue
            for obj in listed:
                yield root, S3Record(client, obj.bucket, obj.key, obj)
        except S3SourceError as exc:
            if on_root_error is None:
                raise
            on_root_error(root, exc)


@dataclass(frozen=True, slots=True)
class S3RunDirRef:
    """A run directory of a derived s3:// root: where it is and which file names it."""

    bucket: str
    prefix: str  # the run directory's key prefix (no trailing slash)
    primary: str  # the file (relative to ``prefix``) whose URI is the record's identity

    @property
    def uri(self) -> str:
        """The record's URI (the ledger key): the primary file's."""
        key = f"{self.prefix}/{self.primary}" if self.prefix else self.primary
        return f"s3://{self.bucket}/{key}"


def s3_run_dirs(root: Root, objects: Iterable[S3Object]) -> list[S3RunDirRef]:
    """The run directories of a derived s3:// root, from the objects matching its
    record pattern (a TensorBoard folder is one run, named by its first event file)."""
    fixed = None if root.format == "tensorboard" else root_translator(root).primary
    runs: dict[tuple[str, str], str] = {}
    for obj in objects:
        if fixed is not None and (obj.key == fixed or obj.key.endswith("/" + fixed)):
            prefix = obj.key[: -len(fixed)].rstrip("/")
        else:
            prefix = posix_dirname(obj.key)
        name = obj.key[len(prefix) + 1 :] if prefix else obj.key
        known = runs.get((obj.bucket, prefix))
        runs[(obj.bucket, prefix)] = min(known, name) if known else name
    return [S3RunDirRef(bucket, prefix, primary) for (bucket, prefix), primary in runs.items()]


def s3_derived_record(
    root: Root,
    client: Any,
    run: S3RunDirRef,
    state_dir: Path | None,
    *,
    read_only: bool = False,
) -> DerivedRecord:
    """The derived record of one run directory of a derived s3:// root."""
    run_dir = S3RunDir(client, run.bucket, run.prefix)
    translator: Translator
    if root.format == "tensorboard":
        translator = TensorboardTranslator(
            run.primary, root.experiment or "tensorboard", root.finish_after_idle
        )
    else:
        translator = root_translator(root)
    return DerivedRecord(run_dir, translator, state_dir, read_only=read_only)


def root_mapping(root: Root) -> Mapping:
    assert root.mapping is not None
    return cached_mapping(Path(root.mapping))


def root_translator(root: Root) -> Translator:
    if root.format == "dvclive":
        return DvcliveTranslator(root.experiment or "dvclive", root.finish_after_idle)
    return SnapshotTranslator(root_mapping(root))


def record_at(
    root: Root, path: Path, state_dir: Path | None, *, read_only: bool = False
) -> LocalRecord | DerivedRecord:
    """The record a discovered local file stands for under ``root``."""
    if root.format == "tensorboard":  # the folder's first event file names its run
        first = min((p.name for p in path.parent.glob(f"{EVENT_FILE_PREFIX}*")), default=path.name)
        translator = TensorboardTranslator(
            first, root.experiment or "tensorboard", root.finish_after_idle
        )
        return DerivedRecord(LocalRunDir(path.parent), translator, state_dir, read_only=read_only)
    if root.derived:
        return DerivedRecord(
            LocalRunDir(path.parent), root_translator(root), state_dir, read_only=read_only
        )
    return LocalRecord(path)


def check_mappings(roots: Iterable[Root]) -> None:
    """Every snapshot root's mapping can be read (ConfigError naming it otherwise)."""
    for root in roots:
        if root.format == "snapshot":
            root_mapping(root)


def backfill(
    settings: Settings,
    *,
    dry_run: bool = False,
    progress: Callable[[int], AbstractContextManager[Progress]] | None = None,
    resync: bool = False,
    upgrade_store: bool = False,
) -> Summary:
    """Sync every record under ``settings.roots`` once; unchanged ones are skipped unread.

    ``progress(total)`` opens a display for ``total`` records, advanced after each one.
    With ``resync``, the ledger first forgets what it knew of those records for
    this sink (checkpoints, artifact digests, run bindings): they are projected
    again from the start into the runs that carry their ``syncd.record_id``.
    """
    started = time.perf_counter()
    summary = Summary(tracking_uri=sink_key(settings.tracking_uri))
    root_errors: list[tuple[Root, S3SourceError]] = []
    check_mappings(settings.roots)
    files = list(
        iter_records(
            settings.roots,
            timeout=settings.timeouts.http,
            on_root_error=lambda root, exc: root_errors.append((root, exc)),
            state_dir=None if dry_run else settings.state_dir,
        )
    )
    for root, exc in root_errors:
        reason = redact_text(exc.strerror or str(exc))
        log.error("root_unavailable", root=root.path, error=reason[:500])
        summary.roots_failed += 1
        summary.errors.append({"file": root.path, "line": None, "seq": None, "reason": reason})
    clean_stale_stages()
    if resync and not dry_run:
        forget_records(settings, [_resync_key(record) for _root, record in files])
    ledger = open_ledger(settings, read_only=dry_run)
    if ledger is None:  # a dry run before any sync: an in-memory ledger
        ledger = Ledger("sqlite://", sink_key(settings.tracking_uri))
    count = 1 if dry_run else writer_count(settings.tracking_uri, settings.writer.concurrency)
    created: set[str] = set()  # experiments any of these writers created
    sinks = [
        MlflowSink(
            settings.tracking_uri,
            retry=RetryPolicy(attempts=5, max_delay=5.0),
            artifact_root=settings.artifact_root,
            call_deadline=settings.timeouts.http + 5,
            created_experiments=created,
        )
        for _ in range(count)
    ]
    sink = sinks[0]
    schema_checked = False

    def check_store() -> None:
        """Before the first write (not on a pass with nothing to write: that stays fast)."""
        nonlocal schema_checked
        schema_checked = True
        try:
            if upgrade_store and not dry_run:
                sink.upgrade_store()
            sink.check_schema()
        except StoreSchemaError as exc:
            raise ConfigError(str(exc)) from exc

    if upgrade_store:
        check_store()
    locate = record_locator(settings.roots, settings.timeouts.http)
    pool = WriterPool(
        [
            (
                Engine(
                    ledger,
                    each,
                    default_experiment=root_experiments(settings.roots),
                    dry_run=dry_run,
                    worker=worker_id(f"/backfill{index}"),
                    lease_ttl=settings.writer.lease_ttl,
                    locate=locate,
                    trust_new_experiments=True,
                ),
                each,
            )
            for index, each in enumerate(sinks)
        ]
    )
    log.info(
        "backfill_start",
        tracking_uri=summary.tracking_uri,
        ledger=redact_text(ledger.url),
        roots=[root.path for root in settings.roots],
        records=len(files),
        dry_run=dry_run,
        writers=count,
    )
    known = ledger.all_records()
    bar = progress(len(files)) if progress else nullcontext(_NoProgress())
    sink_down: str | None = None
    running: deque[tuple[str, Future[Outcome]]] = deque()

    def collect(shown: Progress) -> None:
        nonlocal sink_down
        display, future = running.popleft()
        outcome = future.result()
        summary.add(outcome)
        shown.advance(display, outcome.events)
        if outcome.retry_later and sink_down is None:
            sink_down = f"MLflow is unavailable ({outcome.message})"
            log.error("sink_unavailable_pass_continues", reason=sink_down[:300])

    try:
        with bar as shown:
            for _root, record in files:
                row = known.get(record.uri)
                if sink_down is not None and _needs_writes(record, row):
                    # MLflow is down: name the record instead of waiting on each one.
                    record.close()
                    done: Future[Outcome] = Future()
                    done.set_result(
                        Outcome(
                            source=record.display,
                            state=WAITING,
                            retry_later=True,
                            message=f"not attempted: {sink_down}",
                        )
                    )
                    running.append((record.display, done))
                else:
                    if (
                        not schema_checked
                        and not dry_run
                        and (_needs_writes(record, row) or (row and row.state == BLOCKED))
                    ):
                        check_store()
                    future = pool.submit(record.uri, partial(_sync_closing, record=record, row=row))
                    assert future is not None  # every path is distinct
                    running.append((record.display, future))
                # results in file order; at most a few records ahead of the oldest
                while running and (running[0][1].done() or len(running) > 2 * pool.size):
                    collect(shown)
            while running:
                collect(shown)
    finally:
        pool.close()
        ledger.close()
    summary.duration_s = round(time.perf_counter() - started, 3)
    log.info("backfill_done", **{k: v for k, v in summary.as_dict().items() if k != "errors"})
    return summary


def _sync_closing(engine: Engine, *, record: SourceRecord, row: RecordRow | None) -> Outcome:
    try:
        return engine.sync(record, row)
    finally:
        record.close()


def _resync_key(record: SourceRecord) -> Path | str:
    return record.path if isinstance(record, LocalRecord) else record.uri


def _needs_writes(record: RecordFile, row: RecordRow | None) -> bool:
    """False when the engine would skip the record unread (unchanged and settled)."""
    if isinstance(record, S3Record):
        size, mtime_ns = record.listed_stat() or (-1, -1)
    else:
        try:
            size, mtime_ns = record.stat()
        except OSError:
            return False
    return row is None or not settled_and_unchanged(row, size, mtime_ns, etag_of(record))


def record_locator(
    roots: Iterable[Root], timeout: float = 30.0
) -> Callable[[str], RecordFile | None]:
    """The record at a ledger URI: local, or an S3 object asked through its root's client
    (the endpoint and region of the root it lies under; else the default endpoint)."""
    s3_roots = [root for root in roots if root.is_s3]

    def locate(uri: str) -> RecordFile | None:
        if uri.startswith("file://"):
            return locate_local(uri)
        if not uri.startswith("s3://"):
            return None
        bucket, _key = split_uri(uri)
        root = next(
            (r for r in s3_roots if uri.startswith(r.path.rstrip("/") + "/")),
            next(
                (r for r in s3_roots if split_uri(r.path)[0] == bucket),
                Root(path=f"s3://{bucket}"),
            ),
        )
        return S3Record.from_uri(client_for(root, timeout), uri)

    return locate


def root_experiments(roots: Iterable[Root]) -> Callable[[Any], str | None]:
    """The default experiment of the root a record lives under (for records naming none)."""
    defaults = [
        (Path(root.path), root.experiment) for root in roots if root.experiment and not root.is_s3
    ]
    s3_defaults = [
        (root.path.rstrip("/") + "/", root.experiment)
        for root in roots
        if root.experiment and root.is_s3
    ]

    def experiment_for(record: Any) -> str | None:
        if isinstance(record, S3Record | DerivedRecord) and record.uri.startswith("s3://"):
            uri = record.uri
            return next((exp for base, exp in s3_defaults if uri.startswith(base)), None)
        path: Path | None = (
            path_from_uri(record.uri)
            if isinstance(record, DerivedRecord)
            else getattr(record, "path", None)
        )
        for root, experiment in defaults:
            if path is not None and path.is_relative_to(root):
                return experiment
        return None

    return experiment_for
