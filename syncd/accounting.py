"""What the daemon did and what waits: Prometheus metrics, the health state and the
``STATUS=`` line, from sync outcomes and the backlog.

The loop hands every outcome to :meth:`Accounting.synced` and calls
:meth:`Accounting.backlog` on each beat; nothing here writes to MLflow or the ledger.
"""

from __future__ import annotations

import threading
import time

from syncd.backlog import Backlog, Key
from syncd.engine import Outcome
from syncd.health import HealthState, Metrics
from syncd.ledger import FAILED, WAITING
from syncd.s3_poller import S3Poller
from syncd.sink_health import SinkHealth

BACKLOG_SIZES_AT_MOST = 10_000  # records stat'ed per beat for the backlog estimate


class Accounting:
    def __init__(
        self, metrics: Metrics, state: HealthState, lock: threading.Lock, health: SinkHealth
    ) -> None:
        self.metrics = metrics
        self.state = state
        self.lock = lock
        self.health = health
        self.offsets: dict[Key, int] = {}  # each record's offset synced so far
        self.bytes_per_event = 100.0  # a running mean: the backlog in events is an estimate
        self.synced_records = 0

    def synced(self, path: Key, outcome: Outcome, seconds: float, retries: int) -> None:
        """One record's sync took ``seconds`` and ``retries`` retried MLflow calls."""
        m = self.metrics
        if not outcome.skipped:
            previous = self.offsets.get(path, 0)
            self.offsets[path] = outcome.offset
            if outcome.events:
                consumed = max(outcome.offset - previous, 0)
                if consumed:
                    self.bytes_per_event = 0.9 * self.bytes_per_event + 0.1 * (
                        consumed / outcome.events
                    )
                m.batch_size.observe(outcome.events)
                m.write_duration.observe(seconds)
        m.events.inc(outcome.events)
        m.metric_points.inc(outcome.metric_points)
        m.artifacts.inc(outcome.artifacts)
        m.record_errors.inc(len(outcome.errors))
        m.sink_retries.inc(retries)
        if outcome.retry_later:
            m.sink_errors.labels(kind="transient").inc()
            m.record_failures.labels(state=WAITING).inc()
            return
        if outcome.state in (FAILED, WAITING):
            m.record_failures.labels(state=outcome.state).inc()
            if (outcome.message or "").startswith("MLflow refused"):
                m.sink_errors.labels(kind="permanent").inc()
        if outcome.run_id is not None:  # MLflow acknowledged writes just now
            self.health.sink_ok()
        if outcome.events:
            self.synced_records += 1
            now = time.time()
            m.last_sync.set(now)
            with self.lock:
                self.state.last_sync_at = now
                self.state.error_count += len(outcome.errors)

    def backlog(
        self, backlog: Backlog, poller: S3Poller | None, *, observers_alive: bool, stopping: bool
    ) -> None:
        """The backlog gauges and the health state's view of it."""
        backlog_records = len(backlog)
        backlog_bytes = self._backlog_bytes(backlog, poller) if backlog_records else 0
        events = int(backlog_bytes / max(self.bytes_per_event, 1.0))
        oldest = backlog.oldest()
        lag = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        with self.lock:
            self.state.backlog_records = backlog_records
            self.state.backlog_events = events
            self.state.lag_seconds = round(lag, 3)
            self.state.observer_alive = observers_alive
            self.state.stopping = stopping
        m = self.metrics
        m.backlog_records.set(backlog_records)
        m.backlog_bytes.set(backlog_bytes)
        m.backlog_events.set(events)
        m.oldest_unsynced.set(lag)

    def _backlog_bytes(self, backlog: Backlog, poller: S3Poller | None) -> int:
        total = 0
        for path in backlog.paths()[:BACKLOG_SIZES_AT_MOST]:
            try:
                if isinstance(path, str):
                    listed = poller.lookup(path) if poller else None
                    size = listed.size if listed else 0
                else:
                    size = path.stat().st_size
            except OSError:
                continue
            total += max(0, size - self.offsets.get(path, 0))
        return total

    def status_line(self) -> str:
        """systemd's ``STATUS=`` line."""
        with self.lock:
            s = self.state
            sink = "up" if s.sink_up else "DOWN"
            return (
                f"{self.synced_records} syncs, backlog {s.backlog_records} records,"
                f" lag {s.lag_seconds:.1f}s, MLflow {sink}, watch {s.watch_mode}"
            )
