"""``syncd run``: the long-running service over the same engine as backfill.

One main loop owns the writes: it takes record notices (from the watcher
threads and periodic rescans), waits a short linger so appends coalesce, syncs
each changed record through the engine, and beats the heartbeat that
``/healthz`` and systemd's watchdog read. If the loop is stuck, the pings stop
and systemd restarts the service. The loop hands records to its writers
(:mod:`syncd.writers`): one for a SQLite store, ``writer.concurrency`` for an
MLflow server or a database store, distinct records in parallel.

Signals: SIGTERM/SIGINT stop reading, drain what is queued (bounded by
``writer.drain_timeout``) and exit 0; SIGHUP reloads the config file and makes S3
clients anew (rotated credentials are read).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from syncd.accounting import Accounting
from syncd.artifacts import clean_stale_stages
from syncd.backfill import (
    open_ledger,
    record_at,
    record_locator,
    root_experiments,
    s3_derived_record,
    sink_key,
)
from syncd.backlog import Backlog, Key
from syncd.config import Settings, load_config
from syncd.engine import Engine, Outcome, worker_id
from syncd.errors import ConfigError, SyncdError
from syncd.health import HealthServer, HealthState, Metrics
from syncd.ledger import FAILED, RETRY_STATES, WAITING, Ledger
from syncd.logging import configure, redact_text
from syncd.notify import Notifier, watchdog_interval
from syncd.rescan import rescan
from syncd.s3_poller import S3Poller
from syncd.sink import MlflowSink, RetryPolicy
from syncd.sink_health import SinkHealth
from syncd.snapshot.derived import DerivedRecord
from syncd.sources.local import LocalRecord
from syncd.sources.s3 import S3Record, client_for, forget_clients
from syncd.supervisor import Supervisor
from syncd.watch import Watcher
from syncd.writers import WriterPool, writer_count

log = structlog.get_logger("syncd.service")

LOOP_TICK = 0.25  # seconds: the longest the loop sleeps without a heartbeat
RECORDS_PER_ROUND = 64  # records synced between two looks at signals and rescans
STATUS_EVERY = 5.0
LEDGER_GAUGES_EVERY = 10.0
PRUNE_EVERY = 3600.0
LOOP_STALE_AFTER = 10.0  # seconds without a beat (and no bounded call) = a wedged loop
CALL_DEADLINE_MARGIN = 5.0  # seconds past timeouts.http before a call counts as wedged


class Daemon:
    """The service: the loop, its writers and watchers, reload and drain.

    Discovery lives in :mod:`syncd.rescan`, sink and ledger backoff in
    :mod:`syncd.sink_health`, metrics and the health state in :mod:`syncd.accounting`.
    """

    def __init__(
        self,
        config_path: Path | None,
        overrides: Mapping[str, Any],
        settings: Settings,
    ) -> None:
        self.config_path = config_path
        self.overrides = dict(overrides)
        self.settings = settings
        self.metrics = Metrics()
        self.state = HealthState()
        self.state_lock = threading.Lock()
        self.backlog = Backlog()
        self.health = SinkHealth(self.state, self.state_lock, self.metrics)
        self.accounting = Accounting(self.metrics, self.state, self.state_lock, self.health)
        self.notifier = Notifier()
        self.stopping = False
        self.reload_requested = False
        self.ledger: Ledger | None = None
        self.sink: MlflowSink | None = None
        self.pool: WriterPool | None = None
        self.watcher: Watcher | None = None
        self.poller: S3Poller | None = None
        self.retry_due: dict[Key, float] = {}  # waiting/failed records: next try (epoch s)
        self.next_rescan = 0.0
        self.last_status = 0.0
        self.last_gauges = 0.0
        self.ping_every = watchdog_interval()
        self.supervisor = Supervisor(
            ping=self.notifier.watchdog if self.ping_every is not None else (lambda: None),
            on_alive=self._alive,
            interval=min(1.0, self.ping_every or 1.0),
            stale_after=LOOP_STALE_AFTER,
        )
        self.drain_deadline: float | None = None
        self.last_prune = 0.0

    # -- lifecycle -----------------------------------------------------------------

    def run(self) -> int:
        with ExitStack() as stack:
            self._install_signals()
            self.supervisor.start()
            stack.callback(self.supervisor.stop)
            self._use(*self._open(self.settings))
            clean_stale_stages()
            stack.callback(self._close_ledger)
            stack.callback(self._close_pool)
            endpoint = self.settings.health_endpoint
            if endpoint is not None:
                try:
                    server = HealthServer(
                        *endpoint,
                        self.state,
                        self.metrics,
                        stale_after=max(10.0, 4 * (self.ping_every or 0)),
                        max_backlog=self.settings.writer.max_backlog_events,
                        lock=self.state_lock,
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"health_addr: cannot listen on {self.settings.health_addr}:"
                        f" {exc.strerror or exc}"
                    ) from exc
                server.start()
                stack.callback(server.stop)
            stack.callback(self._stop_watcher)
            self._start_watcher()
            self._check_sink()
            self._rescan()
            self.notifier.ready(self.accounting.status_line())
            stack.callback(self.notifier.close)
            log.info(
                "service_ready",
                tracking_uri=sink_key(self.settings.tracking_uri),
                roots=[r.path for r in self.settings.roots],
                health=self.settings.health_addr,
                watchdog_ping_s=self.ping_every,
            )
            self._loop()
            self._drain()
        log.info("service_stopped")
        return 0

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            if self.stopping:
                return
            log.info("signal_received", signal=signal.Signals(signum).name, action="drain and stop")
            self.stopping = True
            self.backlog.wake.set()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self.reload_requested = True
            self.backlog.wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _open(self, settings: Settings) -> tuple[Ledger, WriterPool]:
        """Ledger and writers for ``settings`` (nothing is replaced yet)."""
        check_roots(settings)
        ledger = open_ledger(settings)
        assert ledger is not None
        count = writer_count(settings.tracking_uri, settings.writer.concurrency)
        writers: list[tuple[Engine, MlflowSink]] = []
        locate = record_locator(settings.roots, settings.timeouts.http)
        for index in range(count):
            sink = MlflowSink(
                settings.tracking_uri,
                retry=RetryPolicy(attempts=2, max_delay=0.5),
                artifact_root=settings.artifact_root,
                call_deadline=settings.timeouts.http + CALL_DEADLINE_MARGIN,
                bounded=self.supervisor.bounded,
            )
            engine = Engine(
                ledger,
                sink,
                default_experiment=root_experiments(settings.roots),
                # one writer runs in the loop's thread and beats for it; threads only
                # tell the supervisor they progress (the loop beats while it waits)
                on_step=self._beat if count == 1 else self.supervisor.beat,
                bounded=self.supervisor.bounded,
                should_stop=self._past_drain_deadline,
                worker=worker_id(f"/w{index}"),
                lease_ttl=settings.writer.lease_ttl,
                locate=locate,
                progressing=self._progressing,
            )
            writers.append((engine, sink))
        if count > 1:
            log.info("writers", count=count)
        return ledger, WriterPool(writers)

    def _use(self, ledger: Ledger, pool: WriterPool) -> None:
        self.ledger, self.pool, self.sink = ledger, pool, pool.sink
        self.accounting.offsets = {}
        self.retry_due = {}
        with self.state_lock:
            self.state.ledger_open = True

    def _progressing(self) -> bool:
        """The supervisor's verdict: held leases are renewed only while it is None."""
        return self.supervisor.verdict() is None

    def _past_drain_deadline(self) -> bool:
        return self.drain_deadline is not None and time.monotonic() > self.drain_deadline

    def _alive(self, now: float) -> None:
        """The supervisor's verdict: progress is possible (``/healthz`` reads it)."""
        with self.state_lock:
            self.state.heartbeat = now

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def _close_ledger(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        with self.state_lock:
            self.state.ledger_open = False

    def _start_watcher(self) -> None:
        self.watcher = Watcher(
            self.settings.roots,
            self.backlog.add,
            mode=self.settings.watch.mode,
            poll_interval=self.settings.watch.poll_interval,
            on_overflow=self._rescan_soon,
        )
        self.watcher.start()
        self.poller = S3Poller(
            self.settings.roots,
            self.backlog.add,
            interval=self.settings.watch.s3_poll_interval,
            timeout=self.settings.timeouts.http,
            on_status=self._root_status,
        )
        self.poller.start()
        with self.state_lock:
            self.state.watch_mode = self.watcher.active_mode
            if self.poller.roots:
                self.state.watch_mode += "+s3poll"

    def _root_status(self, root: str, error: str | None) -> None:
        """From the poller thread: whether ``root`` could be listed (``/readyz``, metrics)."""
        self.metrics.root_up.labels(root=root).set(0 if error else 1)
        if error:
            self.metrics.root_errors.labels(root=root).inc()
        with self.state_lock:
            if error:
                self.state.root_errors[root] = error
            else:
                self.state.root_errors.pop(root, None)

    def _rescan_soon(self) -> None:
        """Called from the watcher thread: events were lost, rescan on the next turn."""
        log.warning("watch_events_lost", action="full rescan")
        self.next_rescan = 0.0
        self.backlog.wake.set()

    def _stop_watcher(self, *, keep_poller: bool = False) -> None:
        """Stop following the roots. ``keep_poller``: its thread stops, but it still
        answers for the S3 records a drain has yet to sync."""
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.poller is not None:
            self.poller.stop()
            if not keep_poller:
                self.poller = None

    # -- the loop ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping:
            self._beat()
            if self.reload_requested:
                self._reload()
            now = time.monotonic()
            if now >= self.next_rescan:
                self._rescan()
            self._queue_due_retries()
            if self._due():
                self._sync_round(deadline=None)
                continue
            self.backlog.wake.clear()
            self.backlog.wake.wait(self._sleep_for())

    def _queue_due_retries(self) -> None:
        """Waiting and failed records whose backoff has passed go back to the backlog."""
        if not self.retry_due:
            return
        now = time.time()
        for path, due in list(self.retry_due.items()):
            if due <= now:
                del self.retry_due[path]
                self.backlog.add(path)

    def _due(self) -> bool:
        """True when records wait, the sink is not backing off and the linger has passed."""
        oldest = self.backlog.oldest()
        if oldest is None or self.health.backing_off():
            return False
        return time.time() - oldest >= self.settings.writer.linger_ms / 1000

    def _sleep_for(self) -> float:
        now = time.monotonic()
        wait = min(LOOP_TICK, max(0.0, self.next_rescan - now))
        if self.retry_due:
            wait = min(wait, max(0.0, min(self.retry_due.values()) - time.time()))
        oldest = self.backlog.oldest()
        if oldest is not None:
            if self.health.backing_off():
                wait = min(wait, self.health.wait_left())
            else:
                linger_left = self.settings.writer.linger_ms / 1000 - (time.time() - oldest)
                wait = min(wait, max(0.0, linger_left))
        return max(wait, 0.001)

    def _sync_round(self, deadline: float | None) -> None:
        """Sync a batch of noticed records on the writers, distinct records in parallel.

        The loop stays in this thread: it hands records out, beats while writers
        work, and reads every outcome. When MLflow or the ledger fails, or a reload
        or stop arrives, nothing more is handed out and the rest goes back.
        """
        assert self.pool is not None
        pool = self.pool
        pending = list(reversed(self.backlog.take(RECORDS_PER_ROUND)))
        running: dict[Future[Outcome], tuple[Key, float, float]] = {}
        halted = False
        while pending or running:
            while pending and not halted and len(running) < pool.size:
                path, since = pending.pop()
                if deadline is not None and time.monotonic() > deadline:
                    self.backlog.add(path, since)
                    continue
                future = pool.submit(path, partial(self._sync_one, path=path))
                if future is None:  # a writer has it: its notice comes back after
                    self.backlog.add(path, since)
                    continue
                running[future] = (path, since, time.perf_counter())
            if not running:
                break
            done, _ = wait(running, timeout=LOOP_TICK, return_when=FIRST_COMPLETED)
            for future in done:
                path, since, started = running.pop(future)
                if not self._settle_outcome(future, path, since, started, halted):
                    halted = True
            if self.reload_requested or (self.stopping and deadline is None):
                halted = True
            self._beat()
        if pending:
            self._requeue(list(reversed(pending)))

    def _sync_one(self, engine: Engine, path: Key) -> Outcome:
        record = self._record_for(path)
        try:
            return engine.sync(record, self._row_for(path))
        finally:
            record.close()

    def _settle_outcome(
        self, future: Future[Outcome], path: Key, since: float, started: float, halted: bool
    ) -> bool:
        """Account for one record's sync; False when the round must hand out no more."""
        try:
            outcome = future.result()
        except SyncdError as exc:  # the ledger failed: keep the notice, try again later
            log.error("ledger_failed", file=str(path), error=redact_text(str(exc))[:500])
            self.backlog.add(path, since)
            if not halted:
                self.health.failed(str(exc), ledger=True)
            return False
        self.health.ledger_ok()
        retries = self.pool.take_retries() if self.pool is not None else 0
        self.accounting.synced(path, outcome, time.perf_counter() - started, retries)
        if outcome.retry_later:
            self.backlog.add(path, since)
            if not halted:
                self.health.failed(outcome.message or "MLflow unavailable")
            return False
        if outcome.busy:  # another worker holds it: look again when its lease ends
            self.retry_due[path] = time.time() + outcome.busy_for + random.uniform(0.1, 1.0)
        elif outcome.state in (FAILED, WAITING):  # waiting here: its S3 root cannot be read
            self._schedule_retry(path)
        return True

    def _record_for(self, key: Key) -> LocalRecord | S3Record | DerivedRecord:
        if isinstance(key, Path):
            root = next(
                (
                    r
                    for r in self.settings.roots
                    if not r.is_s3 and r.derived and key.is_relative_to(r.path)
                ),
                None,
            )
            if root is not None:
                return record_at(root, key, self.settings.state_dir)
            return LocalRecord(key)
        assert self.poller is not None
        found = self.poller.run_dir(key)
        if found is not None:  # a run directory of a snapshot, dvclive or tensorboard root
            root, run = found
            client = client_for(root, self.settings.timeouts.http)
            return s3_derived_record(root, client, run, self.settings.state_dir)
        return self.poller.record(key)

    def _requeue(self, items: list[tuple[Key, float]]) -> None:
        """Notices taken but not synced go back, keeping their age."""
        for path, since in items:
            self.backlog.add(path, since)

    def _schedule_retry(self, path: Key) -> None:
        row = self._row_for(path)
        if row is not None and row.state in RETRY_STATES:
            self.retry_due[path] = row.next_attempt_at or time.time()

    def _row_for(self, path: Key) -> Any:
        assert self.ledger is not None
        uri = path if isinstance(path, str) else path.absolute().as_uri()
        return self.ledger.get_record(uri)

    def _check_sink(self) -> None:
        assert self.sink is not None
        self.health.check(self.sink)

    def _rescan(self) -> None:
        """The safety net (:mod:`syncd.rescan`): every record that changed unseen."""
        assert self.ledger is not None
        started = time.perf_counter()
        found = rescan(
            self.settings,
            self.ledger,
            self.poller,
            self.backlog,
            self.accounting.offsets,
            self.retry_due,
        )
        if found.error is not None:
            log.error("rescan_failed", error=found.error)
        now = time.time()
        self.next_rescan = time.monotonic() + self.settings.watch.rescan_interval
        self.metrics.last_rescan.set(now)
        with self.state_lock:
            self.state.last_rescan_at = now
        log.info(
            "rescan",
            queued=found.queued,
            known=found.known,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _beat(self) -> None:
        """The heartbeat: health state, gauges, watchdog pings, STATUS= lines."""
        now = time.monotonic()
        self.supervisor.beat()
        self.accounting.backlog(
            self.backlog,
            self.poller,
            observers_alive=(self.watcher.alive if self.watcher else True)
            and (self.poller.alive if self.poller else True),
            stopping=self.stopping,
        )
        if now - self.last_status >= STATUS_EVERY:
            self.notifier.status(self.accounting.status_line())
            self.last_status = now
        if now - self.last_prune >= PRUNE_EVERY and self.ledger is not None:
            self.last_prune = now
            self._prune_events()
        if now - self.last_gauges >= LEDGER_GAUGES_EVERY and self.ledger is not None:
            self.last_gauges = now
            try:
                for state, count in self.ledger.state_counts().items():
                    self.metrics.records.labels(state=state).set(count)
            except SyncdError as exc:
                log.warning("ledger_gauges_failed", error=str(exc))

    def _prune_events(self) -> None:
        days = self.settings.ledger.events_retention_days
        if not days or self.ledger is None:
            return
        try:
            pruned = self.ledger.prune_events(time.time() - days * 86400)
        except SyncdError as exc:
            log.warning("ledger_prune_failed", error=redact_text(str(exc))[:300])
            return
        if pruned:
            log.info("ledger_pruned", sync_events=pruned, older_than_days=days)

    # -- reload and stop ---------------------------------------------------------------

    def _reload(self) -> None:
        self.reload_requested = False
        self.notifier.reloading()
        try:
            new = load_config(self.config_path, overrides=self.overrides)
        except ConfigError as exc:
            log.error("reload_rejected", error=str(exc), action="keeping the running config")
            self.notifier.ready(self.accounting.status_line())
            return
        old = self.settings
        if new.health_addr != old.health_addr:
            log.warning("reload_health_addr_ignored", detail="a new health address needs a restart")
        changed_sink = (new.tracking_uri, new.ledger_url_resolved, new.artifact_root) != (
            old.tracking_uri,
            old.ledger_url_resolved,
            old.artifact_root,
        )
        try:
            check_roots(new)
            opened = self._open(new) if changed_sink else None
        except SyncdError as exc:  # keep what runs: a bad reload must not end the service
            log.error(
                "reload_rejected",
                error=redact_text(str(exc))[:500],
                action="keeping the running config",
            )
            self.notifier.ready(self.accounting.status_line())
            return
        configure(new.log.format, new.log.level)
        self._stop_watcher()
        # S3 clients are made again: credentials (a rotated credentials file, a new
        # profile), endpoints and regions are read anew, as at start.
        forget_clients()
        self.settings = new
        if opened is not None:
            self._close_pool()
            self._close_ledger()
            self._use(*opened)
            self._check_sink()
        elif self.pool is not None:
            locate = record_locator(new.roots, new.timeouts.http)
            for engine in self.pool.engines:
                engine.default_experiment = root_experiments(new.roots)
                engine.locate = locate
        self._start_watcher()
        self.next_rescan = 0.0
        self.notifier.ready(self.accounting.status_line())
        log.info("config_reloaded", roots=[r.path for r in new.roots])

    def _drain(self) -> None:
        """Stop reading; finish what is queued within the drain timeout."""
        self.notifier.stopping()
        self._stop_watcher(keep_poller=True)  # S3 records still queued are drained too
        deadline = time.monotonic() + self.settings.writer.drain_timeout
        self.drain_deadline = deadline
        while len(self.backlog) and time.monotonic() < deadline:
            if self.health.backing_off():
                time.sleep(min(0.1, self.health.wait_left()))
                continue
            self._sync_round(deadline=deadline)
        left = len(self.backlog)
        if left:
            log.warning("drain_incomplete", records_left=left, detail="caught up on next start")
        else:
            log.info("drained")


def run_service(config_path: Path | None, overrides: Mapping[str, Any]) -> int:
    settings = load_config(config_path, overrides=overrides)
    configure(settings.log.format, settings.log.level)
    if not settings.roots:
        raise ConfigError("roots: no roots to watch (give ROOT arguments or 'roots' in the config)")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.timeouts.http)))
    check_roots(settings)
    return Daemon(config_path, overrides, settings).run()


def check_roots(settings: Settings) -> None:
    """Every local root exists (or is created with ``create_roots: true``).

    An s3:// root is not checked here: the poller lists it, and a root it cannot
    list is reported (logs, ``/readyz``, ``syncd_root_up``) and retried, while the
    other roots go on.
    """
    for root in settings.roots:
        if root.is_s3:
            continue
        path = Path(root.path)
        if path.is_dir():
            continue
        if path.exists():
            raise ConfigError(f"roots: {root.path} is not a directory")
        if not settings.create_roots:
            raise ConfigError(
                f"roots: {root.path} does not exist (a mistyped path or an unmounted"
                " volume?); create it, or set create_roots: true"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"roots: cannot create {root.path}: {exc.strerror}") from exc
        log.info("root_created", path=root.path)
