"""Whether MLflow and the ledger answer the daemon, and how long it backs off when not.

One place owns the backoff after a failed sync, the ``sink_up`` gauge and the
health state's sink and ledger errors (``/readyz`` reads them): the loop asks
:meth:`SinkHealth.backing_off` before it hands records out.
"""

from __future__ import annotations

import random
import threading
import time

import structlog

from syncd.errors import SyncdError
from syncd.health import HealthState, Metrics
from syncd.logging import redact_text
from syncd.sink import MlflowSink

log = structlog.get_logger("syncd.service")

MAX_BACKOFF = 30.0


class SinkHealth:
    def __init__(self, state: HealthState, lock: threading.Lock, metrics: Metrics) -> None:
        self.state = state
        self.lock = lock
        self.metrics = metrics
        self.backoff = 0.0  # the current backoff ceiling (s); 0 while things answer
        self.retry_at = 0.0  # monotonic time before which nothing is handed out

    def backing_off(self) -> bool:
        return time.monotonic() < self.retry_at

    def wait_left(self) -> float:
        return max(0.0, self.retry_at - time.monotonic())

    def check(self, sink: MlflowSink) -> None:
        """Ask MLflow once (at start and after a reload)."""
        try:
            sink.check()
        except SyncdError as exc:
            self.failed(str(exc))
        else:
            self.sink_ok()

    def sink_ok(self) -> None:
        """MLflow acknowledged writes: any backoff is over."""
        if self.backoff:
            log.info("sink_recovered")
        self.backoff = 0.0
        self.retry_at = 0.0
        self.metrics.sink_up.set(1)
        with self.lock:
            self.state.sink_up = True
            self.state.sink_error = None

    def failed(self, reason: str, *, ledger: bool = False) -> None:
        """Wait before the next sync; ``ledger``: the ledger failed (full, read-only)."""
        self.backoff = min(MAX_BACKOFF, max(0.5, self.backoff * 2))
        delay = random.uniform(self.backoff / 2, self.backoff)
        self.retry_at = time.monotonic() + delay
        with self.lock:
            if ledger:
                self.state.ledger_error = redact_text(reason)[:300]
            else:
                self.state.sink_up = False
                self.state.sink_error = redact_text(reason)[:300]
        if not ledger:
            self.metrics.sink_up.set(0)
        log.warning(
            "ledger_backoff" if ledger else "sink_backoff",
            retry_in_s=round(delay, 2),
            reason=redact_text(reason)[:300],
        )

    def ledger_ok(self) -> None:
        """A sync got through the ledger: a ledger failure is over."""
        with self.lock:
            failed = self.state.ledger_error is not None
            self.state.ledger_error = None
            sink_up = self.state.sink_up
        if failed:
            log.info("ledger_recovered")
            if sink_up:
                self.backoff = 0.0
