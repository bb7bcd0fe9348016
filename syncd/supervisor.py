"""The heartbeat supervisor: watchdog pings that stop only when progress is impossible.

The main loop beats between steps, but one MLflow call may legitimately take
as long as its timeout (a slow server, a big artifact). Every such call runs
inside :meth:`Supervisor.bounded` with a deadline. A thread of its own pings
systemd's watchdog (and refreshes the heartbeat ``/healthz`` reads) while

- the loop beat recently, or
- a bounded call is in flight and within its deadline.

When a call outlives its deadline or the loop stops beating without a call in
flight, the pings stop: systemd restarts the service after ``WatchdogSec``.
So a wedged daemon is restarted at most ``deadline + WatchdogSec`` after the
call started, and a slow but working one never is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

log = structlog.get_logger("syncd.supervisor")


@dataclass(slots=True)
class _InFlight:
    what: str
    started: float
    deadline: float


class Supervisor:
    """Decides whether the daemon is making progress; pings while it is."""

    def __init__(
        self,
        *,
        ping: Callable[[], None],
        on_alive: Callable[[float], None],
        interval: float,
        stale_after: float,
    ) -> None:
        self._ping = ping
        self._on_alive = on_alive
        self.interval = interval
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._calls: dict[int, _InFlight] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._silenced = False

    # -- what the loop and the sink report ------------------------------------------

    def beat(self) -> None:
        with self._lock:
            self._last_beat = time.monotonic()

    @contextmanager
    def bounded(self, what: str, seconds: float) -> Iterator[None]:
        """Mark a call in flight that must end within ``seconds``."""
        now = time.monotonic()
        token = id(threading.current_thread()) ^ int(now * 1e9)
        with self._lock:
            self._calls[token] = _InFlight(what, now, now + seconds)
        try:
            yield
        finally:
            with self._lock:
                del self._calls[token]
                self._last_beat = time.monotonic()  # a finished call is progress

    # -- the verdict -----------------------------------------------------------------

    def verdict(self, now: float | None = None) -> str | None:
        """None while progress is possible, else why not."""
        now = time.monotonic() if now is None else now
        with self._lock:
            calls = list(self._calls.values())
            last_beat = self._last_beat
        late = [c for c in calls if now > c.deadline]
        if late:
            call = late[0]
            return (
                f"MLflow call {call.what} has run {now - call.started:.0f}s,"
                f" past its {call.deadline - call.started:.0f}s deadline"
            )
        if calls or now - last_beat <= self.stale_after:
            return None
        return f"the main loop has not beaten for {now - last_beat:.0f}s"

    # -- the thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            problem = self.verdict()
            if problem is None:
                if self._silenced:
                    log.info("watchdog_resumed")
                    self._silenced = False
                self._on_alive(time.monotonic())
                self._ping()
            elif not self._silenced:
                self._silenced = True
                log.error("watchdog_silenced", reason=problem)
            self._stop.wait(self.interval)
