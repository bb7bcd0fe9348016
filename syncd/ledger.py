"""The ledger: where each record stands against a sink, and what happened (SQLAlchemy 2).

One SQLite file in the state dir by default (WAL, busy timeout); the same
schema runs on PostgreSQL so hosts of a fleet can share it. Every row is keyed
by the sink (the tracking URI, credentials removed), so pointing syncd at
another MLflow starts that mirror from scratch instead of trusting run ids that
belong elsewhere.

Checkpoints are committed only after MLflow accepted the writes they cover:
a crash in between replays the writes (idempotent), it never skips them.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from syncd.errors import LedgerError, RecordError
from syncd.pids import alive

log = structlog.get_logger("syncd.ledger")

# Record states: the ledger is a state machine per record and sink.
#
#   pending --bind--> bound --write+ack--> synced | error | blocked
#      |                |                        |
#      +----------------+--- sink transient ---> waiting  (retried with backoff)
#      +----------------+--- anything else ----> failed   (retried with backoff)
#
# A refused or unanswered write never moves a record forward: ``waiting`` and
# ``failed`` keep the last acknowledged offset and are never "settled".
PENDING = "pending"  # new: no complete first line yet, or nothing written yet
BOUND = "bound"  # the run exists in MLflow and is bound to the record; writes follow
SYNCED = "synced"  # every complete line applied, no errors
ERROR = "error"  # applied, but some lines or entries were reported
WAITING = "waiting"  # MLflow was unavailable or did not answer; retried with backoff
FAILED = "failed"  # syncing this record raised an error; retried with backoff
BLOCKED = "blocked"  # a newer format version holds the rest back
GONE = "gone"  # the file disappeared; MLflow untouched
STATES = (SYNCED, ERROR, PENDING, BOUND, WAITING, FAILED, BLOCKED, GONE)
SETTLED_STATES = frozenset({SYNCED, ERROR, BLOCKED, PENDING})  # nothing to do until it changes
RETRY_STATES = frozenset({WAITING, FAILED})  # retried on every backfill, by the daemon on time

metadata = sa.MetaData()

records = sa.Table(
    "syncd_records",
    metadata,
    sa.Column("sink", sa.String(512), primary_key=True),
    sa.Column("source", sa.String(2048), primary_key=True),
    sa.Column("record_id", sa.String(128), index=True),
    sa.Column("size", sa.BigInteger, nullable=False, default=0),
    sa.Column("mtime_ns", sa.BigInteger, nullable=False, default=0),
    sa.Column("offset", sa.BigInteger, nullable=False, default=0),
    sa.Column("line", sa.Integer, nullable=False, default=0),
    sa.Column("seq", sa.Integer, nullable=False, default=-1),
    sa.Column("skipped", sa.Integer, nullable=False, default=0),
    sa.Column("fingerprint", sa.String(64)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error_count", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text),
    sa.Column("last_sync_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    # schema 2: retries and compare-and-set
    sa.Column("attempts", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("next_attempt_at", sa.Float),
    sa.Column("version", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("tail", sa.String(80)),  # continuity mark of the last consumed line
    sa.Column("etag", sa.String(128)),  # schema 4: an S3 object's ETag (NULL for files)
)

runs = sa.Table(
    "syncd_runs",
    metadata,
    sa.Column("sink", sa.String(512), primary_key=True),
    sa.Column("record_id", sa.String(128), primary_key=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("experiment_id", sa.String(64), nullable=False),
    sa.Column("parent_record_id", sa.String(128), index=True),
    sa.Column("parent_linked", sa.Boolean, nullable=False, default=False),
)

artifacts = sa.Table(
    "syncd_artifacts",
    metadata,
    sa.Column("sink", sa.String(512), primary_key=True),
    sa.Column("record_id", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(1024), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("uploaded_at", sa.Float, nullable=False),
)

record_errors = sa.Table(
    "syncd_record_errors",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sink", sa.String(512), nullable=False),
    sa.Column("source", sa.String(2048), nullable=False),
    sa.Column("line", sa.Integer, nullable=False),
    sa.Column("seq", sa.Integer),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_syncd_record_errors_source", "sink", "source"),
)

sync_events = sa.Table(
    "syncd_sync_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("sink", sa.String(512), nullable=False),
    sa.Column("source", sa.String(2048), nullable=False),
    sa.Column("record_id", sa.String(128)),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("first_seq", sa.Integer),
    sa.Column("last_seq", sa.Integer),
    sa.Column("events", sa.Integer, nullable=False, default=0),
    sa.Column("metric_points", sa.Integer, nullable=False, default=0),
    sa.Column("detail", sa.Text),
    sa.Column("worker", sa.String(256)),  # schema 3: the writer that committed it
)

extension_events = sa.Table(
    "syncd_extension_events",
    metadata,
    sa.Column("sink", sa.String(512), primary_key=True),
    sa.Column("source", sa.String(2048), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("type", sa.String(128), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)

# schema 3: one worker projects a record at a time (see :meth:`Ledger.acquire_lease`)
leases = sa.Table(
    "syncd_leases",
    metadata,
    sa.Column("sink", sa.String(512), primary_key=True),
    sa.Column("source", sa.String(2048), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),  # epoch seconds, database clock
    sa.Column("acquired_at", sa.Float, nullable=False),
)

# schema 5: records a worker may have created a run for (see :meth:`Ledger.note_run_intent`)
run_intents = sa.Table(
    "syncd_run_intents",
    metadata,
    sa.Column("sink", sa.String(512), primary_key=True),
    sa.Column("record_id", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

meta = sa.Table(
    "syncd_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)


@dataclass(slots=True)
class RecordRow:
    source: str
    record_id: str | None = None
    size: int = 0
    mtime_ns: int = 0
    offset: int = 0
    line: int = 0
    seq: int = -1
    skipped: int = 0
    fingerprint: str | None = None
    state: str = PENDING
    error_count: int = 0
    last_error: str | None = None
    last_sync_at: float | None = None
    attempts: int = 0  # failed tries since the last acknowledged step
    next_attempt_at: float | None = None  # epoch seconds; None: no retry scheduled
    version: int = 0  # the row's version in the ledger (0: no row yet); compare-and-set
    tail: str | None = None  # continuity mark of the last consumed line
    etag: str | None = None  # the S3 object's ETag when it was settled (None: a file)


@dataclass(slots=True)
class RunRow:
    record_id: str
    run_id: str
    experiment_id: str
    parent_record_id: str | None = None
    parent_linked: bool = False


@dataclass(slots=True)
class Progress:
    """What one step of a record changed, committed in one transaction."""

    record: RecordRow
    kind: str  # applied, failed, replaced, gone, held
    run: RunRow | None = None
    errors: list[RecordError] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # key -> digest
    extensions: list[tuple[int, str, str]] = field(default_factory=list)  # seq, type, body
    first_seq: int | None = None
    last_seq: int | None = None
    events: int = 0
    metric_points: int = 0
    detail: str | None = None
    worker: str | None = None  # the writer committing it (the lease owner)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# The newest migration in syncd/ledger_migrations/versions (a test keeps them equal).
LEDGER_SCHEMA_HEAD = "0005"


class LedgerConflict(LedgerError):
    """The record's row changed under us (another writer moved it): re-read and retry."""


class LeaseLost(LedgerConflict):
    """Another worker took the record's lease over (ours had expired): stop writing it."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to project one record, held by ``owner`` (a worker id) and renewed."""

    source: str
    owner: str
    ttl: float


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds a record's lease we could not take, and for how long still."""

    owner: str
    expires_in: float


class Ledger:
    """Checkpoints, the record -> run map, uploaded artifacts and the sync event log."""

    def __init__(self, url: str, sink: str) -> None:
        self.url = url
        self.sink = sink
        try:
            self.engine: Engine = _create_engine(url)
            self._migrate()
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(_failure("cannot open the ledger", url, exc)) from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(_failure("ledger read failed", self.url, exc)) from exc

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(_failure("ledger write failed", self.url, exc)) from exc

    def _at_head(self) -> bool:
        """True when the ledger already has this syncd's schema (one small query)."""
        try:
            with self.engine.connect() as conn:
                found = conn.execute(
                    sa.text("SELECT version_num FROM syncd_alembic_version")
                ).scalars()
                return list(found) == [LEDGER_SCHEMA_HEAD]
        except sa.exc.SQLAlchemyError:
            return False  # no version table yet (a new or an older ledger)

    def _migrate(self) -> None:
        """Bring the schema to this syncd's head with alembic, one process at a time.

        Many daemons may start at once on one ledger: the migration runs under
        ``pg_advisory_lock`` on PostgreSQL and a file lock beside a SQLite ledger.
        A ledger made before migrations existed (schema 1) is stamped first.
        """
        if self._at_head():
            return  # the common case: no alembic import, no lock
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "ledger_migrations"))
        script = ScriptDirectory.from_config(config)
        head = script.get_current_head()
        with _migration_lock(self.engine), self.engine.begin() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": "syncd_alembic_version"}
            )
            current = context.get_current_revision()
            if current is not None and current != head:
                try:
                    script.get_revision(current)
                except Exception:
                    raise LedgerError(
                        f"the ledger at {_safe_url(self.url)} has schema {current}, newer than"
                        f" this syncd ({head}); upgrade syncd"
                    ) from None
            config.attributes["connection"] = conn
            if current is None:
                existing = _legacy_revision(conn)
                if existing is not None:  # made before migrations: adopt it
                    command.stamp(config, existing)
            if current != head:
                command.upgrade(config, "head")
                log.info("ledger_migrated", ledger=_safe_url(self.url), schema=head)

    # -- reads ---------------------------------------------------------------------

    def all_records(self) -> dict[str, RecordRow]:
        """Every record of this sink by source: one query, for a fast unchanged-tree pass."""
        with self._read() as conn:
            rows = conn.execute(sa.select(records).where(records.c.sink == self.sink))
            return {row.source: _record_row(row) for row in rows}

    def get_record(self, source: str) -> RecordRow | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(records).where(records.c.sink == self.sink, records.c.source == source)
            ).first()
        return _record_row(row) if row else None

    def get_run(self, record_id: str) -> RunRow | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(runs).where(runs.c.sink == self.sink, runs.c.record_id == record_id)
            ).first()
        return _run_row(row) if row else None

    def claimants(self, record_id: str, *, besides: str) -> list[RecordRow]:
        """Other records of this sink that hold ``record_id`` and are not gone."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(records).where(
                    records.c.sink == self.sink,
                    records.c.record_id == record_id,
                    records.c.source != besides,
                    records.c.state != GONE,
                )
            )
            return [_record_row(row) for row in rows]

    def unlinked_children(self, parent_record_id: str) -> list[RunRow]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(runs).where(
                    runs.c.sink == self.sink,
                    runs.c.parent_record_id == parent_record_id,
                    runs.c.parent_linked.is_(False),
                )
            )
            return [_run_row(row) for row in rows]

    def artifact_digests(self, record_id: str) -> dict[str, str]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(artifacts.c.key, artifacts.c.digest).where(
                    artifacts.c.sink == self.sink, artifacts.c.record_id == record_id
                )
            )
            return {row.key: row.digest for row in rows}

    def errors_of(self, source: str) -> list[tuple[int, int | None, str]]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(record_errors.c.line, record_errors.c.seq, record_errors.c.reason)
                .where(record_errors.c.sink == self.sink, record_errors.c.source == source)
                .order_by(record_errors.c.line, record_errors.c.id)
            )
            return [(row.line, row.seq, row.reason) for row in rows]

    def recent_events(self, limit: int = 20) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(sync_events)
                .where(sync_events.c.sink == self.sink)
                .order_by(sync_events.c.id.desc())
                .limit(limit)
            )
            return [dict(row._mapping) for row in rows]

    # -- writes --------------------------------------------------------------------

    def commit(self, progress: Progress, lease: Lease | None = None) -> None:
        """Checkpoint, run map, artifacts, errors and the audit event: all or nothing.

        With ``lease``, the transaction also renews it and commits nothing (raising
        :class:`LeaseLost`) when another worker holds it now: a worker whose lease
        was taken over can never move the record's checkpoint.
        """
        now = time.time()
        rec = progress.record
        rec.error_count += len(progress.errors)
        if progress.errors:
            rec.last_error = progress.errors[-1].describe()
        if progress.kind == "applied":
            rec.last_sync_at = now
        with self._tx() as conn:
            if lease is not None:
                self._fence(conn, lease)
            self._write_record(conn, rec, now)
            if progress.run is not None:
                run = progress.run
                self._upsert(
                    conn,
                    runs,
                    {
                        "sink": self.sink,
                        "record_id": run.record_id,
                        "run_id": run.run_id,
                        "experiment_id": run.experiment_id,
                        "parent_record_id": run.parent_record_id,
                        "parent_linked": run.parent_linked,
                    },
                    ("sink", "record_id"),
                )
            if progress.errors:
                conn.execute(
                    record_errors.insert(),
                    [
                        {
                            "sink": self.sink,
                            "source": rec.source,
                            "line": err.line,
                            "seq": err.seq,
                            "reason": err.reason,
                            "at": now,
                        }
                        for err in progress.errors
                    ],
                )
            for key, digest in progress.artifacts.items():
                self._upsert(
                    conn,
                    artifacts,
                    {
                        "sink": self.sink,
                        "record_id": rec.record_id,
                        "key": key,
                        "digest": digest,
                        "uploaded_at": now,
                    },
                    ("sink", "record_id", "key"),
                )
            for seq, etype, body in progress.extensions:
                self._upsert(
                    conn,
                    extension_events,
                    {
                        "sink": self.sink,
                        "source": rec.source,
                        "seq": seq,
                        "type": etype,
                        "body": body,
                    },
                    ("sink", "source", "seq"),
                )
            conn.execute(
                sync_events.insert().values(
                    at=now,
                    sink=self.sink,
                    source=rec.source,
                    record_id=rec.record_id,
                    kind=progress.kind,
                    first_seq=progress.first_seq,
                    last_seq=progress.last_seq,
                    events=progress.events,
                    metric_points=progress.metric_points,
                    detail=progress.detail,
                    worker=progress.worker or (lease.owner if lease else None),
                )
            )
        rec.version += 1

    def _write_record(self, conn: Connection, rec: RecordRow, now: float) -> None:
        """Insert or update the record's row, only if it is still the version we read."""
        values = _record_values(self.sink, rec, now)
        values["version"] = rec.version + 1
        if rec.version == 0:
            try:
                conn.execute(records.insert().values(values))
            except sa.exc.IntegrityError as exc:
                raise LedgerConflict(
                    f"{rec.source}: another writer created this record's row first"
                ) from exc
            return
        result = conn.execute(
            records.update()
            .where(
                records.c.sink == self.sink,
                records.c.source == rec.source,
                records.c.version == rec.version,
            )
            .values(values)
        )
        if result.rowcount != 1:
            raise LedgerConflict(
                f"{rec.source}: the record's row changed since it was read (version"
                f" {rec.version}); re-read it"
            )

    def restart_record(self, row: RecordRow, reason: str, lease: Lease | None = None) -> RecordRow:
        """The file no longer continues what was synced: forget position and errors."""
        fresh = RecordRow(source=row.source)
        with self._tx() as conn:
            if lease is not None:
                self._fence(conn, lease)
            conn.execute(
                record_errors.delete().where(
                    record_errors.c.sink == self.sink, record_errors.c.source == row.source
                )
            )
            deleted = conn.execute(
                records.delete().where(
                    records.c.sink == self.sink,
                    records.c.source == row.source,
                    records.c.version == row.version,
                )
            )
            if row.version and deleted.rowcount != 1:
                raise LedgerConflict(f"{row.source}: the record's row changed since it was read")
        self.commit(Progress(record=fresh, kind="replaced", detail=reason), lease)
        return fresh

    # -- leases --------------------------------------------------------------------
    #
    # One worker projects a record at a time. A lease is a row per (sink, source)
    # naming its owner and an expiry on the database's clock (hosts of a fleet may
    # disagree about the time; the database is the one clock they share). It is
    # taken with atomic conditional statements that behave the same on SQLite and
    # PostgreSQL: an INSERT that does nothing when a row exists, then an UPDATE
    # that only matches a free, expired or already-owned lease; the row count says
    # who won. No transaction stays open while MLflow is called (a
    # ``SELECT ... FOR UPDATE SKIP LOCKED`` lease would hold one, and a connection
    # per worker, for as long as the record syncs), and a worker that dies leaves
    # a lease that simply expires.

    def _db_now(self) -> sa.ColumnElement[float]:
        """Epoch seconds on the database's clock."""
        if self.engine.dialect.name == "postgresql":
            return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float)
        return sa.cast(
            (sa.func.julianday(sa.literal_column("'now'")) - 2440587.5) * 86400.0, sa.Float
        )

    def acquire_lease(self, source: str, owner: str, ttl: float) -> Lease | LeaseHolder:
        """Take the record's lease (free, expired, or ours already), else say who has it."""
        key = (leases.c.sink == self.sink, leases.c.source == source)
        with self._tx() as conn:
            now = conn.execute(sa.select(self._db_now())).scalar_one()
            inserted = conn.execute(
                self._insert(conn, leases)
                .values(
                    sink=self.sink,
                    source=source,
                    owner=owner,
                    expires_at=now + ttl,
                    acquired_at=now,
                )
                .on_conflict_do_nothing(index_elements=["sink", "source"])
            )
            if inserted.rowcount == 1:
                return Lease(source, owner, ttl)
            taken = conn.execute(
                leases.update()
                .where(*key, sa.or_(leases.c.owner == owner, leases.c.expires_at < self._db_now()))
                .values(owner=owner, expires_at=self._db_now() + ttl, acquired_at=self._db_now())
            )
            if taken.rowcount == 1:
                return Lease(source, owner, ttl)
            holder = conn.execute(
                sa.select(leases.c.owner, leases.c.expires_at - self._db_now()).where(*key)
            ).first()
        if holder is None:  # released between our two statements: try again
            return self.acquire_lease(source, owner, ttl)
        if _dead_local_owner(holder[0]):
            # A process of this host that died (a SIGKILL, a crash) holds it: waiting for
            # the expiry would only delay the restarted service. Take it over, unless
            # someone else did first.
            with self._tx() as conn:
                taken = conn.execute(
                    leases.update()
                    .where(*key, leases.c.owner == holder[0])
                    .values(
                        owner=owner, expires_at=self._db_now() + ttl, acquired_at=self._db_now()
                    )
                )
            if taken.rowcount == 1:
                log.info("lease_taken_over", source=source, dead_owner=holder[0])
                return Lease(source, owner, ttl)
            return self.acquire_lease(source, owner, ttl)
        return LeaseHolder(owner=holder[0], expires_in=max(0.0, float(holder[1])))

    def renew_lease(self, lease: Lease) -> None:
        """Push the lease's expiry out by its ttl; :class:`LeaseLost` if another took it."""
        with self._tx() as conn:
            self._fence(conn, lease)

    def note_run_intent(self, record_id: str, lease: Lease) -> bool:
        """Renew ``lease`` and note that its owner is about to create ``record_id``'s run.

        Returns True when no worker noted that intent before: no run can have been
        created for the record through this ledger (the adoption search may then be
        skipped where no one else can have created runs). Intents are never dropped,
        not by ``forget`` either: a run they announce may still exist.
        """
        with self._tx() as conn:
            self._fence(conn, lease)
            inserted = conn.execute(
                self._insert(conn, run_intents)
                .values(sink=self.sink, record_id=record_id, owner=lease.owner, at=time.time())
                .on_conflict_do_nothing(index_elements=["sink", "record_id"])
                .returning(run_intents.c.record_id)  # (psycopg's rowcount here is -1)
            )
            return inserted.first() is not None

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up (if still ours): the next worker need not wait for it to expire."""
        with self._tx() as conn:
            conn.execute(
                leases.delete().where(
                    leases.c.sink == self.sink,
                    leases.c.source == lease.source,
                    leases.c.owner == lease.owner,
                )
            )

    def lease_of(self, source: str) -> tuple[str, float] | None:
        """The owner of the record's lease and its expiry (database clock), if any."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(leases.c.owner, leases.c.expires_at).where(
                    leases.c.sink == self.sink, leases.c.source == source
                )
            ).first()
        return (row[0], float(row[1])) if row else None

    def _fence(self, conn: Connection, lease: Lease) -> None:
        renewed = conn.execute(
            leases.update()
            .where(
                leases.c.sink == self.sink,
                leases.c.source == lease.source,
                leases.c.owner == lease.owner,
            )
            .values(expires_at=self._db_now() + lease.ttl)
        )
        if renewed.rowcount != 1:
            raise LeaseLost(f"{lease.source}: another worker took this record's lease over")

    def _insert(self, conn: Connection, table: sa.Table) -> Any:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        raise LedgerError(f"unsupported ledger database {dialect!r}: use SQLite or PostgreSQL")

    def forget(self, sources: Sequence[str]) -> list[str]:
        """Drop checkpoints, errors, artifact digests and run bindings of ``sources``.

        The next sync projects them again from the start and finds their runs by
        the ``syncd.record_id`` tag (kept, not duplicated). Returns the sources
        the ledger knew.
        """
        known: list[str] = []
        with self._tx() as conn:
            for source in sources:
                row = conn.execute(
                    sa.select(records.c.record_id).where(
                        records.c.sink == self.sink, records.c.source == source
                    )
                ).first()
                if row is None:
                    continue
                known.append(source)
                if row.record_id:
                    for table in (artifacts, runs):
                        conn.execute(
                            table.delete().where(
                                table.c.sink == self.sink, table.c.record_id == row.record_id
                            )
                        )
                for table in (record_errors, extension_events, records):
                    conn.execute(
                        table.delete().where(table.c.sink == self.sink, table.c.source == source)
                    )
                conn.execute(
                    sync_events.insert().values(
                        at=time.time(),
                        sink=self.sink,
                        source=source,
                        record_id=row.record_id,
                        kind="forgotten",
                        events=0,
                        metric_points=0,
                        detail="resync: projected again from the start",
                    )
                )
        return known

    def sources_under(self, prefix: str) -> list[str]:
        """Sources of this sink whose URI starts with ``prefix`` (a folder's file:// URI)."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(records.c.source).where(
                    records.c.sink == self.sink, records.c.source.startswith(prefix)
                )
            )
            return [row.source for row in rows]

    def events_of(self, source: str) -> list[dict[str, Any]]:
        """The sync events of one record, oldest first (audits, tests of the fleet)."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(sync_events)
                .where(sync_events.c.sink == self.sink, sync_events.c.source == source)
                .order_by(sync_events.c.id)
            )
            return [dict(row._mapping) for row in rows]

    def sinks(self) -> list[str]:
        """Every sink this ledger holds records or runs for."""
        with self._read() as conn:
            found = {row[0] for row in conn.execute(sa.select(records.c.sink).distinct())}
            found |= {row[0] for row in conn.execute(sa.select(runs.c.sink).distinct())}
        return sorted(found)

    def view(self, sink: str) -> Ledger:
        """The same database seen for another sink (shares the connection pool)."""
        other = copy.copy(self)
        other.sink = sink
        return other

    def due_retries(self, now: float) -> list[RecordRow]:
        """Records waiting or failed whose next try is due."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(records).where(
                    records.c.sink == self.sink,
                    records.c.state.in_(tuple(RETRY_STATES)),
                    sa.or_(records.c.next_attempt_at.is_(None), records.c.next_attempt_at <= now),
                )
            )
            return [_record_row(row) for row in rows]

    def prune_events(self, older_than: float) -> int:
        """Delete sync events recorded before ``older_than`` (epoch seconds)."""
        with self._tx() as conn:
            result = conn.execute(sync_events.delete().where(sync_events.c.at < older_than))
            return int(result.rowcount or 0)

    def mark_linked(self, record_id: str) -> None:
        with self._tx() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.sink == self.sink, runs.c.record_id == record_id)
                .values(parent_linked=True)
            )

    def _upsert(
        self, conn: Connection, table: sa.Table, values: dict[str, Any], keys: Sequence[str]
    ) -> None:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: Any = pg_insert(table).values(values)
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table).values(values)
        else:
            raise LedgerError(f"unsupported ledger database {dialect!r}: use SQLite or PostgreSQL")
        update = {k: v for k, v in values.items() if k not in keys}
        conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=update))

    # -- status --------------------------------------------------------------------

    def state_counts(self) -> dict[str, int]:
        with self._read() as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    sa.select(records.c.state, sa.func.count())
                    .where(records.c.sink == self.sink)
                    .group_by(records.c.state)
                ).all()
            )
        return {state: int(counts.get(state, 0)) for state in STATES}

    def summary(self) -> dict[str, Any]:
        """Counts per state, the last sync, and every record with errors."""
        counts = self.state_counts()
        with self._read() as conn:
            last_sync = conn.execute(
                sa.select(sa.func.max(records.c.last_sync_at)).where(records.c.sink == self.sink)
            ).scalar()
            problem_rows = conn.execute(
                sa.select(
                    records.c.source,
                    records.c.record_id,
                    records.c.state,
                    records.c.last_error,
                    records.c.attempts,
                    records.c.next_attempt_at,
                )
                .where(
                    records.c.sink == self.sink,
                    records.c.state.in_((ERROR, FAILED, WAITING, BLOCKED)),
                )
                .order_by(records.c.source)
            ).all()
        problems = [
            {
                "source": row.source,
                "record_id": row.record_id,
                "state": row.state,
                "reason": row.last_error if row.state in RETRY_STATES else None,
                "attempts": row.attempts or 0,
                "next_attempt_at": row.next_attempt_at,
                "errors": [
                    {"line": line, "seq": seq, "reason": reason}
                    for line, seq, reason in self.errors_of(row.source)
                ],
            }
            for row in problem_rows
        ]
        return {
            "sink": self.sink,
            "records": counts,
            "last_sync_at": last_sync,
            "records_with_errors": problems,
        }


def _dead_local_owner(owner: str) -> bool:
    """True when a lease owner (``host:pid:token``) is a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # a writer thread of this very process: it is alive
    return not alive(int(pid))


def _legacy_revision(conn: Connection) -> str | None:
    """The migration a ledger made by ``create_all`` matches, or None for an empty one."""
    inspector = sa.inspect(conn)
    if not inspector.has_table("syncd_records"):
        return None
    columns = {c["name"] for c in inspector.get_columns("syncd_records")}
    if "version" not in columns:
        return "0001"
    if not inspector.has_table("syncd_leases"):
        return "0002"
    if "etag" not in columns:
        return "0003"
    return "0005" if inspector.has_table("syncd_run_intents") else "0004"


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One migrating process per ledger: an advisory lock (PostgreSQL) or a file lock."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _ADVISORY_KEY})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_KEY})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".migrate-lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LedgerError(
            f"cannot open the ledger at {database}: {exc.strerror or exc} ({lock_path})"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_ADVISORY_KEY = 0x73796E6364  # "syncd": one migration at a time per PostgreSQL database


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa_event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def _short_error(exc: BaseException) -> str:
    """The database's own message, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {orig or exc}"


_CORRUPT = ("file is not a database", "database disk image is malformed")
_UNWRITABLE = (
    "disk I/O error",
    "database or disk is full",
    "attempt to write a readonly database",
    "unable to open database file",
)


def _failure(what: str, url: str, exc: BaseException) -> str:
    """One line naming the ledger, the database's reason and, when known, the way out."""
    name = _ledger_name(url)
    reason = _short_error(exc).splitlines()[0]
    if any(marker in reason for marker in _CORRUPT):
        return (
            f"the ledger {name} is corrupt ({reason}); delete it and run again:"
            " runs are adopted by their syncd.record_id tag"
        )
    if any(marker in reason for marker in _UNWRITABLE):
        return f"{what}: {name}: {reason} (is its folder full or read-only?)"
    return f"{what}: {name}: {reason}"


def _ledger_name(url: str) -> str:
    """The file of a SQLite ledger, else the URL without its password."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return "<invalid URL>"
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return parsed.database
    return _safe_url(url)


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid URL>"


def _record_row(row: Any) -> RecordRow:
    return RecordRow(
        source=row.source,
        record_id=row.record_id,
        size=row.size,
        mtime_ns=row.mtime_ns,
        offset=row.offset,
        line=row.line,
        seq=row.seq,
        skipped=row.skipped,
        fingerprint=row.fingerprint,
        state=row.state,
        error_count=row.error_count,
        last_error=row.last_error,
        last_sync_at=row.last_sync_at,
        attempts=row.attempts or 0,
        next_attempt_at=row.next_attempt_at,
        version=row.version or 0,
        tail=row.tail,
        etag=row.etag,
    )


def _run_row(row: Any) -> RunRow:
    return RunRow(
        record_id=row.record_id,
        run_id=row.run_id,
        experiment_id=row.experiment_id,
        parent_record_id=row.parent_record_id,
        parent_linked=bool(row.parent_linked),
    )


def _record_values(sink: str, rec: RecordRow, now: float) -> dict[str, Any]:
    return {
        "sink": sink,
        "source": rec.source,
        "record_id": rec.record_id,
        "size": rec.size,
        "mtime_ns": rec.mtime_ns,
        "offset": rec.offset,
        "line": rec.line,
        "seq": rec.seq,
        "skipped": rec.skipped,
        "fingerprint": rec.fingerprint,
        "state": rec.state,
        "error_count": rec.error_count,
        "last_error": rec.last_error,
        "last_sync_at": rec.last_sync_at,
        "updated_at": now,
        "attempts": rec.attempts,
        "next_attempt_at": rec.next_attempt_at,
        "tail": rec.tail,
        "etag": rec.etag,
    }


def extension_body(fields: dict[str, Any]) -> str:
    return json.dumps(fields, separators=(",", ":"), sort_keys=True)
