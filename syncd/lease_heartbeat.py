"""Keeping a held record lease alive while one long call runs.

A worker renews its record's lease at every step, but a single step may be one
long call: an artifact upload's deadline grows with its size (1 MiB/s), a call
may be retried, and ``writer.lease_ttl`` may be set below ``timeouts.http``.
Such a call can outlive the lease, and another worker would take the record
over while the first is still writing. So while a worker holds a lease, a
thread of its own renews it every ``ttl / 3``:

- it renews only while ``progressing()`` says the process is making progress
  (the supervisor's verdict): a call wedged past its deadline lets the lease
  expire, so a fleet takes the record over instead of waiting for a restart;
- a renewal that finds the lease taken over records it: the worker stops the
  record at its next step (:meth:`LeaseHeartbeat.check`) without committing;
- a renewal that fails for another reason (the ledger briefly unreachable) is
  logged and tried again at the next beat: the worker's own renewals and the
  commit's fence still decide.

The thread runs only while a lease is held and ends when it is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from syncd.errors import LedgerError
from syncd.ledger import Lease, LeaseLost, Ledger

log = structlog.get_logger("syncd.lease")


class LeaseHeartbeat:
    """Renews one worker's held lease from a thread of its own."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        name: str,
        progressing: Callable[[], bool] | None = None,
    ) -> None:
        self._ledger = ledger
        self._name = name
        self._progressing = progressing or (lambda: True)
        self._cond = threading.Condition()
        self._lease: Lease | None = None
        self._lost: str | None = None
        self._thread: threading.Thread | None = None
        self.renewals = 0  # successful renewals by the thread (for tests and metrics)

    def hold(self, lease: Lease) -> None:
        """Start renewing ``lease`` (the worker has just taken it)."""
        with self._cond:
            self._lease, self._lost = lease, None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"lease-heartbeat {self._name}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def release(self) -> None:
        """Stop renewing; no renewal starts after this returns."""
        with self._cond:
            self._lease = None
            self._cond.notify_all()

    def check(self) -> None:
        """Raise :class:`LeaseLost` when a renewal found the held lease taken over."""
        with self._cond:
            lost = self._lost
        if lost is not None:
            raise LeaseLost(lost)

    def _run(self) -> None:
        with self._cond:
            while True:
                lease = self._lease
                if lease is None:
                    self._thread = None  # the next hold() starts a new thread
                    return
                self._cond.wait(lease.ttl / 3)
                if self._lease is not lease or self._lost is not None:
                    continue  # released, replaced, or already lost: nothing to renew
                if not self._progressing():
                    log.warning("lease_heartbeat_paused", source=lease.source)
                    continue
                # Renewed under the condition: release() waits for it, so no renewal
                # ever follows the release (and the delete of the lease row).
                try:
                    self._ledger.renew_lease(lease)
                    self.renewals += 1
                except LeaseLost as exc:
                    self._lost = str(exc)
                    log.warning("lease_lost", source=lease.source, error=str(exc))
                except LedgerError as exc:
                    log.warning("lease_renewal_failed", source=lease.source, error=str(exc))
