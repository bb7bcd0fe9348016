"""Writers: records synced in parallel where the tracking store allows it.

An MLflow tracking server (``http(s)://``) or a database-backed store takes
concurrent writers; a SQLite store gets one (its writes are serialised under a
file lock anyway). Each writer is a thread with its own :class:`MlflowSink` and
:class:`Engine`, over one shared :class:`Ledger` (its SQLAlchemy engine is
thread-safe). Distinct records go to distinct writers; one record is never given
to two writers at once: the in-process claim set guards this process, the
record's lease in the ledger guards the fleet. Each record's lines are written
in order by the one writer that holds it, with one checkpoint per record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from queue import SimpleQueue
from typing import TypeVar

from syncd.engine import Engine
from syncd.sink import MlflowSink, is_sqlite_uri

T = TypeVar("T")

_CONCURRENT_SCHEMES = ("http://", "https://", "postgresql", "mysql", "mssql", "databricks")


def writer_count(tracking_uri: str, configured: int) -> int:
    """How many writers a tracking URI gets: ``configured`` for servers and databases."""
    if is_sqlite_uri(tracking_uri):
        return 1
    return configured if tracking_uri.lower().startswith(_CONCURRENT_SCHEMES) else 1


class WriterPool:
    """``size`` writers; :meth:`submit` hands one record to a free one.

    With one writer the work runs in the caller's thread (the future is done when
    :meth:`submit` returns), so a single-writer daemon behaves as a plain loop.
    """

    def __init__(self, writers: list[tuple[Engine, MlflowSink]]) -> None:
        if not writers:
            raise ValueError("a writer pool needs at least one writer")
        self.writers = writers
        self.size = len(writers)
        self._idle: SimpleQueue[Engine] = SimpleQueue()
        for engine, _sink in writers:
            self._idle.put(engine)
        self._claims: set[Hashable] = set()
        self._lock = threading.Lock()
        self._executor = (
            ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="writer")
            if self.size > 1
            else None
        )

    @property
    def sink(self) -> MlflowSink:
        """A sink for calls outside any record (readiness checks)."""
        return self.writers[0][1]

    @property
    def engines(self) -> list[Engine]:
        return [engine for engine, _sink in self.writers]

    def claimed(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._claims

    def submit(self, key: Hashable, work: Callable[[Engine], T]) -> Future[T] | None:
        """Run ``work`` on a free writer's engine; None when ``key`` is already being worked."""
        with self._lock:
            if key in self._claims:
                return None
            self._claims.add(key)

        def run() -> T:
            engine = self._idle.get()
            try:
                return work(engine)
            finally:
                self._idle.put(engine)
                with self._lock:
                    self._claims.discard(key)

        if self._executor is not None:
            return self._executor.submit(run)
        future: Future[T] = Future()
        try:
            future.set_result(run())
        except BaseException as exc:  # delivered like a thread's: through the future
            if not isinstance(exc, Exception):
                raise
            future.set_exception(exc)
        return future

    def take_retries(self) -> int:
        return sum(sink.take_retries() for _engine, sink in self.writers)

    def close(self) -> None:
        """Wait for the writers to finish what they hold, then end their threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
